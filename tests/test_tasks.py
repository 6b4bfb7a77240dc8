"""Generation tasks vs diffusers' SD3 pipelines end to end, compilation, and input validation."""

import contextlib
from unittest import mock

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, LATENT_SHAPE, assert_close, to_nchw, to_nhwc
from tiny_text import build_pipeline

from keras_sd3.models import (
    StableDiffusion3ImageToImage,
    StableDiffusion3Inpaint,
    StableDiffusion3TextToImage,
)

H, W, _ = IMAGE_SHAPE
TOLERANCE = 2 / 255  # max abs difference of float32 images in [0, 1]
PROMPTS = ["a red circle on a blue background", "a small green triangle in the top left"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tasks(str(tmp_path_factory.mktemp("tasks")))


def build_tasks(folder):
    """(diffusers pipeline, {"text", "image", "inpaint": keras_sd3 task}) on the tiny checkpoint in `folder`."""
    pipe = build_pipeline(folder, with_t5=True)
    text_to_image = StableDiffusion3TextToImage.from_preset(folder, image_shape=IMAGE_SHAPE)
    backbone, preprocessor = text_to_image.backbone, text_to_image.preprocessor
    tasks = {
        "text": text_to_image,
        "image": StableDiffusion3ImageToImage(backbone, preprocessor),
        "inpaint": StableDiffusion3Inpaint(backbone, preprocessor),
    }
    return pipe, tasks


def noise(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *LATENT_SHAPE)).astype(np.float32)


def stand_in_images(batch, seed=1):
    """Smooth stand-in pictures in [-1, 1] (the guide's photos are not available offline)."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    phases = np.random.default_rng(seed).uniform(0, 6, (batch, 3))
    return np.stack([np.stack([np.sin(3 * x + 2 * y + p) for p in ph], -1) for ph in phases]).astype(np.float32)


def stand_in_masks(batch):
    masks = np.zeros((batch, H, W), bool)
    masks[:, H // 4 : 3 * H // 4, W // 3 :] = True
    return masks


def reference(pipe, cls, module_name, noise_nhwc, **kwargs):
    """Runs a diffusers pipeline with our noise and the VAE posterior mean (as keras_sd3 does)."""
    import importlib

    module = importlib.import_module(f"diffusers.pipelines.stable_diffusion_3.{module_name}")
    patched = cls(**pipe.components)
    patched.set_progress_bar_config(disable=True)
    noise_nchw = to_nchw(noise_nhwc)
    posterior_mean = lambda output, generator=None, sample_mode="sample": output.latent_dist.mean
    with mock.patch.object(module, "randn_tensor", lambda *a, **k: noise_nchw.clone()), mock.patch.object(
        module, "retrieve_latents", posterior_mean, create=True
    ), torch.no_grad():
        output_type = kwargs.pop("output_type_override", "np")
        return patched(output_type=output_type, **kwargs).images


def assert_images_close(ours, expected):
    ours = np.asarray(ours, np.float64) / 255.0
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    error = np.max(np.abs(ours - expected))
    assert error <= TOLERANCE, f"max abs difference {error * 255:.2f}/255 > 2/255"
    assert np.std(expected) > 0.01  # not a blank picture


@pytest.mark.parametrize(
    "prompts, negatives, guidance_scale",
    [(PROMPTS[0], None, 5.0), (PROMPTS, ["blurry", "low quality"], 7.0), (PROMPTS, None, 1.0)],
)
def test_text_to_image_matches_diffusers(setup, prompts, negatives, guidance_scale):
    from diffusers import StableDiffusion3Pipeline

    pipe, tasks = setup
    batch = 1 if isinstance(prompts, str) else len(prompts)
    latents = noise(batch)
    inputs = {"prompts": prompts} if negatives is None else {"prompts": prompts, "negative_prompts": negatives}
    ours = tasks["text"].generate(inputs, num_steps=4, guidance_scale=guidance_scale, latents=latents)
    expected = reference(
        pipe, StableDiffusion3Pipeline, "pipeline_stable_diffusion_3", latents, prompt=prompts,
        negative_prompt=negatives, num_inference_steps=4, guidance_scale=guidance_scale, height=H, width=W,
        latents=to_nchw(latents),
    )
    assert ours.shape == ((H, W, 3) if batch == 1 else (batch, H, W, 3)) and ours.dtype == np.uint8
    assert_images_close(ours if batch > 1 else ours[None], expected)


def test_num_images_matches_diffusers_num_images_per_prompt(setup):
    from diffusers import StableDiffusion3Pipeline

    pipe, tasks = setup
    latents = noise(2 * len(PROMPTS), seed=5)  # images of a prompt next to each other: p0, p0, p1, p1
    ours = tasks["text"].generate(PROMPTS, num_steps=2, guidance_scale=5.0, latents=latents, num_images=2)
    expected = reference(
        pipe, StableDiffusion3Pipeline, "pipeline_stable_diffusion_3", latents, prompt=PROMPTS,
        num_images_per_prompt=2, num_inference_steps=2, guidance_scale=5.0, height=H, width=W,
        latents=to_nchw(latents),
    )
    assert_images_close(ours, expected)


@pytest.mark.parametrize("strength", [0.5, 0.8, 1.0])
def test_image_to_image_matches_diffusers(setup, strength):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe, tasks = setup
    images, eps = stand_in_images(2), noise(2, seed=3)
    inputs = {"images": images, "prompts": PROMPTS, "negative_prompts": ["", "dark"]}
    ours = tasks["image"].generate(inputs, num_steps=6, guidance_scale=4.5, strength=strength, noise=eps)
    expected = reference(
        pipe, StableDiffusion3Img2ImgPipeline, "pipeline_stable_diffusion_3_img2img", eps, prompt=PROMPTS,
        negative_prompt=["", "dark"], image=to_nchw(images), num_inference_steps=6, guidance_scale=4.5, height=H, width=W,
        strength=strength,
    )
    assert_images_close(ours, expected)


@pytest.mark.parametrize("strength, guidance_scale", [(0.6, 7.0), (1.0, 1.0)])
def test_inpaint_matches_diffusers(setup, strength, guidance_scale):
    # diffusers' SD3 inpaint pipeline decodes `latents / scaling_factor` without adding shift_factor
    # (pipeline_stable_diffusion_3_inpaint.py, its final `vae.decode`), unlike its text-to-image and
    # image-to-image pipelines and SPEC §5. So the final latents are compared with diffusers'
    # (`output_type="latent"`, 1e-4 x max |reference|), and the images with those latents decoded
    # by diffusers' VAE with the SD3 formula (2/255).
    from diffusers import StableDiffusion3InpaintPipeline

    pipe, tasks = setup
    images, masks, eps = stand_in_images(2, seed=4), stand_in_masks(2), noise(2, seed=5)
    inputs = {"images": images, "masks": masks, "prompts": PROMPTS}
    options = dict(num_steps=5, guidance_scale=guidance_scale, strength=strength, noise=eps)
    expected_latents = reference(
        pipe, StableDiffusion3InpaintPipeline, "pipeline_stable_diffusion_3_inpaint", eps, prompt=PROMPTS,
        image=to_nchw(images), mask_image=torch.from_numpy(masks[:, None].astype(np.float32)),
        num_inference_steps=5, guidance_scale=guidance_scale, strength=strength, height=H, width=W,
        output_type_override="latent",
    )
    assert_close(tasks["inpaint"].generate(inputs, output="latents", **options), to_nhwc(expected_latents))
    config = pipe.vae.config
    with torch.no_grad():
        decoded = pipe.vae.decode(expected_latents / config.scaling_factor + config.shift_factor).sample
    expected = to_nhwc((decoded / 2 + 0.5).clamp(0, 1))
    assert_images_close(tasks["inpaint"].generate(inputs, **options), expected)


def test_skip_layer_guidance_matches_diffusers(setup):
    from diffusers import StableDiffusion3Pipeline

    from keras_sd3.sampling import SkipLayerGuidance

    pipe, tasks = setup
    latents, slg = noise(1, seed=13), SkipLayerGuidance(layers=(1,), scale=2.8, start=0.01, stop=0.5)
    ours = tasks["text"].generate(PROMPTS[:1], num_steps=6, guidance_scale=5.0, latents=latents, skip_layer_guidance=slg)
    plain = tasks["text"].generate(PROMPTS[:1], num_steps=6, guidance_scale=5.0, latents=latents)
    expected = reference(
        pipe, StableDiffusion3Pipeline, "pipeline_stable_diffusion_3", latents, prompt=PROMPTS[:1],
        num_inference_steps=6, guidance_scale=5.0, height=H, width=W, latents=to_nchw(latents),
        skip_guidance_layers=[1], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
        skip_layer_guidance_stop=0.5,
    )
    assert_images_close(ours, expected)
    assert np.max(np.abs(ours.astype(int) - plain.astype(int))) > 2  # the guidance did something


def test_callback_progress_and_embeddings(setup, capsys):
    # Step-by-step runs (callback / progress bar) and precomputed embeddings give the same images.
    _, tasks = setup
    task, latents = tasks["text"], noise(1, seed=14)
    whole = task.generate(PROMPTS[0], num_steps=4, guidance_scale=3.0, latents=latents)
    seen = []
    stepped = task.generate(PROMPTS[0], num_steps=4, guidance_scale=3.0, latents=latents, progress=True,
                            callback=lambda step, total, x: seen.append((step, total, x.shape)))
    assert seen == [(i, 4, (1, *LATENT_SHAPE)) for i in range(4)]
    assert "step 4/4" in capsys.readouterr().err
    np.testing.assert_allclose(stepped.astype(int), whole.astype(int), atol=1)
    embeddings = task.encode([PROMPTS[0]], [""])
    from_embeddings = task.generate(embeddings=embeddings, num_steps=4, guidance_scale=3.0, latents=latents)
    np.testing.assert_array_equal(from_embeddings[0], whole)


def test_inpaint_keeps_the_unmasked_latents(setup):
    _, tasks = setup
    images, masks = stand_in_images(1, seed=6), stand_in_masks(1)
    latents = tasks["inpaint"].generate(
        {"images": images[0], "masks": masks[0], "prompts": PROMPTS[0]}, num_steps=4, seed=1, output="latents"
    )
    image_latents = keras.ops.convert_to_numpy(tasks["inpaint"].backbone.encode_image_step(images))[0]
    keep = ~masks[0, ::8, ::8]
    # Equal up to the float jitter between the compiled and the eager VAE encoder (1e-5 x max).
    assert_close(latents[keep], image_latents[keep], rel=1e-5)
    assert np.max(np.abs(latents[~keep] - image_latents[~keep])) > 0.1


def test_strength_one_ignores_the_image(setup):
    _, tasks = setup
    eps = noise(1, seed=7)
    outputs = [
        tasks["image"].generate({"images": image, "prompts": PROMPTS[0]}, num_steps=3, strength=1.0, noise=eps)
        for image in (stand_in_images(1, seed=8)[0], -stand_in_images(1, seed=9)[0])
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_same_seed_same_images_and_num_images(setup):
    _, tasks = setup
    a = tasks["text"].generate(PROMPTS, num_steps=2, seed=11, num_images=2)
    b = tasks["text"].generate(PROMPTS, num_steps=2, seed=11, num_images=2)
    c = tasks["text"].generate(PROMPTS, num_steps=2, seed=12, num_images=2)
    assert a.shape == (4, H, W, 3)
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


@contextlib.contextmanager
def encoder_batches(task):
    """The (prompts, negative prompts) batch sizes of each call of `task`'s text program, as a list."""
    batches, original = [], task.compiled.encode_text

    def spy(ids, negative_ids):
        batches.append((len(ids["clip_l"]), len(negative_ids["clip_l"])))
        return original(ids, negative_ids)

    with mock.patch.object(task.compiled, "encode_text", spy):
        yield batches


def test_num_images_encodes_each_prompt_once(setup):
    # diffusers' num_images_per_prompt encodes a prompt once and repeats its embeddings; so do we.
    _, tasks = setup
    with encoder_batches(tasks["text"]) as batches:
        images = tasks["text"].generate(PROMPTS, num_steps=1, seed=11, num_images=3)
    assert batches == [(len(PROMPTS), 1)]  # each prompt once; their empty negative prompts once in all
    assert images.shape == (3 * len(PROMPTS), H, W, 3)


def test_repeated_texts_are_encoded_once_and_match_diffusers(setup):
    # A server's batch: prompts and (mostly empty) negative prompts that repeat.
    pipe, tasks = setup
    prompts, negatives = [PROMPTS[0], PROMPTS[1], PROMPTS[0]], ["", "", "dark"]
    with encoder_batches(tasks["text"]) as batches:
        ours = tasks["text"].encode(prompts, negatives)
    assert batches == [(2, 2)]
    with torch.no_grad():
        expected = pipe.encode_prompt(prompts, prompts, prompts, negative_prompt=negatives)
    for actual, reference in zip(ours, expected):  # (positive, negative, positive_pooled, negative_pooled)
        assert_close(keras.ops.convert_to_numpy(actual), reference.numpy())


def test_changing_prompt_guidance_steps_strength_does_not_recompile(setup):
    _, tasks = setup
    task = tasks["image"]
    images = stand_in_images(1)
    calls = [
        dict(inputs={"images": images, "prompts": "a cat"}, num_steps=3, guidance_scale=3.0, strength=0.5),
        dict(inputs={"images": images, "prompts": "a dog"}, num_steps=5, guidance_scale=7.0, strength=0.9),
        dict(inputs={"images": images, "prompts": "a bird"}, num_steps=4, guidance_scale=2.0, strength=0.7),
    ]
    task.generate(**calls[0])
    traces = task.compiled.traces
    if keras.config.backend() == "torch":
        # torch has nothing to compile: the body runs eagerly, under no_grad.
        from keras_sd3.tasks import loop

        grad_enabled, original = [], loop.run_steps
        spy = lambda *a, **k: grad_enabled.append(torch.is_grad_enabled()) or original(*a, **k)
        with mock.patch.object(loop, "run_steps", spy):
            task.generate(**calls[1])
        assert grad_enabled == [False]
        return
    for call in calls[1:]:
        task.generate(**call)
    assert task.compiled.traces == traces, "a new prompt, guidance, num_steps or strength recompiled"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t["text"].generate("x", num_steps=0), "num_steps must be an integer >= 1"),
        (lambda t: t["text"].generate({"prompt": "x"}), "missing the key"),
        (lambda t: t["text"].generate({"prompts": ["a", "b"], "negative_prompts": ["c", "d", "e"]}),
         "Got 2 prompts but 3 negative prompts"),
        # A one-element list is not broadcast (diffusers raises too); a string is.
        (lambda t: t["text"].generate({"prompts": ["a", "b"], "negative_prompts": ["c"]}),
         "Got 2 prompts but 1 negative prompts"),
        (lambda t: t["text"].generate("x", guidance_scale=-0.5), r"guidance_scale must be a number >= 0 .*-0.5"),
        (lambda t: t["image"].generate({"images": stand_in_images(1), "prompts": "x"}, guidance_scale=-1),
         "guidance_scale must be a number >= 0"),
        (lambda t: t["text"].generate("x", latents=np.zeros((1, 4, 4, 16))), "latents must have shape"),
        (lambda t: t["image"].generate({"images": stand_in_images(1), "prompts": "x"}, strength=1.5), "strength must be in"),
        (lambda t: t["image"].generate({"prompts": "x"}), "missing the key"),
        (lambda t: t["image"].generate({"images": np.zeros((32, 32, 3)), "prompts": "x"}), "images must have shape"),
        (lambda t: t["image"].generate({"images": 3 * stand_in_images(1), "prompts": "x"}), r"values must lie in \[-1"),
        (lambda t: t["image"].generate({"images": stand_in_images(3), "prompts": ["a", "b"]}), "Got 3 images for 2"),
        (lambda t: t["inpaint"].generate({"images": stand_in_images(1), "masks": np.ones((8, 8)), "prompts": "x"}),
         "masks must have shape"),
        (lambda t: t["inpaint"].generate({"images": stand_in_images(1), "prompts": "x"}), "missing the key"),
    ],
)
def test_bad_inputs_raise_clear_errors(setup, call, message):
    _, tasks = setup
    with pytest.raises(ValueError, match=message):
        call(tasks)


def test_nan_latents_raise(setup):
    _, tasks = setup
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        tasks["text"].generate("x", num_steps=1, latents=np.full((1, *LATENT_SHAPE), np.nan, np.float32))


def test_a_string_negative_prompt_is_used_for_every_prompt(setup):
    _, tasks = setup
    latents = noise(2)
    both = tasks["text"].generate({"prompts": PROMPTS, "negative_prompts": "blurry"}, num_steps=1, latents=latents,
                                  output="latents")
    listed = tasks["text"].generate({"prompts": PROMPTS, "negative_prompts": ["blurry"] * 2}, num_steps=1,
                                    latents=latents, output="latents")
    np.testing.assert_array_equal(both, listed)


def test_long_prompts_warn_once_per_encoder_with_the_dropped_count(setup, recwarn):
    pipe, tasks = setup
    preprocessor = tasks["text"].preprocessor
    long_prompt = " ".join(["a red circle on a blue background"] * 40)
    preprocessor.generate_preprocess(["a cat", long_prompt])
    messages = [str(w.message) for w in recwarn if "tokens per prompt" in str(w.message)]
    # The counts come from transformers' tokenizers (what diffusers truncates with), not from ours.
    expected = {}
    for name, tokenizer, specials in (("CLIP-L", pipe.tokenizer, 2), ("CLIP-G", pipe.tokenizer_2, 2),
                                      ("T5", pipe.tokenizer_3, 1)):
        length = preprocessor.t5_tokenizer.sequence_length if name == "T5" else tokenizer.model_max_length
        tokens = len(tokenizer(long_prompt, add_special_tokens=False).input_ids)
        expected[name] = (length, tokens - (length - specials))
    assert len(messages) == 3, messages
    for message, (name, (length, dropped)) in zip(messages, expected.items()):
        assert dropped > 0
        assert message.startswith(f"{name} takes at most {length} tokens") and f"{dropped} tokens of prompt 1" in message
    recwarn.clear()
    preprocessor.generate_preprocess(["a cat"])
    assert not [w for w in recwarn if "tokens per prompt" in str(w.message)]
