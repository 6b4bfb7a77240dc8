"""`StableDiffusion3Inpaint`: an image, a mask and prompts -> images (KerasHub's API)."""

import warnings

import numpy as np
from keras import ops

from keras_sd3.tasks.image_to_image import StableDiffusion3ImageToImage
from keras_sd3.tasks.inputs import batch_images, latent_mask, parse_prompts
from keras_sd3.tasks.task import to_uint8

FEATHER = 4  # pixels over which `keep_unmasked` fades from the generated picture to the input


def check_mask_size(masks, images):
    """Raises ValueError unless `masks` ((H, W), (B, H, W) or (B, H, W, 1)) have the images' H x W."""
    shape, image_shape = np.shape(masks), np.shape(images)
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise ValueError(f"masks must have shape (H, W) or (B, H, W), got {np.shape(masks)}.")
    if len(image_shape) in (3, 4) and shape[-2:] != image_shape[-3:-1]:
        (height, width), (mask_height, mask_width) = image_shape[-3:-1], shape[-2:]
        raise ValueError(
            f"masks must have shape ({height}, {width}) or (B, {height}, {width}): masks are {mask_height} x "
            f"{mask_width} pixels but images are {height} x {width}; give masks of the images' size."
        )


def dilate(masks):
    """3 x 3 dilation of boolean (B, H, W) masks (beyond the border counts as unmasked)."""
    height, width = masks.shape[1:]
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    return np.any([padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=0)


def overlay_alpha(masks, feather=FEATHER):
    """Boolean (B, H, W) masks -> float32 alpha: 1 inside, 1 - k / (feather + 1) at Chebyshev distance
    k <= `feather` from the mask, exactly 0 further out."""
    alpha, grown = masks.astype(np.float32), masks
    for k in range(1, feather + 1):
        dilated = dilate(grown)
        alpha[dilated & ~grown] = 1.0 - k / (feather + 1)
        grown = dilated
    return alpha


class StableDiffusion3Inpaint(StableDiffusion3ImageToImage):
    """Inpainting with the 16-channel SD3 model (diffusers' scheme).

    The mask is binarised at 0.5 (1 / True = repaint) and resized (nearest) to the latent size; after
    every step the region outside the mask is reset to the image latents noised to the next level,
    and to the image latents themselves after the last step.
    """

    required_keys = ("images", "masks", "prompts")

    def generate(self, inputs, num_steps=None, guidance_scale=None, strength=0.6, seed=None, noise=None, num_images=1,
                 embeddings=None, output="images", skip_layer_guidance=None, callback=None, progress=False,
                 keep_unmasked=False, sampler="euler", shift=None, step_cache=None):
        """Generates images from `{"images", "masks", "prompts"[, "negative_prompts"]}`.

        Masks whose height and width differ from the images' raise a ValueError before any model work.
        When every mask is empty (nothing >= 0.5), a warning says so and the inputs come back without
        running the model: the images as uint8 (or their latents for `output="latents"`), shaped as
        `generate` returns them.

        Args:
            inputs: images in [-1, 1]; masks (H, W) or (B, H, W), bool or in [0, 1]; prompts.
            keep_unmasked: paste the generated pictures over the input images, keeping the input
                exactly wherever the pixel is more than 4 pixels (Chebyshev) away from the mask, with a
                linear 4-pixel feather around it (as A1111 / diffusers' `apply_overlay`; the VAE
                round trip otherwise changes the unmasked pixels slightly). Only with
                `output="images"`. Default False, as KerasHub.
            Others: as `StableDiffusion3ImageToImage.generate`.
        """
        if keep_unmasked and output == "latents":
            raise ValueError("keep_unmasked=True pastes decoded images over the inputs; it needs output='images'.")
        if isinstance(inputs, dict) and "images" in inputs and "masks" in inputs:
            check_mask_size(inputs["masks"], inputs["images"])
            if not np.any(np.asarray(inputs["masks"], np.float32) >= 0.5):
                return self.unchanged(inputs, embeddings, num_images, output)
        return self._generate(inputs, num_steps, guidance_scale, strength, seed, noise, num_images, embeddings,
                              dict(output=output, skip_layer_guidance=skip_layer_guidance, callback=callback,
                                   progress=progress, sampler=sampler, shift=shift, step_cache=step_cache),
                              keep_unmasked)

    def unchanged(self, inputs, embeddings, num_images, output):
        """The input images (uint8, or their latents), shaped as `generate` returns, for empty masks."""
        if output not in ("images", "latents"):
            raise ValueError(f"output must be 'images' or 'latents', got {output!r}.")
        if embeddings is None:
            prompts, _, single, _ = parse_prompts(inputs, self.required_keys)
            batch = len(prompts) * num_images
        else:
            batch, single = ops.shape(embeddings[0])[0] * num_images, False
        images = batch_images(inputs["images"], batch, self.backbone.image_shape)
        latent_mask(inputs["masks"], batch, self.backbone.image_shape, 1)  # checks the masks' values and count
        warnings.warn("nothing to repaint: the mask is empty (no value >= 0.5); returning the input unchanged.",
                      stacklevel=3)
        outputs = to_uint8(images) if output == "images" else ops.convert_to_numpy(self.compiled.encode(images))
        return self.unbatch(outputs, single, num_images)

    def overlay(self, outputs, images, inputs):
        """Generated uint8 `outputs` pasted over `images` ([-1, 1]) with the feathered masks as alpha."""
        masks = latent_mask(inputs["masks"], len(outputs), self.backbone.image_shape, 1)[..., 0] > 0
        alpha = overlay_alpha(masks)[..., None]
        return np.round(alpha * outputs + (1.0 - alpha) * to_uint8(images)).astype(np.uint8)
