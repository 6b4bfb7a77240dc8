"""VAE parity with diffusers' AutoencoderKL (posterior mean and decoder)."""

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, LATENT_SHAPE, assert_close, to_nchw, to_nhwc

from keras_sd3.models import StableDiffusion3Backbone


@pytest.fixture(scope="module")
def loaded(sd3_reference):
    folder, _, vae = sd3_reference
    return StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE), vae


def test_encode_mean_matches_diffusers(loaded):
    # Tolerance: max abs error <= 1e-4 x max |reference| in float32.
    backbone, vae = loaded
    images = np.random.default_rng(0).uniform(-1, 1, (2, *IMAGE_SHAPE)).astype("float32")
    with torch.no_grad():
        expected = to_nhwc(vae.encode(to_nchw(images)).latent_dist.mean)
    assert_close(keras.ops.convert_to_numpy(backbone.vae.encode(images)), expected)


def test_decode_matches_diffusers(loaded):
    backbone, vae = loaded
    latents = np.random.default_rng(1).standard_normal((2, *LATENT_SHAPE)).astype("float32")
    with torch.no_grad():
        expected = to_nhwc(vae.decode(to_nchw(latents)).sample)
    assert_close(keras.ops.convert_to_numpy(backbone.vae.decode(latents)), expected)


def test_steps_apply_the_sd3_shift_and_scale(loaded):
    # encode_image_step = (mean - 0.0609) * 1.5305 ; decode_step(z) = decoder(z / 1.5305 + 0.0609).
    backbone, vae = loaded
    images = np.random.default_rng(2).uniform(-1, 1, (1, *IMAGE_SHAPE)).astype("float32")
    with torch.no_grad():
        mean = vae.encode(to_nchw(images)).latent_dist.mean
        expected_latents = (mean - 0.0609) * 1.5305
        expected_images = vae.decode(expected_latents / 1.5305 + 0.0609).sample
    latents = backbone.encode_image_step(images)
    assert_close(keras.ops.convert_to_numpy(latents), to_nhwc(expected_latents))
    assert_close(keras.ops.convert_to_numpy(backbone.decode_step(latents)), to_nhwc(expected_images))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_upsample_conv_is_nearest_upsampling_then_a_conv(dtype, tolerance):
    """`upsample_conv` (the four output phases as one conv on the small map) vs torch's nearest x2
    interpolation then a 3x3 conv with padding 1: float32 within 1e-5 of the largest value; bfloat16
    within 2e-2 (its 8-bit mantissa; the summed kernel taps are rounded once more)."""
    from keras_sd3.backend import upsample_conv

    rng = np.random.default_rng(0)
    x, kernel, bias = (rng.standard_normal(s).astype("float32") for s in ((2, 5, 7, 8), (3, 3, 8, 6), (6,)))
    reference = torch.nn.functional.conv2d(
        torch.nn.functional.interpolate(to_nchw(x), scale_factor=2, mode="nearest"),
        torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), torch.from_numpy(bias), padding=1,
    )
    cast = (lambda a: keras.ops.cast(a, dtype))
    out = upsample_conv(cast(x), cast(kernel), cast(bias))
    assert tuple(out.shape) == (2, 10, 14, 6) and keras.backend.standardize_dtype(out.dtype) == dtype
    expected = to_nhwc(reference)
    actual = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))
    assert np.abs(actual - expected).max() <= tolerance * np.abs(expected).max()
