"""Latent walks as animations: paths of embeddings and noise -> frames, generated in compiled batches.

Every function returns uint8 frames (N, H, W, 3), ready for `keras_sd3.media`. `model` is a keras_sd3
task (e.g. `StableDiffusion3TextToImage`, which also encodes prompts) or a bare
`StableDiffusion3Backbone` (embeddings only). The `**options` of the prompt functions are those of
`generate_from_embeddings`: `num_steps`, `guidance_scale`, `batch_size`, `progress`.
"""

import numpy as np
from keras import ops

from keras_sd3.distribution import batch_axis_size, pad_batch
from keras_sd3.explore.interpolation import (
    circular_noise,
    frame_noise,
    grid_embeddings,
    interpolate_embeddings,
    walk_embeddings,
)
from keras_sd3.models.backbone import StableDiffusion3Backbone
from keras_sd3.tasks.task import GenerationTask, progress_bar
from keras_sd3.tasks.text_to_image import StableDiffusion3TextToImage


def as_task(model):
    """A task for `model`; a backbone gets one text-to-image task, kept on it so it compiles once."""
    if isinstance(model, GenerationTask):
        return model
    if isinstance(model, StableDiffusion3Backbone):
        if getattr(model, "_explore_task", None) is None:
            model._explore_task = StableDiffusion3TextToImage(model)
        return model._explore_task
    raise TypeError(f"model must be a keras_sd3 task or StableDiffusion3Backbone, got {type(model).__name__}.")


def generate_from_embeddings(model, latents, embeddings, num_steps=None, guidance_scale=None, batch_size=None,
                             progress=False):
    """The latent-walk guide's `generate_with_latents_and_embeddings` for any number of frames.

    Frames are generated `batch_size` at a time by one compiled program (the tasks' loop + decoder):
    the last partial batch is padded with copies of its last frame, so every call has the same shapes
    and nothing recompiles from one batch, or one walk, to the next.

    Args:
        model: a keras_sd3 task or a `StableDiffusion3Backbone`.
        latents: starting noise (N, h, w, C), or (1, h, w, C) shared by all frames.
        embeddings: the 4-tuple `(positive, negative, positive_pooled, negative_pooled)`, each with
            batch N or 1 (shared).
        num_steps: denoising steps (default: the task's preset default, else 28).
        guidance_scale: classifier-free guidance, <= 1 disables it (default: the preset's, else 7).
        batch_size: frames per compiled call (default 4, rounded up to a multiple of the devices' batch
            axis under a `keras.distribution`, whose devices then share each call's frames).
        progress: draw a progress bar (batches) on stderr.

    Returns:
        uint8 (N, H, W, 3) images.
    """
    task = as_task(model)
    if len(embeddings) != 4:
        raise ValueError("embeddings must be the 4-tuple (positive, negative, positive_pooled, negative_pooled).")
    if batch_size is None:
        groups = batch_axis_size()
        batch_size = -(-4 // groups) * groups
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    latents = np.asarray(latents, np.float32)
    task.check_noise(latents, latents.shape[0], "latents")
    tensors = [ops.convert_to_tensor(latents)] + [ops.convert_to_tensor(e) for e in embeddings]
    sizes = {int(x.shape[0]) for x in tensors} - {1}
    if len(sizes) > 1:
        raise ValueError(f"latents and embeddings must have batch 1 or one common N, got batches {sorted(sizes)}.")
    frames = sizes.pop() if sizes else 1
    batches = -(-frames // batch_size)
    tensors = [pad_batch(x, batches * batch_size) for x in tensors]
    num_steps, guidance_scale, _ = task.settings(num_steps, guidance_scale, None)
    images = []
    for i in range(batches):
        latents, *parts = (x[i * batch_size : (i + 1) * batch_size] for x in tensors)
        images.append(task.run(ops.convert_to_numpy(latents), tuple(parts), num_steps, guidance_scale))
        if progress:
            progress_bar(i + 1, batches)
    return np.concatenate(images)[:frames]


def _encode(task, prompts, negative_prompt):
    """One batch-1 embeddings 4-tuple per prompt."""
    return [task.encode([prompt], [negative_prompt]) for prompt in prompts]


def interpolate_prompts(model, prompt_a, prompt_b, num_frames, negative_prompt="", noise="fixed", seed=None,
                        **options):
    """`num_frames` images on the slerp path from `prompt_a` to `prompt_b` (both ends included).

    Args:
        noise: "fixed" (the same starting noise, `generate(seed=seed)`'s, for every frame) or "varying".

    Returns:
        uint8 (num_frames, H, W, 3); with fixed noise, frame 0 and the last frame are the plain
        text-to-image results of the two prompts.
    """
    task = as_task(model)
    start, end = _encode(task, (prompt_a, prompt_b), negative_prompt)
    latents = frame_noise(task.backbone.latent_shape, num_frames, noise, seed)
    return generate_from_embeddings(task, latents, interpolate_embeddings(start, end, num_frames), **options)


def interpolation_grid(model, prompts, size, negative_prompt="", noise="fixed", seed=None, **options):
    """A `size` x `size` grid (row-major) between four prompts: top left, top right, bottom left, bottom right.

    Returns:
        uint8 (size * size, H, W, 3); save it with `keras_sd3.media.save_grid(path, frames, columns=size)`.
    """
    task = as_task(model)
    if len(prompts) != 4:
        raise ValueError(f"A grid needs 4 prompts (top left, top right, bottom left, bottom right), got {len(prompts)}.")
    embeddings = grid_embeddings(_encode(task, prompts, negative_prompt), size)
    latents = frame_noise(task.backbone.latent_shape, size * size, noise, seed)
    return generate_from_embeddings(task, latents, embeddings, **options)


def walk_around_prompt(model, prompt, num_frames, step_size=0.01, direction="constant", negative_prompt="",
                       noise="fixed", seed=None, **options):
    """A straight walk in embedding space away from `prompt` (see `walk_embeddings`).

    Returns:
        uint8 (num_frames, H, W, 3); frame 0 is the plain text-to-image result.
    """
    task = as_task(model)
    (embeddings,) = _encode(task, (prompt,), negative_prompt)
    walk = walk_embeddings(embeddings, num_frames, step_size, direction, seed)
    latents = frame_noise(task.backbone.latent_shape, num_frames, noise, seed)
    return generate_from_embeddings(task, latents, walk, **options)


def circular_walk(model, prompt, num_frames, seed=None, negative_prompt="", include_end=False, **options):
    """One prompt, a loop in noise space (see `circular_noise`): the frames play as a seamless loop.

    Returns:
        uint8 (num_frames, H, W, 3) (one more with `include_end`: the frame that equals frame 0).
    """
    task = as_task(model)
    (embeddings,) = _encode(task, (prompt,), negative_prompt)
    latents = circular_noise(task.backbone.latent_shape, num_frames, seed, include_end)
    return generate_from_embeddings(task, latents, embeddings, **options)
