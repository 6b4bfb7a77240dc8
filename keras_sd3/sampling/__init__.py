"""Sampling: the flow-matching schedules, the samplers' updates, noising and guidance, as pure functions."""

from keras_sd3.keras_backend import require

require()  # a clear error for a missing or unknown backend, before Keras is imported

from keras_sd3.sampling.flow_match import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    euler_step,
    shift_sigma,
    sigma,
    sigma_to_timestep,
    timestep,
)
from keras_sd3.sampling.flow_match import DEFAULT_SHIFT
from keras_sd3.sampling.guidance import SkipLayerGuidance, classifier_free_guidance
from keras_sd3.sampling.samplers import (
    SAMPLERS,
    check_sampler,
    dpm_sigma,
    dpm_timesteps,
    dpm_update,
    schedule_sigma,
    timestep_table,
)
from keras_sd3.sampling.step_cache import StepCache, check_step_cache
