"""Parsing and validating the inputs of `generate()`: prompts, images, masks, numbers."""

import numpy as np

from keras_sd3 import sampling


def _as_list(value, name):
    if isinstance(value, str):
        return [value], True
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and value:
        return list(value), False
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}.")


def parse_prompts(inputs, required_keys=("prompts",)):
    """`inputs` (str, list of str, or dict) -> (prompts, negative prompts, single, dict of other entries).

    A dict must have `required_keys`; `negative_prompts` defaults to "" for each prompt, and one
    string is used for every prompt; a list must have one negative prompt per prompt (as diffusers).
    """
    if not isinstance(inputs, dict):
        if required_keys != ("prompts",):
            raise ValueError(f"inputs must be a dict with keys {list(required_keys)}, got {type(inputs).__name__}.")
        inputs = {"prompts": inputs}
    missing = [k for k in required_keys if k not in inputs]
    if missing:
        raise ValueError(f"inputs is missing the key(s) {missing}; it has {sorted(inputs)}.")
    unknown = sorted(set(inputs) - {"prompts", "negative_prompts", "images", "masks"})
    if unknown:
        raise ValueError(f"inputs has unknown key(s) {unknown}; expected prompts, negative_prompts, images, masks.")
    prompts, single = _as_list(inputs["prompts"], "prompts")
    negatives = inputs.get("negative_prompts")
    if negatives is None:
        negatives = [""] * len(prompts)
    elif isinstance(negatives, str):
        negatives = [negatives] * len(prompts)
    else:
        negatives, _ = _as_list(negatives, "negative_prompts")
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(negatives)} negative prompts: give one negative "
                             "prompt per prompt, or one string for all.")
    return prompts, negatives, single, inputs


def check_num_steps(num_steps):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    return int(num_steps)


def check_guidance_scale(guidance_scale):
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.number)) or not (
        0.0 <= float(guidance_scale) < float("inf")
    ):
        raise ValueError(f"guidance_scale must be a number >= 0 (0 to 1: no guidance), got {guidance_scale!r}.")
    return float(guidance_scale)


def check_strength(strength):
    if not isinstance(strength, (int, float, np.floating)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}.")
    return float(strength)


def batch_images(images, batch, image_shape, name="images", value_range=(-1.0, 1.0)):
    """(H, W, C) or (B, H, W, C) array -> float32 (batch, H, W, C), checked against `image_shape`."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == len(image_shape):
        images = images[None]
    if images.ndim != len(image_shape) + 1 or images.shape[1:] != tuple(image_shape):
        raise ValueError(f"{name} must have shape {tuple(image_shape)} or (B, *{tuple(image_shape)}), got {images.shape}.")
    if images.shape[0] == 1 and batch > 1:
        images = np.repeat(images, batch, axis=0)
    if images.shape[0] != batch:
        raise ValueError(f"Got {images.shape[0]} {name} for {batch} prompts; give one, or one per prompt.")
    low, high = value_range
    if not np.all(np.isfinite(images)) or images.min() < low - 1e-3 or images.max() > high + 1e-3:
        raise ValueError(
            f"{name} values must lie in [{low}, {high}], got [{images.min():.3g}, {images.max():.3g}]."
        )
    return np.clip(images, low, high)


def latent_mask(masks, batch, image_shape, factor):
    """Masks (True / >= 0.5 = repaint) -> binary (batch, h, w, 1) float32 at 1 / `factor` resolution (nearest).

    `factor` is the VAE's downsampling factor for latent masks, 1 for masks of the images' size.
    """
    height, width = image_shape[:2]
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    masks = batch_images(masks.astype(np.float32), batch, (height, width), "masks", (0.0, 1.0))
    binary = (masks >= 0.5).astype(np.float32)
    rows = (np.arange(height // factor) * factor).astype(int)
    cols = (np.arange(width // factor) * factor).astype(int)
    return binary[:, rows][:, :, cols][..., None]


def check_sampling(sampler="euler", shift=None):
    """Checked `(sampler, shift)`: "euler" (diffusers' default for SD3), "heun" or "dpmpp_2m"
    (see `keras_sd3.sampling.samplers`); `shift` None is SD3's 3.0, else a number > 0."""
    sampler = sampling.check_sampler(sampler)
    if shift is None:
        return sampler, sampling.DEFAULT_SHIFT
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"shift must be a number > 0 (SD3's is 3.0), got {shift!r}.")
    return sampler, float(shift)
