"""The generation loop shared by the three tasks, as one function compiled once per backend.

Step counts, the start step (image-to-image strength), the guidance scale and the embeddings are
traced inputs, so changing them never recompiles. The static options select one of a few programs:
with / without classifier-free guidance, with / without an input image, with / without an inpainting
mask, decoded images or latents.
"""

from keras import ops

from keras_sd3 import sampling
from keras_sd3.backend import compile_function


def denoise_loop(backbone, latents, embeddings, start, num_steps, guidance_scale, inpaint=None):
    """Euler steps `start .. num_steps - 1` from `latents`.

    Args:
        inpaint: None, or `(image_latents, noise, mask)`: after each step the unmasked region
            (mask 0) is reset to the image latents noised to the next step's level.
    """

    def body(step, x):
        x = backbone.denoise_step(x, embeddings, step, num_steps, guidance_scale)
        if inpaint is not None:
            image_latents, noise, mask = inpaint
            proper = sampling.add_noise(image_latents, noise, sampling.sigma(step + 1, num_steps))
            x = (1.0 - mask) * proper + mask * x
        return x

    return ops.fori_loop(start, num_steps, body, latents)


def generate(backbone, noise, embeddings, images, mask, start, num_steps, guidance_scale,
             use_cfg, use_image, use_mask, decode):
    """Noise (and an image) -> `(final latents, images or None)`; the body of every task.

    Args:
        noise: (B, h, w, C) float32 Gaussian noise.
        embeddings: the 4-tuple of `encode_text_step`.
        images: (B, H, W, 3) images in [-1, 1] (ignored unless `use_image`).
        mask: (B, h, w, 1) binary latent mask, 1 = repaint (ignored unless `use_mask`).
        start, num_steps: int scalars; the loop runs steps `start .. num_steps - 1`.
        guidance_scale: float scalar (ignored unless `use_cfg`).
    """
    noise, images, mask = (ops.convert_to_tensor(x, "float32") for x in (noise, images, mask))
    latents, inpaint = noise, None
    if use_image:
        image_latents = backbone.encode_image_step(images)
        latents = sampling.add_noise(image_latents, noise, sampling.sigma(start, num_steps))
        if use_mask:
            inpaint = (image_latents, noise, mask)
    latents = denoise_loop(
        backbone, latents, embeddings, start, num_steps, guidance_scale if use_cfg else None, inpaint
    )
    return latents, (backbone.decode_step(latents) if decode else None)


class CompiledGenerate:
    """`generate` compiled for the current backend, one program per static option set.

    See `keras_sd3.backend.compile_function` for what compiling means on each backend.
    `traces` counts how many times the Python body was traced (the test of "compiled once").
    """

    def __init__(self, backbone):
        self.backbone, self.traces, self._programs = backbone, 0, {}

    def _body(self, options):
        def body(*args):
            self.traces += 1
            return generate(self.backbone, *args, **options)

        return body

    def __call__(self, *args, **options):
        key = tuple(sorted(options.items()))
        if key not in self._programs:
            self._programs[key] = compile_function(self.backbone, self._body(options))
        return self._programs[key](*args)


def scalar(value, dtype):
    """A Python number as a backend tensor (so that it is traced, not baked into the program)."""
    return ops.convert_to_tensor(value, dtype)

