"""Latent-space exploration: slerp against closed forms, loopable noise, walks reproducing plain text-to-image."""

import keras
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, LATENT_SHAPE
from tiny_text import build_pipeline

from keras_sd3 import explore
from keras_sd3.models import StableDiffusion3TextToImage

TOLERANCE = 2  # max abs difference of uint8 images (2 / 255)
STEPS, GUIDANCE = 3, 4.0
PROMPTS = ["a red circle on a blue background", "a small green triangle in the top left",
           "a big yellow square", "a purple circle at the bottom"]


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), np.float64)


def unit(rng, shape):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x)).astype(np.float32)


@pytest.mark.parametrize("shape", [(154, 4096), (2048,)])
def test_slerp_endpoints_are_exact_and_angle_steps_constant(shape):
    rng = np.random.default_rng(0)
    a, b = unit(rng, shape), unit(rng, shape)
    path = numpy(explore.slerp(a, b, np.linspace(0.0, 1.0, 9)))
    assert path.shape == (9, *shape)
    np.testing.assert_array_equal(path[0], a)
    np.testing.assert_array_equal(path[-1], b)
    cos = [np.sum(path[i] * path[i + 1]) for i in range(8)]
    angles = np.arccos(np.clip(cos, -1, 1))
    total = np.arccos(np.sum(a.astype(np.float64) * b))
    np.testing.assert_allclose(angles, total / 8, atol=1e-5)  # constant angular speed (closed form)
    np.testing.assert_allclose(np.linalg.norm(path.reshape(9, -1), axis=1), 1.0, atol=1e-5)


def test_slerp_interpolates_norms_linearly_and_matches_the_closed_form():
    rng = np.random.default_rng(1)
    ua, ub = unit(rng, (64,)), unit(rng, (64,))
    a, b, t = 2.0 * ua, 5.0 * ub, np.float32(0.3)
    theta = np.arccos(np.dot(ua.astype(np.float64), ub))
    direction = (np.sin((1 - t) * theta) * ua + np.sin(t * theta) * ub) / np.sin(theta)
    expected = direction * ((1 - t) * 2.0 + t * 5.0)  # the documented norm: (1 - t)|a| + t|b|
    np.testing.assert_allclose(numpy(explore.slerp(a, b, t)), expected, atol=1e-5)
    np.testing.assert_allclose(numpy(explore.lerp(a, b, t)), 0.7 * a + 0.3 * b, atol=1e-6)


@pytest.mark.parametrize("factor", [3.0, -1.0, 1.0])
def test_slerp_of_parallel_and_antiparallel_inputs_is_finite(factor):
    a = unit(np.random.default_rng(2), (2048,))
    path = numpy(explore.slerp(a, factor * a, np.linspace(0.0, 1.0, 5)))
    assert np.all(np.isfinite(path))
    t = np.linspace(0.0, 1.0, 5)[:, None]
    np.testing.assert_allclose(path, (1 - t) * a + t * factor * a, atol=1e-6)  # the documented lerp fallback


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_slerp_keeps_the_dtype(dtype):
    rng = np.random.default_rng(3)
    a, b = (keras.ops.cast(unit(rng, (2, 8)), dtype) for _ in range(2))
    for function in (explore.slerp, explore.lerp):
        assert keras.backend.standardize_dtype(function(a, b, [0.0, 0.5]).dtype) == dtype
        assert keras.backend.standardize_dtype(function(a, b, 0.5).dtype) == dtype


def test_slerp_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"different shapes \(3,\) and \(4,\)"):
        explore.slerp(np.ones(3, np.float32), np.ones(4, np.float32), 0.5)


def test_circular_noise_loops_and_is_seeded():
    frames = explore.circular_noise(LATENT_SHAPE, 8, seed=5, include_end=True)
    assert frames.shape == (9, *LATENT_SHAPE)
    np.testing.assert_allclose(frames[8], frames[0], atol=1e-6)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((2, 1, *LATENT_SHAPE))
    angles = 2 * np.pi * np.arange(9) / 8
    expected = np.cos(angles)[:, None, None, None] * x + np.sin(angles)[:, None, None, None] * y
    np.testing.assert_allclose(frames, expected, atol=1e-5)
    np.testing.assert_array_equal(explore.circular_noise(LATENT_SHAPE, 8, seed=5), frames[:8])


def test_walk_embeddings_closed_form():
    rng = np.random.default_rng(6)
    embeddings = tuple(rng.standard_normal(s).astype(np.float32) for s in ((1, 5, 8), (1, 5, 8), (1, 4), (1, 4)))
    walked = explore.walk_embeddings(embeddings, 4, step_size=0.5)
    k = np.arange(4)[:, None, None]
    np.testing.assert_allclose(numpy(walked[0]), embeddings[0] + 0.5 * k, atol=1e-6)
    np.testing.assert_allclose(numpy(walked[2]), embeddings[2] + 0.5 * k[:, 0], atol=1e-6)
    assert walked[1] is embeddings[1] and walked[3] is embeddings[3]
    random = numpy(explore.walk_embeddings(embeddings, 3, step_size=0.5, direction="random", seed=1)[0])
    step = random[1] - random[0]
    np.testing.assert_allclose(np.linalg.norm(step), 0.5 * np.sqrt(step.size), rtol=1e-5)  # as long as constant
    np.testing.assert_allclose(random[2] - random[1], step, atol=1e-5)
    with pytest.raises(ValueError, match="direction must be 'constant' or 'random', got 'up'"):
        explore.walk_embeddings(embeddings, 3, direction="up")


@pytest.fixture(scope="module")
def text_to_image(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("explore"))
    build_pipeline(folder, with_t5=False)
    return StableDiffusion3TextToImage.from_preset(folder, image_shape=IMAGE_SHAPE)


def plain(text_to_image, prompt, noise):
    return text_to_image.generate(prompt, num_steps=STEPS, guidance_scale=GUIDANCE, latents=noise[None])


def assert_images_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == np.uint8
    error = np.max(np.abs(actual.astype(int) - expected.astype(int)))
    assert error <= TOLERANCE, f"max abs difference {error} > {TOLERANCE} / 255"


def test_prompt_interpolation_ends_are_the_two_prompts(text_to_image):
    frames = explore.interpolate_prompts(
        text_to_image, PROMPTS[0], PROMPTS[1], 5, seed=7, num_steps=STEPS, guidance_scale=GUIDANCE, batch_size=2
    )
    noise = text_to_image.noise(1, 7)[0]
    assert frames.shape == (5, *IMAGE_SHAPE)
    assert_images_close(frames[0], plain(text_to_image, PROMPTS[0], noise))
    assert_images_close(frames[-1], plain(text_to_image, PROMPTS[1], noise))
    assert np.abs(frames[2].astype(int) - frames[0]).max() > TOLERANCE  # the middle is neither end


def test_grid_corners_are_the_four_prompts(text_to_image):
    frames = explore.interpolation_grid(text_to_image, PROMPTS, 3, seed=8, num_steps=STEPS,
                                        guidance_scale=GUIDANCE, batch_size=2)
    noise = text_to_image.noise(1, 8)[0]
    assert frames.shape == (9, *IMAGE_SHAPE)
    for index, prompt in zip((0, 2, 6, 8), PROMPTS):
        assert_images_close(frames[index], plain(text_to_image, prompt, noise))


def test_circular_walk_loops_back_to_the_plain_image(text_to_image):
    options = dict(seed=9, num_steps=STEPS, guidance_scale=GUIDANCE, batch_size=2, include_end=True)
    frames = explore.circular_walk(text_to_image, PROMPTS[0], 4, **options)
    assert frames.shape == (5, *IMAGE_SHAPE)
    assert_images_close(frames[4], frames[0])
    assert_images_close(frames[0], text_to_image.generate(PROMPTS[0], num_steps=STEPS, guidance_scale=GUIDANCE, seed=9))
    noise = explore.circular_noise(text_to_image.backbone.latent_shape, 4, seed=9)
    for k in (1, 2):  # frames in order: frame k comes from noise frame k
        assert_images_close(frames[k], plain(text_to_image, PROMPTS[0], noise[k]))
    np.testing.assert_array_equal(explore.circular_walk(text_to_image, PROMPTS[0], 4, **options), frames)


def test_generate_from_embeddings_pads_batches_without_recompiling(text_to_image):
    embeddings = text_to_image.encode(PROMPTS[:1], [""])
    walk = explore.walk_embeddings(embeddings, 5, step_size=0.05)
    noise = explore.frame_noise(LATENT_SHAPE, 5, "varying", seed=3)
    options = dict(num_steps=STEPS, guidance_scale=GUIDANCE, batch_size=2)
    first_two = (walk[0][:2], walk[1], walk[2][:2], walk[3])
    explore.generate_from_embeddings(text_to_image, noise[:2], first_two, **options)  # compiles for batch 2
    traces = text_to_image.compiled.traces
    frames = explore.generate_from_embeddings(text_to_image, noise, walk, **options)  # 3 batches, last padded
    # One program for every batch: no new trace on jax / tensorflow; torch runs eagerly (one per call).
    assert text_to_image.compiled.traces - traces == (3 if keras.config.backend() == "torch" else 0)
    assert frames.shape == (5, *IMAGE_SHAPE)
    tiled = tuple(np.repeat(keras.ops.convert_to_numpy(e), 5 // e.shape[0], axis=0) for e in walk)
    reference = text_to_image.generate(embeddings=tiled, latents=noise, num_steps=STEPS, guidance_scale=GUIDANCE)
    assert_images_close(frames, reference)
    backbone_frames = explore.generate_from_embeddings(text_to_image.backbone, noise[4:], walk, **options)
    assert backbone_frames.shape == (5, *IMAGE_SHAPE)  # batch-1 noise is shared by the 5 frames
    assert_images_close(backbone_frames[4], frames[4])
    with pytest.raises(ValueError, match=r"batch 1 or one common N, got batches \[2, 5\]"):
        explore.generate_from_embeddings(text_to_image, noise[:2], walk, **options)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        explore.generate_from_embeddings(text_to_image, noise, walk, batch_size=0)
