"""Samplers vs diffusers: `heun` = FlowMatchHeunDiscreteScheduler, `dpmpp_2m` = DPMSolverMultistepScheduler
(flow sigmas, flow prediction, dpmsolver++, order 2), each plugged into diffusers' StableDiffusion3Pipeline on
the tiny random checkpoint: schedules, every intermediate latent and the images."""

import keras
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, LATENT_SHAPE, assert_close, to_nchw, to_nhwc
from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, StableDiffusion3Pipeline
from test_tasks import assert_images_close, build_tasks, reference

from keras_sd3 import sampling

H, W, _ = IMAGE_SHAPE
PROMPTS = ["a red circle on a blue background", "a small green triangle in the top left"]
LATENT_TOLERANCE = 1e-4  # relative, every intermediate latent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tasks(str(tmp_path_factory.mktemp("samplers")))


def dpm_scheduler(shift=3.0):
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                       algorithm_type="dpmsolver++", solver_order=2)


def heun_scheduler(shift=3.0):
    return FlowMatchHeunDiscreteScheduler(shift=shift)


@pytest.mark.parametrize("shift", [3.0, 1.0, 6.0])
def test_dpm_schedule_matches_diffusers(shift):
    """Noise levels within 1e-6 and the model's whole-number timesteps exactly, for 1..60 steps."""
    for num_steps in range(1, 61):
        scheduler = dpm_scheduler(shift)
        scheduler.set_timesteps(num_steps)
        steps = np.arange(num_steps + 1)
        sigmas = keras.ops.convert_to_numpy(sampling.dpm_sigma(steps, num_steps, shift))
        np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=0, atol=1e-6, err_msg=f"{num_steps} steps")
        np.testing.assert_array_equal(sampling.dpm_timesteps(num_steps, shift), scheduler.timesteps.numpy(),
                                      err_msg=f"{num_steps} steps")
        table = sampling.timestep_table("dpmpp_2m", num_steps, shift)
        assert table.shape == (1024,) and not np.any(table[num_steps:])


@pytest.mark.parametrize("num_steps", [1, 2, 8, 28])
def test_heun_schedule_is_the_euler_schedule(num_steps):
    """diffusers' Heun sigmas are Euler's with the inner ones repeated: s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0."""
    scheduler = heun_scheduler()
    scheduler.set_timesteps(num_steps)
    ours = keras.ops.convert_to_numpy(sampling.schedule_sigma("heun", np.arange(num_steps + 1), num_steps))
    expected = np.concatenate([ours[:1], np.repeat(ours[1:-1], 2), ours[-1:]])
    np.testing.assert_allclose(scheduler.sigmas.numpy(), expected, rtol=0, atol=1e-6)
    assert len(scheduler.timesteps) == 2 * num_steps - 1


def test_dpm_update_closed_form():
    """First order at sigma_next = 0 returns x0; the second-order correction is 0.5 h / h_prev (x0 - x0_prev)."""
    x, x0, previous = (np.full((1, 2), v, np.float32) for v in (3.0, 1.0, 0.5))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(sampling.dpm_update(x, x0, previous, 0.8, 0.5, 0.0)), x0)
    s_prev, s, t = 0.9, 0.6, 0.3
    lam = lambda v: np.log((1 - v) / v)  # noqa: E731
    h, h_prev = lam(t) - lam(s), lam(s) - lam(s_prev)
    expected = (t / s) * x - (1 - t) * np.expm1(-h) * (x0 + 0.5 * h / h_prev * (x0 - previous))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(sampling.dpm_update(x, x0, previous, s_prev, s, t)),
                               expected, rtol=1e-6)


def _diffusers_latents(pipe, scheduler, latents, **kwargs):
    """(images, the latents after every scheduler step) of diffusers' pipeline with `scheduler`."""
    seen = []

    def record(_, step, timestep, tensors):
        seen.append(to_nhwc(tensors["latents"].clone()))
        return tensors

    swapped = StableDiffusion3Pipeline(**{**pipe.components, "scheduler": scheduler})
    images = reference(swapped, StableDiffusion3Pipeline, "pipeline_stable_diffusion_3", latents,
                       latents=to_nchw(latents), callback_on_step_end=record, height=H, width=W, **kwargs)
    return images, seen


@pytest.mark.parametrize("sampler, num_steps, guidance_scale", [("heun", 4, 5.0), ("dpmpp_2m", 6, 5.0),
                                                                ("dpmpp_2m", 3, 1.0), ("heun", 1, 5.0)])
def test_samplers_match_diffusers(setup, sampler, num_steps, guidance_scale):
    pipe, tasks = setup
    latents = np.random.default_rng(3).standard_normal((len(PROMPTS), *LATENT_SHAPE)).astype(np.float32)
    ours_latents = []
    ours = tasks["text"].generate(PROMPTS, num_steps=num_steps, guidance_scale=guidance_scale, latents=latents,
                                  sampler=sampler, callback=lambda step, n, x: ours_latents.append(x))
    scheduler = heun_scheduler() if sampler == "heun" else dpm_scheduler()
    expected, seen = _diffusers_latents(pipe, scheduler, latents, prompt=PROMPTS,
                                        num_inference_steps=num_steps, guidance_scale=guidance_scale)
    if sampler == "heun":  # diffusers' callback also fires after each predictor half-step
        assert len(seen) == 2 * num_steps - 1
        seen = seen[1::2] + seen[-1:] if num_steps > 1 else seen
    assert len(seen) == len(ours_latents) == num_steps
    for a, e in zip(ours_latents, seen):
        assert_close(a, e, rel=LATENT_TOLERANCE)
    assert_images_close(ours, expected)


def test_samplers_differ_and_do_not_recompile(setup):
    _, tasks = setup
    task = tasks["text"]
    latents = np.random.default_rng(4).standard_normal((1, *LATENT_SHAPE)).astype(np.float32)
    images = {s: task.generate("a cat", num_steps=4, latents=latents, sampler=s) for s in sampling.SAMPLERS}
    assert np.any(images["euler"] != images["heun"]) and np.any(images["euler"] != images["dpmpp_2m"])
    traces = task.compiled.traces
    for sampler in ("heun", "dpmpp_2m"):
        task.generate("a dog", num_steps=6, guidance_scale=3.0, latents=latents, sampler=sampler)
    if keras.config.backend() != "torch":  # torch runs eagerly: nothing is traced
        assert task.compiled.traces == traces, "a new prompt, guidance or num_steps recompiled a sampler"


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="ddim"), "sampler must be one of euler, heun, dpmpp_2m, got 'ddim'"),
    (dict(shift=0), "shift must be a number > 0"),
    (dict(shift="3"), "shift must be a number > 0"),
])
def test_bad_sampler_options(setup, kwargs, message):
    _, tasks = setup
    with pytest.raises(ValueError, match=message):
        tasks["text"].generate("a cat", num_steps=2, **kwargs)
    with pytest.raises(ValueError, match=message):
        tasks["image"].generate({"images": np.zeros(IMAGE_SHAPE, np.float32), "prompts": "a cat"}, **kwargs)
