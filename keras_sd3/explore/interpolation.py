"""Paths through the two latent spaces: text embeddings (slerp, grids, walks) and noise (circular walks).

Pure functions of tensors (`keras.ops`, computed in float32, returned in the input dtype) or of a seed
(NumPy, the same noise on every backend). `embeddings` is the 4-tuple of `encode_text_step`:
`(positive, negative, positive_pooled, negative_pooled)`; a path moves the two positive tensors and
keeps the negatives of its first end.
"""

import math

import keras
import numpy as np
from keras import ops

DOT_THRESHOLD = 0.9995


def lerp(a, b, t):
    """Linear interpolation `(1 - t) a + t b`.

    Args:
        a, b: tensors of one shape.
        t: a float, or a 1-D sequence of T floats.

    Returns:
        `a.shape` for a float `t`, else (T, *a.shape); in the dtype of `a`, computed in float32.
    """
    dtype, a, b, t, scalar = _prepare(a, b, t)
    out = (1.0 - t) * a + t * b
    return ops.cast(out[0] if scalar else out, dtype)


def slerp(a, b, t, dot_threshold=DOT_THRESHOLD):
    """Spherical interpolation between two tensors, each taken as one vector (all its elements).

    The direction moves along the great circle from `a` to `b` at constant angular speed, and the
    norm is interpolated linearly, `|x_t| = (1 - t) |a| + t |b|` (for unit vectors this is the usual
    slerp). When `|cos angle| > dot_threshold` (nearly parallel or anti-parallel inputs, where the
    great circle is ill-defined) it falls back to `lerp`, which never divides by `sin(angle)`.
    `t = 0` and `t = 1` return `a` and `b` exactly.

    Args:
        a, b: tensors of one shape, e.g. (154, 4096) or (2048,) embeddings.
        t: a float, or a 1-D sequence of T floats (usually in [0, 1]).
        dot_threshold: the cosine above which the inputs count as parallel.

    Returns:
        `a.shape` for a float `t`, else (T, *a.shape); in the dtype of `a`, computed in float32.
    """
    dtype, a, b, t, scalar = _prepare(a, b, t)
    norm_a, norm_b = ops.sqrt(ops.sum(a * a)), ops.sqrt(ops.sum(b * b))
    unit_a, unit_b = a / ops.maximum(norm_a, 1e-30), b / ops.maximum(norm_b, 1e-30)
    cos = ops.clip(ops.sum(unit_a * unit_b), -1.0, 1.0)
    parallel = ops.abs(cos) > dot_threshold
    angle = ops.arccos(cos)
    sin = ops.where(parallel, 1.0, ops.sin(angle))
    direction = (ops.sin((1.0 - t) * angle) * unit_a + ops.sin(t * angle) * unit_b) / sin
    out = ops.where(parallel, (1.0 - t) * a + t * b, direction * ((1.0 - t) * norm_a + t * norm_b))
    out = ops.where(t == 0.0, a, ops.where(t == 1.0, b, out))
    return ops.cast(out[0] if scalar else out, dtype)


def _prepare(a, b, t):
    """-> (dtype of a, a and b in float32 with a leading axis, t shaped (T, 1, ...), whether t was a float)."""
    dtype = keras.backend.standardize_dtype(a.dtype) if hasattr(a, "dtype") else "float32"
    a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"Cannot interpolate tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    t_array = np.asarray(t, np.float32)
    if t_array.ndim > 1:
        raise ValueError(f"t must be a float or a 1-D sequence, got shape {t_array.shape}.")
    t = ops.reshape(ops.convert_to_tensor(t_array.reshape(-1)), (-1,) + (1,) * len(a.shape))
    return dtype, a[None], b[None], t, t_array.ndim == 0


def interpolate_embeddings(start, end, num_frames, method=slerp):
    """`num_frames` embeddings from `start` to `end` (both included): the positives interpolated.

    Args:
        start, end: `encode_text_step` 4-tuples for one prompt each (batch 1).
        method: `slerp` (default, as the latent-walk guide) or `lerp`.

    Returns:
        A 4-tuple with batch `num_frames` for the positives and batch 1 for `start`'s negatives.
    """
    t = np.linspace(0.0, 1.0, num_frames)
    positive = _merge_batch(method(start[0], end[0], t))
    pooled = _merge_batch(method(start[2], end[2], t))
    return positive, start[1], pooled, start[3]


def grid_embeddings(corners, size, method=slerp):
    """A `size` x `size` grid between four prompts (bilinear slerp), row-major.

    `corners` = (top left, top right, bottom left, bottom right) 4-tuples of batch 1. Cell (i, j) is
    `method(method(tl, tr, u_j), method(bl, br, u_j), u_i)` with `u = linspace(0, 1, size)`, so the
    four corners reproduce the four prompts.

    Returns:
        A 4-tuple with batch `size * size` for the positives and the first corner's negatives.
    """
    if len(corners) != 4:
        raise ValueError(f"A grid needs 4 corner embeddings (tl, tr, bl, br), got {len(corners)}.")
    u = np.linspace(0.0, 1.0, size)

    def cells(index):
        top = method(corners[0][index], corners[1][index], u)  # (size, 1, ...)
        bottom = method(corners[2][index], corners[3][index], u)
        columns = [method(top[j], bottom[j], u) for j in range(size)]  # size x (size, 1, ...)
        grid = ops.stack(columns, axis=1)  # (size, size, 1, ...): rows, columns
        return _merge_batch(ops.reshape(grid, (size * size, *grid.shape[2:])))  # row-major

    first = corners[0]
    return cells(0), first[1], cells(2), first[3]


def walk_embeddings(embeddings, num_frames, step_size=0.01, direction="constant", seed=None):
    """A straight walk away from one prompt: frame k is `positive + k * step_size * d`.

    Args:
        embeddings: an `encode_text_step` 4-tuple of batch 1.
        direction: "constant" (d = 1 everywhere, the latent-walk guide's walk) or "random" (a Gaussian
            direction scaled to the same length as the constant one, drawn from `seed`).

    Returns:
        A 4-tuple with batch `num_frames` for the positives and the given negatives.
    """
    if direction not in ("constant", "random"):
        raise ValueError(f"direction must be 'constant' or 'random', got {direction!r}.")
    rng = np.random.default_rng(seed)
    steps = np.arange(num_frames, dtype=np.float32) * step_size

    def walk(x):
        shape, dtype = tuple(x.shape), keras.backend.standardize_dtype(x.dtype)
        d = np.ones(shape, np.float32)
        if direction == "random":
            d = rng.standard_normal(shape).astype(np.float32)
            d *= math.sqrt(d.size) / np.linalg.norm(d)
        path = ops.cast(x, "float32")[None] + ops.reshape(steps, (-1,) + (1,) * len(shape)) * d
        return ops.cast(_merge_batch(path), dtype)

    return walk(embeddings[0]), embeddings[1], walk(embeddings[2]), embeddings[3]


def circular_noise(latent_shape, num_frames, seed=None, include_end=False):
    """Loopable noise: frame k = cos(2 pi k / N) x + sin(2 pi k / N) y for two Gaussian draws x, y.

    Every frame is again standard Gaussian noise (cos^2 + sin^2 = 1). Frame N would equal frame 0,
    so the N frames play as a seamless loop; `include_end=True` appends that frame N. `x` is the noise
    that `generate(seed=seed)` draws for one image, so frame 0 is the plain text-to-image result.

    Returns:
        float32 (N, *latent_shape), or (N + 1, ...) with `include_end`.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, *latent_shape)).astype(np.float32)
    y = rng.standard_normal((1, *latent_shape)).astype(np.float32)
    angles = 2.0 * np.pi * np.arange(num_frames + int(include_end)) / num_frames
    mix = lambda f: f(angles).reshape((-1,) + (1,) * len(latent_shape))  # noqa: E731
    return (mix(np.cos) * x + mix(np.sin) * y).astype(np.float32)


def frame_noise(latent_shape, num_frames, mode="fixed", seed=None):
    """Starting noise for `num_frames` frames.

    Args:
        mode: "fixed" (one draw shared by every frame: only the embeddings change the picture) or
            "varying" (a new draw per frame).

    Returns:
        float32 (num_frames, *latent_shape); with "fixed" every frame is `generate(seed=seed)`'s noise.
    """
    if mode not in ("fixed", "varying"):
        raise ValueError(f"noise mode must be 'fixed' or 'varying', got {mode!r}.")
    rng = np.random.default_rng(seed)
    draws = 1 if mode == "fixed" else num_frames
    noise = rng.standard_normal((draws, *latent_shape)).astype(np.float32)
    return np.repeat(noise, num_frames, axis=0) if mode == "fixed" else noise


def _merge_batch(x):
    """(T, 1, ...) -> (T, ...): a path of batch-1 embeddings becomes a batch of frames."""
    if x.shape[1] != 1:
        raise ValueError(f"Paths are drawn between single prompts (batch 1), got batch {x.shape[1]}.")
    return ops.reshape(x, (x.shape[0], *x.shape[2:]))
