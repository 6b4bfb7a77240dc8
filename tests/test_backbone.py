"""The backbone's step API: denoise_step vs diffusers, and the guide's compiled fori_loop pattern."""

import itertools

import keras
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, assert_close, random_inputs, reference_velocity

from keras_sd3 import sampling
from keras_sd3.models import StableDiffusion3Backbone


@pytest.fixture(scope="module")
def loaded(sd3_reference):
    folder, transformer, _ = sd3_reference
    return StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE), transformer


def embeddings(seed=0):
    latents, positive, positive_pooled = random_inputs(batch=1, seed=seed)
    _, negative, negative_pooled = random_inputs(batch=1, seed=seed + 100)
    return latents, (positive, negative, positive_pooled, negative_pooled)


@pytest.mark.parametrize("step", [0, 5])
def test_denoise_step_without_guidance(loaded, step):
    # latents + (sigma_{i+1} - sigma_i) * v with diffusers' v; tolerance 1e-4 x max |reference|.
    backbone, transformer = loaded
    latents, (positive, negative, positive_pooled, negative_pooled) = embeddings()
    num_steps = 8
    sigma, sigma_next = float(sampling.sigma(step, num_steps)), float(sampling.sigma(step + 1, num_steps))
    timestep = np.array([1000.0 * sigma], "float32")
    v = reference_velocity(transformer, latents, positive, positive_pooled, timestep)
    expected = latents + (sigma_next - sigma) * v
    actual = backbone.denoise_step(latents, (positive, negative, positive_pooled, negative_pooled), step, num_steps)
    assert_close(keras.ops.convert_to_numpy(actual), expected)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5, 7.0])
def test_denoise_step_with_guidance(loaded, guidance_scale):
    backbone, transformer = loaded
    latents, embeds = embeddings(seed=1)
    positive, negative, positive_pooled, negative_pooled = embeds
    step, num_steps = 2, 28
    sigma, sigma_next = float(sampling.sigma(step, num_steps)), float(sampling.sigma(step + 1, num_steps))
    timestep = np.array([1000.0 * sigma], "float32")
    v_pos = reference_velocity(transformer, latents, positive, positive_pooled, timestep)
    v_neg = reference_velocity(transformer, latents, negative, negative_pooled, timestep)
    expected = latents + (sigma_next - sigma) * (v_neg + guidance_scale * (v_pos - v_neg))
    actual = backbone.denoise_step(latents, embeds, step, num_steps, guidance_scale)
    assert_close(keras.ops.convert_to_numpy(actual), expected)


def test_add_noise_step(loaded):
    backbone, _ = loaded
    rng = np.random.default_rng(0)
    latents, noise = rng.standard_normal((2, 1, 6, 10, 16)).astype("float32")
    sigma = float(sampling.sigma(3, 10))
    actual = keras.ops.convert_to_numpy(backbone.add_noise_step(latents, noise, 3, 10))
    np.testing.assert_allclose(actual, sigma * noise + (1 - sigma) * latents, atol=1e-6)


def generate_with_latents_and_embeddings(backbone, latents, embeds, num_steps, guidance_scale):
    """The latent-walk guide's function: a fori_loop over denoise_step, then decode."""

    def body_fun(step, latents):
        return backbone.denoise_step(latents, embeds, step, num_steps, guidance_scale)

    latents = keras.ops.fori_loop(0, num_steps, body_fun, latents)
    return backbone.decode_step(latents)


def compiled(backbone):
    """The guide's per-backend compilation of `generate_with_latents_and_embeddings`."""
    backend = keras.config.backend()
    if backend == "torch":
        import torch

        @torch.no_grad()
        def function(*args):
            return generate_with_latents_and_embeddings(backbone, *args)

        return function
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda *args: generate_with_latents_and_embeddings(backbone, *args), jit_compile=True)
    import jax

    @jax.jit
    def compiled_function(state, *args):
        trainable, non_trainable = state
        mapping = itertools.chain(
            zip(backbone.trainable_variables, trainable), zip(backbone.non_trainable_variables, non_trainable)
        )
        with keras.StatelessScope(state_mapping=mapping):
            return generate_with_latents_and_embeddings(backbone, *args)

    def function(*args):
        state = (
            [v.value for v in backbone.trainable_variables],
            [v.value for v in backbone.non_trainable_variables],
        )
        return compiled_function(state, *args)

    return function


def test_compiled_loop_matches_eager_steps(loaded):
    # The compiled loop with traced num_steps / guidance equals explicit eager steps (1e-4 relative).
    backbone, _ = loaded
    latents, embeds = embeddings(seed=2)
    function = compiled(backbone)
    for num_steps, guidance_scale in ((3, 5.0), (4, 2.5)):
        expected = latents
        for step in range(num_steps):
            expected = backbone.denoise_step(expected, embeds, step, num_steps, guidance_scale)
        expected = keras.ops.convert_to_numpy(backbone.decode_step(expected))
        num_steps_t = keras.ops.convert_to_tensor(num_steps, "int32")
        guidance_t = keras.ops.convert_to_tensor(guidance_scale, "float32")
        actual = keras.ops.convert_to_numpy(function(latents, embeds, num_steps_t, guidance_t))
        assert actual.shape == (1, *IMAGE_SHAPE)
        assert_close(actual, expected)


def test_invalid_image_shape_raises(sd3_reference):
    folder, _, _ = sd3_reference
    with pytest.raises(ValueError, match="multiples of 16"):
        StableDiffusion3Backbone.from_preset(folder, image_shape=(40, 80, 3))
    with pytest.raises(ValueError, match="at most 192"):
        StableDiffusion3Backbone.from_preset(folder, image_shape=(208, 64, 3))


def test_config_round_trip(loaded):
    backbone, _ = loaded
    clone = StableDiffusion3Backbone.from_config(backbone.get_config())
    assert clone.mmdit_config == backbone.mmdit_config and clone.vae_config == backbone.vae_config
    assert len(clone.weights) == len(backbone.weights)
