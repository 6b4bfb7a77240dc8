"""Latent-space exploration (the "walk through latent space" guide): slerp paths between prompts, grids,
walks around a prompt and loopable walks in noise space, generated in compiled fixed-size batches."""

from keras_sd3.keras_backend import require

require()  # a clear error for a missing or unknown backend, before Keras is imported

from keras_sd3.explore.interpolation import (
    circular_noise,
    frame_noise,
    grid_embeddings,
    interpolate_embeddings,
    lerp,
    slerp,
    walk_embeddings,
)
from keras_sd3.explore.walks import (
    circular_walk,
    generate_from_embeddings,
    interpolate_prompts,
    interpolation_grid,
    walk_around_prompt,
)
