"""MMDiT parity with diffusers' SD3Transformer2DModel (SD3, SD3.5-Medium-like, SD3.5-Large-like)."""

import keras
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, assert_close, random_inputs, reference_velocity

from keras_sd3.models import StableDiffusion3Backbone

TIMESTEPS = np.array([1000.0, 37.5], dtype="float32")


@pytest.fixture(scope="module")
def loaded(reference):
    variant, folder, transformer, _ = reference
    return StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE), transformer


@pytest.mark.parametrize("skip_layers", [(), (1,), (0, 2)])
def test_velocity_matches_diffusers(loaded, skip_layers):
    # Tolerance: max abs error <= 1e-4 x max |reference| in float32.
    backbone, transformer = loaded
    latents, context, pooled = random_inputs()
    expected = reference_velocity(transformer, latents, context, pooled, TIMESTEPS, list(skip_layers) or None)
    actual = backbone.diffuser(latents, context, pooled, TIMESTEPS, skip_layers=skip_layers)
    assert_close(keras.ops.convert_to_numpy(actual), expected)


def test_skip_layers_change_the_output(loaded):
    backbone, _ = loaded
    latents, context, pooled = random_inputs()
    full = keras.ops.convert_to_numpy(backbone.diffuser(latents, context, pooled, TIMESTEPS))
    skipped = keras.ops.convert_to_numpy(backbone.diffuser(latents, context, pooled, TIMESTEPS, skip_layers=(1,)))
    assert np.max(np.abs(full - skipped)) > 1e-2


def test_square_and_smaller_latents_match_diffusers(loaded):
    # Any latent size that fits the position table: here 4 x 4 latents (centre crop of the 12 x 12 table).
    backbone, transformer = loaded
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((1, 4, 4, 16)).astype("float32")
    _, context, pooled = random_inputs(batch=1)
    expected = reference_velocity(transformer, latents, context, pooled, TIMESTEPS[:1])
    actual = backbone.diffuser(latents, context, pooled, TIMESTEPS[:1])
    assert_close(keras.ops.convert_to_numpy(actual), expected)


def test_latents_larger_than_position_table_raise(loaded):
    backbone, _ = loaded
    latents = np.zeros((1, 26, 4, 16), "float32")  # 13 tokens high > 12
    _, context, pooled = random_inputs(batch=1)
    with pytest.raises(ValueError, match="at most 24"):
        backbone.diffuser(latents, context, pooled, TIMESTEPS[:1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_stays_close_to_float32(reference, dtype):
    # Low-precision compute (norms and softmax in float32) must stay within 5e-2 x max |reference|.
    variant, folder, transformer, _ = reference
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE, dtype=dtype)
    assert backbone.diffuser.transformer_blocks[0].attn.to_q.kernel.dtype == dtype
    latents, context, pooled = random_inputs()
    velocity = backbone.predict_velocity(latents, context, pooled, 0.5)
    assert keras.backend.standardize_dtype(velocity.dtype) == "float32"
    timesteps = np.array([500.0, 500.0], "float32")
    expected = reference_velocity(transformer, latents, context, pooled, timesteps)
    assert_close(keras.ops.convert_to_numpy(velocity), expected, rel=5e-2)
