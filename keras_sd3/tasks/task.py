"""What the three generation tasks share: prompts -> embeddings, noise, the compiled loop, output."""

import numpy as np
from keras import ops

from keras_sd3.models.backbone import StableDiffusion3Backbone
from keras_sd3.tasks.inputs import check_num_steps, parse_prompts
from keras_sd3.tasks.loop import CompiledGenerate, scalar
from keras_sd3.text.preprocessor import StableDiffusion3TextToImagePreprocessor


def to_uint8(images):
    """Images in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    images = np.clip((np.asarray(images, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(images * 255.0).astype(np.uint8)


class GenerationTask:
    """Base of `StableDiffusion3TextToImage`, `...ImageToImage` and `...Inpaint`.

    Args:
        backbone: a `StableDiffusion3Backbone`.
        preprocessor: a `StableDiffusion3TextToImagePreprocessor`, or None when only precomputed
            embeddings are given.
    """

    def __init__(self, backbone, preprocessor=None):
        self.backbone, self.preprocessor = backbone, preprocessor
        self.compiled = CompiledGenerate(backbone)

    @classmethod
    def from_preset(cls, source, image_shape=(1024, 1024, 3), dtype=None, **kwargs):
        """Loads the backbone and the preprocessor from a diffusers folder (see the backbone's `from_preset`)."""
        backbone = StableDiffusion3Backbone.from_preset(source, image_shape=image_shape, dtype=dtype, **kwargs)
        return cls(backbone, StableDiffusion3TextToImagePreprocessor.from_preset(source))

    def encode(self, prompts, negatives):
        """Prompts -> the 4-tuple of embeddings."""
        if self.preprocessor is None:
            raise ValueError("This task has no preprocessor: pass precomputed `embeddings` to generate().")
        return self.backbone.encode_text_step(
            self.preprocessor.generate_preprocess(prompts), self.preprocessor.generate_preprocess(negatives)
        )

    def noise(self, batch, seed):
        """Gaussian noise for `batch` images, the same for a seed on every backend (NumPy's PCG64)."""
        return np.random.default_rng(seed).standard_normal((batch, *self.backbone.latent_shape)).astype(np.float32)

    def prepare(self, inputs, required_keys, embeddings, num_images):
        """-> (prompts, single, the dict of inputs, embeddings repeated for `num_images` per prompt)."""
        if embeddings is None:
            prompts, negatives, single, inputs = parse_prompts(inputs, required_keys)
            prompts = [p for p in prompts for _ in range(num_images)]
            negatives = [n for n in negatives for _ in range(num_images)]
            embeddings = self.encode(prompts, negatives)
        else:
            inputs = inputs if isinstance(inputs, dict) else {}
            single = False
            embeddings = tuple(ops.repeat(e, num_images, axis=0) for e in embeddings)
        return single, inputs, embeddings

    def run(self, noise, embeddings, num_steps, guidance_scale, start=0, images=None, mask=None, output="images"):
        """Runs the compiled loop; returns uint8 images or float32 latents as numpy.

        `images` (B, H, W, 3) starts from the noised image latents at step `start`; `mask`
        (B, h, w, 1) also keeps the unmasked region on the image (inpainting).
        """
        num_steps = check_num_steps(num_steps)
        if output not in ("images", "latents"):
            raise ValueError(f"output must be 'images' or 'latents', got {output!r}.")
        batch, images_given, mask_given = noise.shape[0], images is not None, mask is not None
        images = np.zeros((batch, *self.backbone.image_shape), np.float32) if images is None else images
        mask = np.zeros((batch, *self.backbone.latent_shape[:2], 1), np.float32) if mask is None else mask
        latents, decoded = self.compiled(
            noise, embeddings, images, mask, scalar(start, "int32"), scalar(num_steps, "int32"),
            scalar(guidance_scale, "float32"),
            use_cfg=guidance_scale > 1.0, use_image=images_given, use_mask=mask_given,
            decode=output == "images",
        )
        latents = ops.convert_to_numpy(latents)
        if not np.all(np.isfinite(latents)):
            raise FloatingPointError(
                "NaN or Inf appeared in the latents (try float32 or bfloat16 instead of float16)."
            )
        return latents if output == "latents" else to_uint8(ops.convert_to_numpy(decoded))

    @staticmethod
    def unbatch(outputs, single, num_images):
        return outputs[0] if single and num_images == 1 else outputs
