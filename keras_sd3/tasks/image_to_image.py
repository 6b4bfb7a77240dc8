"""`StableDiffusion3ImageToImage`: an image and prompts -> images (KerasHub's API)."""

from keras import ops

from keras_sd3 import sampling
from keras_sd3.tasks.inputs import batch_images, check_num_steps, check_sampling, check_strength, latent_mask
from keras_sd3.tasks.task import GenerationTask


def start_step(num_steps, strength):
    """The first step run for `strength` (diffusers: `int(max(N - min(N * strength, N), 0))`)."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))


class StableDiffusion3ImageToImage(GenerationTask):
    """Image-to-image: the image's latents (posterior mean, as KerasHub) are noised to the level of
    step `start_step(num_steps, strength)` and denoised from there; strength 1 ignores the image.
    """

    required_keys = ("images", "prompts")
    default_num_steps = 50  # KerasHub's

    def generate(self, inputs, num_steps=None, guidance_scale=None, strength=0.8, seed=None, noise=None, num_images=1,
                 embeddings=None, output="images", skip_layer_guidance=None, callback=None, progress=False,
                 sampler="euler", shift=None, step_cache=None):
        """Generates images from `{"images", "prompts"[, "negative_prompts"]}`.

        Args:
            inputs: images (H, W, 3) or (B, H, W, 3) in [-1, 1] and prompts.
            strength: in [0, 1]; how much noise is added (1: pure noise, the image is ignored).
            noise: explicit (B, h, w, C) noise, e.g. to reproduce a diffusers run.
            Others: as `StableDiffusion3TextToImage.generate`.
        """
        return self._generate(inputs, num_steps, guidance_scale, strength, seed, noise, num_images, embeddings,
                              dict(output=output, skip_layer_guidance=skip_layer_guidance, callback=callback,
                                   progress=progress, sampler=sampler, shift=shift, step_cache=step_cache))

    def _generate(self, inputs, num_steps, guidance_scale, strength, seed, noise, num_images, embeddings, options,
                  keep_unmasked=False):
        num_steps, guidance_scale, options["skip_layer_guidance"] = self.settings(
            num_steps, guidance_scale, options["skip_layer_guidance"])
        strength, num_steps = check_strength(strength), check_num_steps(num_steps)
        options["sampler"], options["shift"] = check_sampling(options["sampler"], options["shift"])
        options["step_cache"] = sampling.check_step_cache(options["step_cache"])
        single, inputs, embeddings = self.prepare(inputs, self.required_keys, embeddings, num_images)
        batch = embeddings[0].shape[0]
        images = batch_images(inputs.get("images"), batch, self.backbone.image_shape)
        noise = self.noise(batch, seed) if noise is None else self.check_noise(noise, batch, "noise")
        start = start_step(num_steps, strength)
        image_latents = ops.convert_to_numpy(self.compiled.encode(images))
        level = sampling.schedule_sigma(options["sampler"], start, num_steps, options["shift"])
        latents = ops.convert_to_numpy(sampling.add_noise(image_latents, noise, level))
        inpaint = None
        if "masks" in self.required_keys:
            factor = self.backbone.vae_config.downsample_factor
            inpaint = (noise, image_latents, latent_mask(inputs["masks"], batch, self.backbone.image_shape, factor))
        outputs = self.run(latents, embeddings, num_steps, guidance_scale, start, inpaint, **options)
        if keep_unmasked:
            outputs = self.overlay(outputs, images, inputs)
        return self.unbatch(outputs, single, num_images)

    def overlay(self, outputs, images, inputs):
        """The generated uint8 `outputs` as they are (`StableDiffusion3Inpaint` pastes them over `images`)."""
        return outputs
