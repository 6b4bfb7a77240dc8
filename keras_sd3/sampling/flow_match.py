"""Rectified-flow sampling for SD3 as pure functions of `(step, num_steps)` (SPEC §5).

Nothing is cached: `sigma(step, num_steps)` is computed from its two arguments, which may be Python
numbers or (traced) tensors, so one compiled loop serves any number of steps. All arithmetic is float32.
It reproduces diffusers' `FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(num_steps)`.
"""

from keras import ops

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 3.0


def shift_sigma(sigma, shift=DEFAULT_SHIFT):
    """The SD3 resolution shift `s * x / (1 + (s - 1) * x)`."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigma(step, num_steps, shift=DEFAULT_SHIFT):
    """Noise level before step `step` of `num_steps`; `sigma(num_steps, num_steps) == 0`.

    Args:
        step: int or int tensor in [0, num_steps].
        num_steps: int or int tensor >= 1.
        shift: the schedule shift (3.0 for every SD3 / SD3.5 model).

    Returns:
        A float32 scalar tensor.
    """
    step = ops.cast(step, "float32")
    num_steps = ops.cast(num_steps, "float32")
    sigma_max = shift_sigma(1.0, shift)
    sigma_min = shift_sigma(1.0 / NUM_TRAIN_TIMESTEPS, shift)
    fraction = step / ops.maximum(num_steps - 1.0, 1.0)
    linear = sigma_max * (1.0 - fraction) + sigma_min * fraction  # diffusers' linspace, already shifted once
    return ops.where(step >= num_steps, 0.0, shift_sigma(linear, shift))


def sigma_to_timestep(sigma_value):
    """The MMDiT timestep input for a noise level: `1000 * sigma`, float32."""
    return NUM_TRAIN_TIMESTEPS * ops.cast(sigma_value, "float32")


def timestep(step, num_steps, shift=DEFAULT_SHIFT):
    """The MMDiT timestep input before step `step` of `num_steps`."""
    return sigma_to_timestep(sigma(step, num_steps, shift))


def euler_step(latents, velocity, sigma_now, sigma_next):
    """One Euler step of the flow ODE: `x + (sigma_next - sigma_now) * v`, in float32."""
    latents = ops.cast(latents, "float32")
    return latents + (sigma_next - sigma_now) * ops.cast(velocity, "float32")


def add_noise(latents, noise, sigma_now):
    """Noised latents on the flow path: `sigma * noise + (1 - sigma) * latents`, in float32."""
    latents, noise = ops.cast(latents, "float32"), ops.cast(noise, "float32")
    return sigma_now * noise + (1.0 - sigma_now) * latents
