"""Sampling: the flow-matching schedule, Euler step, noising and guidance, as pure functions."""

from keras_sd3.sampling.flow_match import (
    add_noise,
    classifier_free_guidance,
    euler_step,
    shift_sigma,
    sigma,
    sigma_to_timestep,
    timestep,
)
