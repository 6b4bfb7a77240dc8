"""The samplers' schedules and updates, as pure functions of `(step, num_steps)` like `flow_match`.

- "euler": diffusers' `FlowMatchEulerDiscreteScheduler` (`flow_match.sigma`, `flow_match.euler_step`).
- "heun": diffusers' `FlowMatchHeunDiscreteScheduler`: the Euler schedule; each step but the last
  averages the velocity at both ends of the step (2N - 1 model calls for N steps).
- "dpmpp_2m": diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True,
  prediction_type="flow_prediction", flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2)`:
  noise levels `shift(0.999 (N - i) / N)` then 0, the model fed the whole-number timestep
  `floor(1000 sigma)` (`dpm_timesteps`), and the DPM-Solver++ update of the predicted clean latents `x0 = x - sigma v`,
  second order (midpoint) from the previous step's `x0` except at the first and the last step.

With alpha = 1 - sigma (the flow path), the first-order update `(s_t / s_s) x - alpha_t (e^-h - 1) x0`
(h = lambda_t - lambda_s, lambda = log(alpha / sigma)) is written as `r x + (alpha_t - r alpha_s) x0`,
r = s_t / s_s, which is the same number and stays finite at the last step (s_t = 0 gives x0).
"""

import numpy as np
from keras import ops

from keras_sd3.sampling.flow_match import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS, shift_sigma, sigma

SAMPLERS = ("euler", "heun", "dpmpp_2m")


def check_sampler(name):
    """The sampler's name, or a ValueError naming the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}.")
    return name


def dpm_sigma(step, num_steps, shift=DEFAULT_SHIFT):
    """DPM-Solver's flow noise level before step `step` of `num_steps` (0 at `num_steps`), float32."""
    step, num_steps = ops.cast(step, "float32"), ops.cast(num_steps, "float32")
    fraction = (1.0 - 1.0 / NUM_TRAIN_TIMESTEPS) * (num_steps - step) / num_steps
    return ops.where(step >= num_steps, 0.0, shift_sigma(fraction, shift))


def schedule_sigma(sampler, step, num_steps, shift=DEFAULT_SHIFT):
    """The sampler's noise level before step `step` of `num_steps`."""
    return dpm_sigma(step, num_steps, shift) if sampler == "dpmpp_2m" else sigma(step, num_steps, shift)


def dpm_timesteps(num_steps, shift=DEFAULT_SHIFT):
    """The whole-number timesteps DPM-Solver feeds the model, `floor(1000 sigma_i)` for i < num_steps.

    Computed on the host in float64 as diffusers does: its rounding decides the floor where
    `1000 sigma` is a whole number (1 step at shift 1: 332, not 333), which float32 cannot reproduce.

    Returns:
        (num_steps,) float32.
    """
    noise = 1.0 - np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
    sigmas = np.flip(shift * noise / (1.0 + (shift - 1.0) * noise))[:-1]
    return (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64).astype(np.float32)


def timestep_table(sampler, num_steps, shift=DEFAULT_SHIFT):
    """The model timesteps a compiled loop reads by step index: DPM-Solver's, padded with zeros to a
    length that changes only past 1023 steps (so that the loop is not recompiled); (1,) zeros for
    the other samplers, which compute theirs from sigma."""
    if sampler != "dpmpp_2m":
        return np.zeros((1,), np.float32)
    table = np.zeros((max(1024, 1 << int(num_steps).bit_length()),), np.float32)
    table[:num_steps] = dpm_timesteps(num_steps, shift)
    return table


def dpm_update(x, x0, previous_x0, sigma_previous, sigma_now, sigma_next):
    """One DPM-Solver++(2M) step from `sigma_now` to `sigma_next`, in float32.

    Args:
        x: latents at `sigma_now`; x0: their predicted clean latents.
        previous_x0, sigma_previous: the previous step's `x0` and noise level; `sigma_previous <= 0`
            means there is none (the first step), which makes the step first order, as does
            `sigma_next == 0` (the last step).
    """
    x, x0, previous_x0 = (ops.cast(a, "float32") for a in (x, x0, previous_x0))
    sigma_previous, sigma_now, sigma_next = (ops.convert_to_tensor(s, "float32")
                                             for s in (sigma_previous, sigma_now, sigma_next))
    ratio = sigma_next / sigma_now
    coefficient = (1.0 - sigma_next) - ratio * (1.0 - sigma_now)  # alpha_t - r alpha_s = -alpha_t (e^-h - 1)
    second_order = ops.logical_and(sigma_previous > 0.0, sigma_next > 0.0)

    def log_snr(s):  # lambda = log(alpha / sigma); only evaluated where 0 < s < 1
        s = ops.clip(s, 1e-12, 1.0 - 1e-7)
        return ops.log(1.0 - s) - ops.log(s)

    h = log_snr(sigma_next) - log_snr(sigma_now)
    h_previous = log_snr(sigma_now) - log_snr(sigma_previous)
    correction = ops.where(second_order, 0.5 * h / ops.where(second_order, h_previous, 1.0), 0.0)
    return ratio * x + coefficient * (x0 + correction * (x0 - previous_x0))
