"""Flow-matching schedule and steps vs diffusers' FlowMatchEulerDiscreteScheduler(shift=3.0)."""

import keras
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from keras_sd3 import sampling


def reference_schedule(num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
def test_sigmas_and_timesteps_match_diffusers(num_steps):
    # Tolerance: 1e-6 absolute on sigmas, 1e-6 relative on timesteps (= 1000 sigma).
    scheduler = reference_schedule(num_steps)
    sigmas = np.array([float(sampling.sigma(i, num_steps)) for i in range(num_steps + 1)])
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=0, atol=1e-6)
    timesteps = np.array([float(sampling.timestep(i, num_steps)) for i in range(num_steps)])
    np.testing.assert_allclose(timesteps, scheduler.timesteps.numpy(), rtol=1e-6)


def test_sigmas_closed_form():
    # SPEC §5: sigma_min = shift(0.001) and the printed 28-step values.
    assert abs(sampling.shift_sigma(0.001) - 0.0029940) < 1e-7
    sigmas = [float(sampling.sigma(i, 28)) for i in (0, 1, 2, 25, 26, 27, 28)]
    np.testing.assert_allclose(sigmas, [1.0, 0.98738, 0.97411, 0.19983, 0.11091, 0.008929, 0.0], atol=5e-6)


def test_sigma_accepts_tensors():
    step, num_steps = keras.ops.convert_to_tensor(3), keras.ops.convert_to_tensor(28)
    assert abs(float(sampling.sigma(step, num_steps)) - float(sampling.sigma(3, 28))) == 0.0


def test_euler_step_and_noising_match_diffusers():
    rng = np.random.default_rng(0)
    sample, velocity, noise = (rng.standard_normal((1, 16, 4, 4)).astype("float32") for _ in range(3))
    num_steps, index = 10, 3
    scheduler = reference_schedule(num_steps)
    t = scheduler.timesteps[index]
    expected_step = scheduler.step(torch.from_numpy(velocity), t, torch.from_numpy(sample), return_dict=False)[0]
    expected_noised = scheduler.scale_noise(torch.from_numpy(sample), t[None], torch.from_numpy(noise))
    step = sampling.euler_step(
        sample, velocity, sampling.sigma(index, num_steps), sampling.sigma(index + 1, num_steps)
    )
    noised = sampling.add_noise(sample, noise, sampling.sigma(index, num_steps))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(step), expected_step.numpy(), atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(noised), expected_noised.numpy(), atol=1e-6)


def test_classifier_free_guidance_formula():
    positive, negative = np.array([1.0, 2.0], "float32"), np.array([0.5, -1.0], "float32")
    guided = keras.ops.convert_to_numpy(sampling.classifier_free_guidance(positive, negative, 7.0))
    np.testing.assert_allclose(guided, [0.5 + 7.0 * 0.5, -1.0 + 7.0 * 3.0])
