"""What the three generation tasks share: prompts -> embeddings, noise, the compiled loop, output."""

import os
import sys

import numpy as np
from keras import ops

from keras_sd3 import distribution, presets, sampling
from keras_sd3.models.backbone import StableDiffusion3Backbone
from keras_sd3.tasks.inputs import check_guidance_scale, check_num_steps, check_sampling, parse_prompts
from keras_sd3.tasks.loop import CompiledSteps, initial_state, scalar
from keras_sd3.text.preprocessor import StableDiffusion3TextToImagePreprocessor


def distinct(texts):
    """-> (each text once, in order of first use; the index of each of `texts` in it, None if all differ)."""
    unique = list(dict.fromkeys(texts))
    return unique, None if len(unique) == len(texts) else np.array([unique.index(t) for t in texts], np.int32)


def to_uint8(images):
    """Images in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    images = np.clip((np.asarray(images, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(images * 255.0).astype(np.uint8)


def from_uint8(images):
    """uint8 (or 0..255 float) images -> float32 in [-1, 1], the range the backbone's steps take."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def picture_array(picture, mode):
    """A PIL picture -> float32 RGB in [-1, 1] (`mode` "RGB") or a {0, 1} mask ("L": >= 128 = repaint)."""
    array = np.asarray(picture.convert(mode), np.float32)
    return from_uint8(array) if mode == "RGB" else (array >= 128).astype(np.float32)


def progress_bar(done, total, stream=None, width=30):
    """A one-line text progress bar, redrawn in place (on stderr by default)."""
    stream = stream or sys.stderr
    filled = width * done // max(total, 1)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {done}/{total}")
    stream.write("\n" if done >= total else "")
    stream.flush()


def load_parts(source, image_shape=None, dtype=None, **kwargs):
    """(backbone, preprocessor or None for a single file, generation defaults) of `source`; `kwargs` go to the
    backbone's `from_preset`.

    Raises:
        CheckpointError: `t5=PATH` with a folder that has no T5 tokenizer (`tokenizer_3/`), before any weight is read.
    """
    from keras_sd3.errors import CheckpointError

    path, preset = presets.resolve(source)
    preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(path) if os.path.isdir(path) else None
    if kwargs.get("t5") is not None and preprocessor is not None and preprocessor.t5_tokenizer is None:
        raise CheckpointError(f"t5={kwargs['t5']!r} needs T5's tokenizer, and {path} has none (no tokenizer_3/): use a "
                              "source with T5 (e.g. an SD3 folder with text_encoder_3/ and tokenizer_3/).")
    backbone = StableDiffusion3Backbone.from_preset(path, image_shape=image_shape, dtype=dtype, **kwargs)
    return backbone, preprocessor, presets.generation_defaults(path, preset)


class GenerationTask:
    """Base of `StableDiffusion3TextToImage`, `...ImageToImage` and `...Inpaint`.

    Args:
        backbone: a `StableDiffusion3Backbone`.
        preprocessor: a `StableDiffusion3TextToImagePreprocessor`, or None when only precomputed
            embeddings are given.
        defaults: `{"num_steps", "guidance_scale", "skip_layer_guidance"}` used when `generate()` is
            not given them (a preset's recommendations); otherwise KerasHub's defaults.
    """

    default_num_steps = 28

    def __init__(self, backbone, preprocessor=None, defaults=None):
        self.backbone, self.preprocessor = backbone, preprocessor
        self.defaults = dict(defaults or {})
        self.compiled = CompiledSteps(backbone)

    @classmethod
    def from_preset(cls, source, image_shape=None, dtype=None, **kwargs):
        """Loads the backbone and the preprocessor from a diffusers folder, a single file or a preset
        name (see the backbone's `from_preset`). The generation defaults are the folder's own
        (`model_index.json`'s "_keras_sd3" block), else the preset's (`presets.generation_defaults`)."""
        return cls(*load_parts(source, image_shape, dtype, **kwargs))

    def settings(self, num_steps, guidance_scale, skip_layer_guidance):
        """The given values, else this task's `defaults`, else KerasHub's (guidance 7, no SLG), checked.

        Raises:
            ValueError: `num_steps` not an integer >= 1, or `guidance_scale` not a number >= 0.
        """
        defaults = {"num_steps": self.default_num_steps, "guidance_scale": 7.0, "skip_layer_guidance": None,
                    **self.defaults}
        given = {"num_steps": num_steps, "guidance_scale": guidance_scale, "skip_layer_guidance": skip_layer_guidance}
        num_steps, guidance_scale, skip_layer_guidance = (defaults[k] if v is None else v for k, v in given.items())
        return check_num_steps(num_steps), check_guidance_scale(guidance_scale), skip_layer_guidance

    def encode(self, prompts, negatives):
        """Prompts -> the 4-tuple of embeddings. A text that comes more than once in a list (a server's
        batch of jobs, most with the empty negative prompt) goes through the text encoders once."""
        if self.preprocessor is None:
            raise ValueError("This task has no preprocessor: pass precomputed `embeddings` to generate().")
        (prompts, positions), (negatives, negative_positions) = distinct(prompts), distinct(negatives)
        positive, negative, positive_pooled, negative_pooled = self.compiled.encode_text(
            self.preprocessor.generate_preprocess(prompts), self.preprocessor.generate_preprocess(negatives)
        )
        spread = lambda x, at: x if at is None else ops.take(x, at, axis=0)  # noqa: E731
        return (spread(positive, positions), spread(negative, negative_positions),
                spread(positive_pooled, positions), spread(negative_pooled, negative_positions))

    def noise(self, batch, seed):
        """Gaussian noise for `batch` images, the same for a seed on every backend (NumPy's PCG64)."""
        return np.random.default_rng(seed).standard_normal((batch, *self.backbone.latent_shape)).astype(np.float32)

    def check_noise(self, noise, batch, name):
        noise = np.asarray(noise, np.float32)
        if noise.shape != (batch, *self.backbone.latent_shape):
            raise ValueError(f"{name} must have shape {(batch, *self.backbone.latent_shape)}, got {noise.shape}.")
        return noise

    def prepare(self, inputs, required_keys, embeddings, num_images):
        """-> (single, the dict of inputs, embeddings repeated for `num_images` per prompt)."""
        if embeddings is None:  # each prompt encoded once, then repeated (as diffusers' num_images_per_prompt)
            prompts, negatives, single, inputs = parse_prompts(inputs, required_keys)
            embeddings = self.encode(prompts, negatives)
        else:
            if len(embeddings) != 4:
                raise ValueError("embeddings must be the 4-tuple (positive, negative, positive_pooled, negative_pooled).")
            inputs, single = (inputs if isinstance(inputs, dict) else {}), False
            embeddings = tuple(ops.convert_to_tensor(e) for e in embeddings)
        if num_images > 1:
            embeddings = tuple(ops.repeat(e, num_images, axis=0) for e in embeddings)
        return single, inputs, embeddings

    def run(self, latents, embeddings, num_steps, guidance_scale, start=0, inpaint=None, output="images",
            skip_layer_guidance=None, callback=None, progress=False, sampler="euler", shift=None, step_cache=None):
        """Runs steps `start .. num_steps - 1` from `latents`; returns uint8 images or float32 latents.

        Args:
            inpaint: None or `(image_latents, noise, mask)` (see `loop.denoise_loop`).
            skip_layer_guidance: None, True (the defaults) or a `sampling.SkipLayerGuidance`.
            callback: `callback(step, num_steps, latents)` after each step (numpy latents).
            progress: draw a progress bar on stderr.
            sampler, shift: see `inputs.check_sampling`.
            step_cache: None, a threshold or a `sampling.StepCache`; afterwards `self.step_cache_skipped`
                says how many of the run's MMDiT passes reused the cache.
        """
        num_steps = check_num_steps(num_steps)
        sampler, shift = check_sampling(sampler, shift)
        step_cache = sampling.check_step_cache(step_cache)
        if output not in ("images", "latents"):
            raise ValueError(f"output must be 'images' or 'latents', got {output!r}.")
        if skip_layer_guidance is True:
            skip_layer_guidance = sampling.SkipLayerGuidance()
        skip_layer_guidance = skip_layer_guidance or None
        zeros = np.zeros((latents.shape[0], *self.backbone.latent_shape[:2], 1), np.float32)
        noise, image_latents, mask = inpaint if inpaint is not None else (latents, latents, zeros)
        batch = latents.shape[0]
        callback, latents, embeddings, noise, image_latents, mask = split_over_devices(
            callback, latents, embeddings, noise, image_latents, mask)
        use_cfg = guidance_scale > 1.0
        options = dict(use_cfg=use_cfg, use_mask=inpaint is not None, skip_layer_guidance=skip_layer_guidance,
                       sampler=sampler, shift=shift, use_step_cache=step_cache is not None)
        settings = step_cache or sampling.StepCache()
        args = (noise, image_latents, mask, sampling.timestep_table(sampler, num_steps, shift),
                (scalar(settings.threshold, "float32"), scalar(settings.warmup_steps, "int32")))
        cache_shape = None
        if step_cache is not None:  # the MMDiT's image tokens, (B or 2 B with guidance, N, D)
            (h, w, _), config = self.backbone.latent_shape, self.backbone.mmdit_config
            tokens = (h // config.patch_size) * (w // config.patch_size)
            cache_shape = (latents.shape[0] * (2 if use_cfg else 1), tokens, config.hidden_size)
        outputs = self.run_program(self.compiled, latents, (embeddings, *args), start, num_steps, guidance_scale,
                                   output, callback, progress, cache_shape, **options)
        return outputs[:batch]

    def run_program(self, program, latents, inputs, start, num_steps, guidance_scale, output, callback, progress,
                    cache_shape=None, **options):
        """Runs a compiled loop `program(state, *inputs, start, stop, num_steps, guidance, decode=, **options)`
        over steps `start .. num_steps - 1`: in one call, or a step at a time for a callback / progress bar.
        Returns uint8 images or float32 latents (`output`)."""
        guidance, total = scalar(guidance_scale, "float32"), scalar(num_steps, "int32")
        state = initial_state(latents, cache_shape, self.backbone.compute_dtype)
        tiles = self.backbone.uses_vae_tiles(tuple(latents.shape))  # (decoded after the loop, a tile at a time)
        if callback is None and not progress:
            state, decoded = program(state, *inputs, scalar(start, "int32"), total, total, guidance,
                                     decode=output == "images" and not tiles, **options)
            if output == "images" and tiles:
                decoded = self.compiled.decode(state[0])
        else:
            for step in range(start, num_steps):
                state, _ = program(state, *inputs, scalar(step, "int32"), scalar(step + 1, "int32"), total,
                                   guidance, decode=False, **options)
                if callback is not None:
                    callback(step, num_steps, ops.convert_to_numpy(state[0]))
                if progress:
                    progress_bar(step + 1, num_steps)
            decoded = self.compiled.decode(state[0]) if output == "images" else None
        self.step_cache_skipped = int(ops.convert_to_numpy(state[3][3]))
        latents = ops.convert_to_numpy(state[0])
        if not np.all(np.isfinite(latents)):
            raise FloatingPointError("NaN or Inf appeared in the latents (try float32 or bfloat16 instead of float16).")
        return latents if output == "latents" else to_uint8(ops.convert_to_numpy(decoded))

    @staticmethod
    def unbatch(outputs, single, num_images):
        return outputs[0] if single and num_images == 1 else outputs


def split_over_devices(callback, latents, embeddings, *batched):
    """The run's inputs padded to a multiple of the devices' batch axis and split over it
    (`keras_sd3.distribution`); unchanged on one device. Returns `(callback, latents, embeddings,
    *batched)`: a step callback then still sees only the real images, not the padding."""
    groups, batch = distribution.batch_axis_size(), latents.shape[0]
    if groups == 1:
        return (callback, latents, embeddings, *batched)
    size = -(-batch // groups) * groups
    pad = lambda x: distribution.split_batch(distribution.pad_batch(ops.convert_to_tensor(x), size))  # noqa: E731
    if callback is not None and size != batch:
        callback = (lambda given: lambda step, steps, x: given(step, steps, x[:batch]))(callback)
    return (callback, pad(latents), tuple(pad(e) for e in embeddings), *(pad(x) for x in batched))
