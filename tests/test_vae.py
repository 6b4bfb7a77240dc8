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
