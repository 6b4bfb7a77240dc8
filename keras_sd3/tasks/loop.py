"""The denoising loop shared by the three tasks, compiled once per backend.

Step range, step count, guidance scale and embeddings are traced inputs, so changing them never
recompiles. Static options select one of a few programs: with / without classifier-free guidance,
with / without an inpainting mask, skip-layer guidance settings, decoded images or latents.
"""

from keras import ops

from keras_sd3 import sampling
from keras_sd3.backend import compile_function


def denoise_loop(backbone, latents, embeddings, start, stop, num_steps, guidance_scale, inpaint=None,
                 skip_layer_guidance=None):
    """Euler steps `start .. stop - 1` of `num_steps` from `latents`.

    Args:
        inpaint: None, or `(image_latents, noise, mask)`: after each step the unmasked region
            (mask 0) is reset to the image latents noised to the next step's level.
        skip_layer_guidance: None or a `sampling.SkipLayerGuidance`.
    """

    def body(step, x):
        x = backbone.denoise_step(x, embeddings, step, num_steps, guidance_scale, skip_layer_guidance)
        if inpaint is not None:
            image_latents, noise, mask = inpaint
            proper = sampling.add_noise(image_latents, noise, sampling.sigma(step + 1, num_steps))
            x = (1.0 - mask) * proper + mask * x
        return x

    return ops.fori_loop(start, stop, body, latents)


def run_steps(backbone, latents, embeddings, noise, image_latents, mask, start, stop, num_steps, guidance_scale,
              use_cfg, use_mask, skip_layer_guidance, decode):
    """Steps `start .. stop - 1` -> `(latents, decoded images or None)`; the body of every task.

    Args:
        latents: (B, h, w, C) latents before step `start`.
        embeddings: the 4-tuple of `encode_text_step`.
        noise, image_latents, mask: the inpainting inputs (ignored unless `use_mask`); mask is
            (B, h, w, 1), 1 = repaint.
        start, stop, num_steps: int scalars.
        guidance_scale: float scalar (ignored unless `use_cfg`).
    """
    latents, noise, image_latents, mask = (
        ops.convert_to_tensor(x, "float32") for x in (latents, noise, image_latents, mask)
    )
    inpaint = (image_latents, noise, mask) if use_mask else None
    latents = denoise_loop(
        backbone, latents, embeddings, start, stop, num_steps, guidance_scale if use_cfg else None, inpaint,
        skip_layer_guidance if use_cfg else None,
    )
    return latents, (backbone.decode_step(latents) if decode else None)


class CompiledSteps:
    """`run_steps`, the VAE encoder and decoder, compiled for the backend (see `backend.compile_function`).

    One program per static option set; `traces` counts how often a Python body was traced
    (the test of "compiled once").
    """

    def __init__(self, backbone, variables=None):
        """`variables`: the object whose variables the programs read (default: the backbone's)."""
        self.backbone, self.traces, self._programs = backbone, 0, {}
        self._variables = variables or backbone
        self._lora_version = getattr(backbone, "lora_version", 0)

    def _program(self, key, function):
        if getattr(self.backbone, "lora_version", 0) != self._lora_version:  # LoRAs added or removed since
            self._programs, self._lora_version = {}, self.backbone.lora_version
        if key not in self._programs:

            def counted(*args):
                self.traces += 1
                return function(*args)

            self._programs[key] = compile_function(self._variables, counted)
        return self._programs[key]

    def __call__(self, *args, **options):
        key = tuple(sorted(options.items()))
        return self._program(key, lambda *a: run_steps(self.backbone, *a, **options))(*args)

    def encode(self, images):
        return self._program("encode", self.backbone.encode_image_step)(ops.convert_to_tensor(images, "float32"))

    def decode(self, latents):
        return self._program("decode", self.backbone.decode_step)(ops.convert_to_tensor(latents, "float32"))


def scalar(value, dtype):
    """A Python number as a backend tensor (so that it is traced, not baked into the program)."""
    return ops.convert_to_tensor(value, dtype)
