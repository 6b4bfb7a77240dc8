"""The denoising loop shared by the three tasks, compiled once per backend.

Step range, step count, guidance scale, embeddings and the step cache's threshold are traced inputs,
so changing them never recompiles. Static options select one of a few programs: the sampler and its
shift, with / without classifier-free guidance, an inpainting mask or the step cache, skip-layer
guidance settings, decoded images or latents.
"""

from keras import ops

from keras_sd3 import sampling
from keras_sd3.backend import compile_function
from keras_sd3.models.placement import Variables, device_scope


def initial_state(latents, cache_shape=None, cache_dtype="float32"):
    """The loop's state before the first step: `(latents, previous x0, previous sigma, cache)`.

    Previous x0 and sigma are DPM-Solver++(2M)'s memory (sigma 0: none yet); `cache` is the step
    cache's `(first-block residual, rest residual, full passes, skipped passes)`, with residuals of
    `cache_shape` (B, N, D) (None: no step cache, (1,) stand-ins). Other samplers pass them on unchanged.
    """
    latents = ops.convert_to_tensor(latents, "float32")
    shape = (1,) if cache_shape is None else cache_shape
    zero = ops.convert_to_tensor(0.0, "float32")
    cache = (ops.zeros(shape, cache_dtype), ops.zeros(shape, cache_dtype), zero, zero)
    return latents, ops.zeros_like(latents), zero, cache


def sampler_step(backbone, sampler, state, embeddings, step, num_steps, guidance_scale, skip_layer_guidance=None,
                 control=None, shift=sampling.DEFAULT_SHIFT, timesteps=None, step_cache=None):
    """One step `step -> step + 1` of `num_steps` with `sampler` ("euler", "heun" or "dpmpp_2m") -> the new state.

    Guidance, skip-layer guidance and ControlNet `control` apply at every model call (see
    `backbone.guided_velocity`); Heun's second call uses the step's index for the guidance window.
    `timesteps`: `sampling.timestep_table` (read by "dpmpp_2m" only). `step_cache`: None, or the
    traced `(threshold, warmup steps)` of a `sampling.StepCache` (each model call then may reuse).
    """
    x, previous_x0, previous_sigma, cache = state
    sigma_now = sampling.schedule_sigma(sampler, step, num_steps, shift)
    sigma_next = sampling.schedule_sigma(sampler, ops.add(step, 1), num_steps, shift)

    def velocity(latents, sigma, cache, timestep=None):
        arguments = (latents, embeddings, sigma, step, num_steps, guidance_scale, skip_layer_guidance, control, timestep)
        if step_cache is None:
            return backbone.guided_velocity(*arguments), cache
        first, rest, passes, skipped = cache
        threshold, warmup = step_cache
        allowed = (passes > 0.0) & (step >= warmup)
        v, (first, rest, skip) = backbone.guided_velocity(*arguments, step_cache=(threshold, allowed, first, rest))
        return v, (first, rest, passes + 1.0 - skip, skipped + skip)

    if sampler == "dpmpp_2m":
        v, cache = velocity(x, sigma_now, cache, ops.take(timesteps, step))
        x0 = ops.cast(x, "float32") - sigma_now * v
        return sampling.dpm_update(x, x0, previous_x0, previous_sigma, sigma_now, sigma_next), x0, sigma_now, cache
    v, cache = velocity(x, sigma_now, cache)
    euler = sampling.euler_step(x, v, sigma_now, sigma_next)
    if sampler == "heun":

        def corrected():  # the velocity at the end of the step, averaged with the one at its start
            v_end, new_cache = velocity(euler, sigma_next, cache)
            return sampling.euler_step(x, 0.5 * (v + v_end), sigma_now, sigma_next), new_cache

        euler, cache = ops.cond(sigma_next > 0.0, corrected, lambda: (euler, cache))
    return euler, previous_x0, previous_sigma, cache


def denoise_loop(backbone, state, embeddings, start, stop, num_steps, guidance_scale, inpaint=None,
                 skip_layer_guidance=None, sampler="euler", shift=sampling.DEFAULT_SHIFT, timesteps=None,
                 step_cache=None):
    """Sampler steps `start .. stop - 1` of `num_steps` from `state` (see `initial_state`) -> the new state.

    Args:
        inpaint: None, or `(image_latents, noise, mask)`: after each step the unmasked region
            (mask 0) is reset to the image latents noised to the next step's level.
        skip_layer_guidance: None or a `sampling.SkipLayerGuidance`.
    """

    def body(step, state):
        x, *memory = sampler_step(backbone, sampler, state, embeddings, step, num_steps, guidance_scale,
                                  skip_layer_guidance, shift=shift, timesteps=timesteps, step_cache=step_cache)
        if inpaint is not None:
            image_latents, noise, mask = inpaint
            level = sampling.schedule_sigma(sampler, step + 1, num_steps, shift)
            x = (1.0 - mask) * sampling.add_noise(image_latents, noise, level) + mask * x
        return (x, *memory)

    return ops.fori_loop(start, stop, body, tuple(state))


def run_steps(backbone, state, embeddings, noise, image_latents, mask, timesteps, cache_settings, start, stop,
              num_steps, guidance_scale, use_cfg, use_mask, skip_layer_guidance, decode, sampler="euler",
              shift=sampling.DEFAULT_SHIFT, use_step_cache=False):
    """Steps `start .. stop - 1` -> `(state, decoded images or None)`; the body of every task.

    Args:
        state: the loop state before step `start` (`initial_state(latents)`, (B, h, w, C) latents).
        embeddings: the 4-tuple of `encode_text_step`.
        noise, image_latents, mask: the inpainting inputs (ignored unless `use_mask`); mask is
            (B, h, w, 1), 1 = repaint.
        timesteps: `sampling.timestep_table(sampler, num_steps, shift)`.
        cache_settings: the step cache's `(threshold, warmup steps)` scalars (ignored unless `use_step_cache`).
        start, stop, num_steps: int scalars.
        guidance_scale: float scalar (ignored unless `use_cfg`).
    """
    noise, image_latents, mask = (ops.convert_to_tensor(x, "float32") for x in (noise, image_latents, mask))
    inpaint = (image_latents, noise, mask) if use_mask else None
    state = denoise_loop(
        backbone, state, embeddings, start, stop, num_steps, guidance_scale if use_cfg else None, inpaint,
        skip_layer_guidance if use_cfg else None, sampler, shift, ops.convert_to_tensor(timesteps, "float32"),
        cache_settings if use_step_cache else None,
    )
    return state, (backbone.decode_step(state[0]) if decode else None)


class CompiledSteps:
    """`run_steps`, the text encoders, the VAE encoder and decoder, compiled for the backend (see
    `backend.compile_function`).

    One program per static option set; `traces` counts how often a Python body was traced
    (the test of "compiled once").
    """

    def __init__(self, backbone, variables=None):
        """`variables`: the object whose variables the programs read (default: the backbone's)."""
        self.backbone, self.traces, self._programs = backbone, 0, {}
        self._variables = variables or backbone
        self._lora_version = getattr(backbone, "lora_version", 0)

    def _program(self, key, function, variables=None):
        if getattr(self.backbone, "lora_version", 0) != self._lora_version:  # LoRAs added or removed since
            self._programs, self._lora_version = {}, self.backbone.lora_version
        if key not in self._programs:

            def counted(*args):
                self.traces += 1
                return function(*args)

            self._programs[key] = compile_function(variables or self._variables, counted)
        return self._programs[key]

    def __call__(self, *args, **options):
        key = tuple(sorted(options.items()))
        return self._program(key, lambda *a: run_steps(self.backbone, *a, **options))(*args)

    def encode_text(self, token_ids, negative_token_ids):
        """`backbone.encode_text_step`, compiled (one program per batch size and token lengths)."""
        as_tensors = lambda ids: {k: ops.convert_to_tensor(v, "int32") for k, v in ids.items()}  # noqa: E731
        backbone = self.backbone
        if getattr(backbone, "text_encoders_device", None) is None:
            program = self._program("text", backbone.encode_text_step)
            return program(as_tensors(token_ids), as_tensors(negative_token_ids))
        # On their own device: a program reading only the text encoders' variables, run there.
        program = self._program("text_elsewhere", backbone.encode_text_step,
                                Variables([backbone.clip_l, backbone.clip_g, backbone.t5]))
        with device_scope(backbone.text_encoders_device):
            embeddings = program(as_tensors(token_ids), as_tensors(negative_token_ids))
        return tuple(ops.convert_to_tensor(e) for e in embeddings)  # (torch: onto the main device; else as is)

    def encode(self, images):
        images = ops.convert_to_tensor(images, "float32")
        if self.backbone.uses_vae_tiles(tuple(images.shape), decode=False):
            return self.backbone.encode_image_step(images)  # (one compiled program per tile shape)
        return self._program("encode", self.backbone.encode_image_step)(images)

    def decode(self, latents):
        latents = ops.convert_to_tensor(latents, "float32")
        if self.backbone.uses_vae_tiles(tuple(latents.shape)):
            return self.backbone.decode_step(latents)  # (one compiled program per tile shape)
        return self._program("decode", self.backbone.decode_step)(latents)


def scalar(value, dtype):
    """A Python number as a backend tensor (so that it is traced, not baked into the program)."""
    return ops.convert_to_tensor(value, dtype)
