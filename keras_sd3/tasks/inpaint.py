"""`StableDiffusion3Inpaint`: an image, a mask and prompts -> images (KerasHub's API)."""

from keras_sd3.tasks.image_to_image import StableDiffusion3ImageToImage


class StableDiffusion3Inpaint(StableDiffusion3ImageToImage):
    """Inpainting with the 16-channel SD3 model (diffusers' scheme).

    The mask is binarised at 0.5 (1 / True = repaint) and resized (nearest) to the latent size; after
    every step the region outside the mask is reset to the image latents noised to the next level,
    and to the image latents themselves after the last step.
    """

    required_keys = ("images", "masks", "prompts")

    def generate(self, inputs, num_steps=None, guidance_scale=None, strength=0.6, seed=None, noise=None, num_images=1,
                 embeddings=None, output="images", skip_layer_guidance=None, callback=None, progress=False):
        """Generates images from `{"images", "masks", "prompts"[, "negative_prompts"]}`.

        Args:
            inputs: images in [-1, 1]; masks (H, W) or (B, H, W), bool or in [0, 1]; prompts.
            Others: as `StableDiffusion3ImageToImage.generate`.
        """
        return self._generate(inputs, num_steps, guidance_scale, strength, seed, noise, num_images, embeddings,
                              dict(output=output, skip_layer_guidance=skip_layer_guidance, callback=callback,
                                   progress=progress))
