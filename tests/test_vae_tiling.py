"""Tiled VAE (`backbone.enable_vae_tiling`) against diffusers' tiled `AutoencoderKL` and pipelines.

Sizes are chosen so that the grid has partial last rows and columns: 64 px tiles (8 latents) overlap
by 0.25, so latent tiles start every 6 latents and pixel tiles every 48 pixels.
"""

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, assert_close, to_nchw, to_nhwc
from test_tasks import PROMPTS, assert_images_close, build_tasks, noise, reference, stand_in_images

from keras_sd3 import backend
from keras_sd3.models import StableDiffusion3Backbone

SCALE, SHIFT = 1.5305, 0.0609


@pytest.fixture(scope="module")
def loaded(sd3_reference):
    folder, _, vae = sd3_reference
    return StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE), vae


def diffusers_tiling(vae, tile, overlap=0.25):
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = tile, tile // 8, overlap
    return vae


def counting_programs(monkeypatch):
    """Counts the programs compiled for tiles: traces of each compiled function (jax / tensorflow)."""
    traces = []
    compile_function = backend.compile_function

    def counted(model, function):
        def traced(x):
            traces.append(tuple(x.shape))
            return function(x)

        return compile_function(model, traced)

    monkeypatch.setattr(backend, "compile_function", counted)
    return traces


@pytest.mark.parametrize("latent_shape, widths", [((16, 25), {8, 7, 1}), ((14, 20), {8, 2})])
def test_tiled_decode_matches_diffusers(loaded, monkeypatch, latent_shape, widths):
    """3 x 5 and 3 x 4 tiles (edge tiles of their own smaller sizes, 1 latent wide in the first case) vs
    diffusers' `tiled_decode`: float32 within 1e-4 of the largest value."""
    backbone, vae = loaded
    latents = np.random.default_rng(0).standard_normal((2, *latent_shape, 16)).astype("float32")
    traces = counting_programs(monkeypatch)
    backbone.enable_vae_tiling(64, 0.25)
    try:
        ours = keras.ops.convert_to_numpy(backbone.decode_step(latents))
    finally:
        backbone.disable_vae_tiling()
    with torch.no_grad():
        expected = to_nhwc(diffusers_tiling(vae, 64).decode(to_nchw(latents / SCALE + SHIFT)).sample)
        vae.disable_tiling()
        plain = to_nhwc(vae.decode(to_nchw(latents / SCALE + SHIFT)).sample)
    assert_close(ours, expected)
    assert np.abs(expected - plain).max() > 1e-3 * np.abs(plain).max()  # the tiles change the picture
    if keras.config.backend() != "torch":  # one program per tile shape, not per tile (torch runs eagerly)
        heights = {min(8, latent_shape[0] - i) for i in range(0, latent_shape[0], 6)}
        assert sorted(set(traces)) == sorted({(2, h, w, 16) for h in heights for w in widths})
        assert len(traces) == len(set(traces))


def test_tiled_encode_matches_diffusers(loaded):
    """128 x 216 pictures on 64 px tiles (3 x 5, the last row 32 px high, the last column 24 px wide) vs
    diffusers' `_tiled_encode` posterior mean, shifted and scaled: within 1e-4 of the largest value."""
    backbone, vae = loaded
    images = np.random.default_rng(1).uniform(-1, 1, (1, 128, 216, 3)).astype("float32")
    backbone.enable_vae_tiling(64)
    try:
        ours = keras.ops.convert_to_numpy(backbone.encode_image_step(images))
    finally:
        backbone.disable_vae_tiling()
    with torch.no_grad():
        mean = diffusers_tiling(vae, 64).encode(to_nchw(images)).latent_dist.mean
        vae.disable_tiling()
    assert_close(ours, to_nhwc((mean - SHIFT) * SCALE))


def test_inputs_no_larger_than_a_tile_take_the_plain_path(loaded):
    backbone, _ = loaded
    latents = np.random.default_rng(2).standard_normal((1, 8, 8, 16)).astype("float32")
    plain = keras.ops.convert_to_numpy(backbone.decode_step(latents))
    backbone.enable_vae_tiling(64)
    try:
        assert not backbone.uses_vae_tiles(latents.shape) and backbone.uses_vae_tiles((1, 8, 9, 16))
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(backbone.decode_step(latents)), plain)
    finally:
        backbone.disable_vae_tiling()


@pytest.mark.parametrize("size, overlap, message", [(60, 0.25, "multiple of the VAE's factor 8"),
                                                    (0, 0.25, "positive multiple"),
                                                    (64, 1.0, r"fraction in \[0, 1\)"),
                                                    (64, -0.1, "overlap must be")])
def test_bad_tiles_are_refused(loaded, size, overlap, message):
    backbone, _ = loaded
    with pytest.raises(ValueError, match=message):
        backbone.enable_vae_tiling(size, overlap)
    assert backbone.vae_tiling is None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tasks(str(tmp_path_factory.mktemp("tiled_tasks")))


def test_pipelines_with_tiling_match_diffusers(setup):
    """Text-to-image and image-to-image at 48 x 80 on 32 px tiles (2 x 4 latent tiles, 2 x 2 pixel
    tiles) vs diffusers' pipelines with `pipe.vae.enable_tiling()` at that tile size: within 2/255."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    pipe, tasks = setup
    H, W, _ = IMAGE_SHAPE
    latents, images, eps = noise(1, seed=20), stand_in_images(1), noise(1, seed=21)
    untiled = tasks["text"].generate(PROMPTS[0], num_steps=3, guidance_scale=5.0, latents=latents)
    tasks["text"].backbone.enable_vae_tiling(32)
    try:
        text = tasks["text"].generate(PROMPTS[0], num_steps=3, guidance_scale=5.0, latents=latents)
        image = tasks["image"].generate({"images": images, "prompts": PROMPTS[:1]}, num_steps=4, guidance_scale=4.5,
                                        strength=0.6, noise=eps)
    finally:
        tasks["text"].backbone.disable_vae_tiling()
    diffusers_tiling(pipe.vae, 32)
    try:
        expected_text = reference(pipe, StableDiffusion3Pipeline, "pipeline_stable_diffusion_3", latents,
                                  prompt=PROMPTS[:1], num_inference_steps=3, guidance_scale=5.0, height=H, width=W,
                                  latents=to_nchw(latents))
        expected_image = reference(pipe, StableDiffusion3Img2ImgPipeline, "pipeline_stable_diffusion_3_img2img", eps,
                                   prompt=PROMPTS[:1], image=to_nchw(images), num_inference_steps=4,
                                   guidance_scale=4.5, height=H, width=W, strength=0.6)
    finally:
        pipe.vae.disable_tiling()
    assert_images_close(text[None], expected_text)
    assert_images_close(image, expected_image)
    assert np.abs(text.astype(int) - untiled.astype(int)).max() > 2  # tiling was used
