"""`StableDiffusion3TextToImage`: prompts -> images (KerasHub's API)."""

from keras_sd3 import sampling
from keras_sd3.tasks.inputs import check_sampling
from keras_sd3.tasks.task import GenerationTask


class StableDiffusion3TextToImage(GenerationTask):
    """Text-to-image generation.

    Example:
        >>> text_to_image = StableDiffusion3TextToImage.from_preset("path/to/sd3", image_shape=(512, 512, 3))
        >>> image = text_to_image.generate("a red circle on a blue background", seed=0)  # (512, 512, 3) uint8
    """

    def generate(self, inputs=None, num_steps=None, guidance_scale=None, seed=None, latents=None, num_images=1,
                 embeddings=None, output="images", skip_layer_guidance=None, callback=None, progress=False,
                 sampler="euler", shift=None, step_cache=None):
        """Generates images.

        Args:
            inputs: a prompt, a list of prompts, or `{"prompts", "negative_prompts"}`.
            num_steps: denoising steps (default: the preset's, else 28).
            guidance_scale: classifier-free guidance; `<= 1` disables it (one pass per step, Turbo)
                (default: the preset's, else 7.0).
            seed: seed of the initial noise (NumPy generator: the same images on every backend).
            latents: explicit (B, h, w, C) initial noise, e.g. to reproduce a diffusers run.
            num_images: images per prompt.
            embeddings: precomputed `encode_text_step` 4-tuple instead of prompts.
            output: "images" (uint8) or "latents" (float32 final latents).
            skip_layer_guidance: None, True (diffusers' defaults: layers 7-9, scale 2.8, steps in
                (0.01 N, 0.2 N)) or a `keras_sd3.sampling.SkipLayerGuidance`; with guidance only.
            callback: `callback(step, num_steps, latents)` after each step.
            progress: draw a progress bar on stderr.
            sampler: "euler" (diffusers' default), "heun" (2 N - 1 model calls for N steps) or
                "dpmpp_2m" (DPM-Solver++(2M), good images in fewer steps); see `keras_sd3.sampling.samplers`.
            shift: the schedule's shift (None: SD3's 3.0).
            step_cache: None, a threshold or a `keras_sd3.sampling.StepCache`: reuse most of the MMDiT's
                work between steps whose input barely changed (faster, slightly different images;
                `StepCache()` is the default threshold).

        Returns:
            (H, W, 3) uint8 for one prompt string, else (B, H, W, 3); latents likewise.
        """
        num_steps, guidance_scale, skip_layer_guidance = self.settings(num_steps, guidance_scale, skip_layer_guidance)
        sampler, shift = check_sampling(sampler, shift)
        step_cache = sampling.check_step_cache(step_cache)
        single, _, embeddings = self.prepare(inputs, ("prompts",), embeddings, num_images)
        batch = embeddings[0].shape[0]
        latents = self.noise(batch, seed) if latents is None else self.check_noise(latents, batch, "latents")
        outputs = self.run(latents, embeddings, num_steps, guidance_scale, output=output,
                           skip_layer_guidance=skip_layer_guidance, callback=callback, progress=progress,
                           sampler=sampler, shift=shift, step_cache=step_cache)
        return self.unbatch(outputs, single, num_images)
