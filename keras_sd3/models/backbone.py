"""`StableDiffusion3Backbone`: the MMDiT and the VAE behind KerasHub's step API.

Every task is a loop over these steps, and each step works eagerly, inside `keras.ops.fori_loop`, and
under `jax.jit` with a `keras.StatelessScope` (step counts and guidance may be traced tensors).
"""

import dataclasses

import keras
from keras import ops

from keras_sd3 import sampling
from keras_sd3.models.clip import CLIPConfig, CLIPTextEncoder
from keras_sd3.models.config import MMDiTConfig, VAEConfig
from keras_sd3.models.mmdit import MMDiT
from keras_sd3.models.placement import check_text_encoders_device, device_scope
from keras_sd3.models.t5 import T5Config, T5Encoder
from keras_sd3.models.tiling import VAETiling, VAETilingMethods
from keras_sd3.models.vae import VAE
from keras_sd3.weights.assign import build_then_load, load_layer_weights, set_checkpoint_paths

TEXT_ENCODERS = {"clip_l": (CLIPConfig, CLIPTextEncoder), "clip_g": (CLIPConfig, CLIPTextEncoder), "t5": (T5Config, T5Encoder)}


def image_size_rule(mmdit_config, vae_config):
    """`(multiple, limit)`: image heights and widths must be multiples of `multiple`, at most `limit`."""
    multiple = vae_config.downsample_factor * mmdit_config.patch_size
    return multiple, multiple * mmdit_config.pos_embed_max_size


def _check_image_shape(image_shape, mmdit_config, vae_config):
    height, width, channels = image_shape
    multiple, limit = image_size_rule(mmdit_config, vae_config)
    if channels != 3 or height % multiple or width % multiple or height > limit or width > limit:
        raise ValueError(
            f"image_shape {tuple(image_shape)} is not supported by this model: expected (H, W, 3) "
            f"with H and W multiples of {multiple} and at most {limit}."
        )


class StableDiffusion3Backbone(VAETilingMethods, keras.Model):
    """The SD3 / SD3.5 diffusion model (`diffuser`), autoencoder (`vae`) and text encoders.

    Args:
        mmdit_config: an `MMDiTConfig` (or its dict).
        vae_config: a `VAEConfig` (or its dict).
        clip_l_config, clip_g_config: `CLIPConfig`s (or dicts) of the CLIP encoders, or None for a
            backbone without text encoders (embeddings must then be given).
        t5_config: a `T5Config` (or dict), or None: the T5 part of the context is then zeros.
        image_shape: `(height, width, 3)` of generated images; None for the model's native size
            (`sample_size` latents: 1024 x 1024 for the real models).
        t5_zero_tokens: length of the zero context used in place of T5 when there is no T5
            (77 as in KerasHub, giving a (B, 154, 4096) context; diffusers uses `max_sequence_length`).
        dtype: Keras dtype or policy, e.g. "float32", "bfloat16", "float16", "mixed_bfloat16".
            Norms, softmax and the sampler always run in float32; T5 runs in bfloat16 when `dtype`
            is float16 (T5 overflows in float16).

    Example:
        >>> backbone = StableDiffusion3Backbone.from_preset("path/to/sd3-diffusers", image_shape=(512, 512, 3))
        >>> latents = backbone.denoise_step(latents, embeddings, step, num_steps, guidance_scale=7.0)
    """

    def __init__(
        self, mmdit_config, vae_config, clip_l_config=None, clip_g_config=None, t5_config=None,
        image_shape=None, t5_zero_tokens=77, dtype=None, **kwargs,
    ):
        super().__init__(dtype=dtype, **kwargs)
        if isinstance(mmdit_config, dict):
            mmdit_config = MMDiTConfig(**mmdit_config)
        if isinstance(vae_config, dict):
            vae_config = VAEConfig(**vae_config)
        if image_shape is None:
            side = mmdit_config.sample_size * vae_config.downsample_factor
            image_shape = (side, side, 3)
        _check_image_shape(image_shape, mmdit_config, vae_config)
        self.mmdit_config, self.vae_config = mmdit_config, vae_config
        self.image_shape, self.t5_zero_tokens = tuple(image_shape), t5_zero_tokens
        self.diffuser = MMDiT(mmdit_config, dtype=self.dtype_policy, name="diffuser")
        self.vae = VAE(vae_config, dtype=self.dtype_policy, name="vae")
        self.text_configs = {}
        configs = {"clip_l": clip_l_config, "clip_g": clip_g_config, "t5": t5_config}
        if (clip_l_config is None) != (clip_g_config is None):
            raise ValueError("SD3 needs both CLIP-L and CLIP-G (or neither): got only one of them.")
        for name, config in configs.items():
            config_cls, encoder_cls = TEXT_ENCODERS[name]
            if isinstance(config, dict):
                config = config_cls(**config)
            if config is not None:
                self.text_configs[name] = config
                policy = "bfloat16" if name == "t5" and self.compute_dtype == "float16" else self.dtype_policy
                setattr(self, name, encoder_cls(config, dtype=policy, name=name))
            else:
                setattr(self, name, None)
        self.built = True
        vars(self).pop("quantize", None)  # (Keras wraps `quantize` per instance with its one-mode checks; ours takes a dict too)
        self._lay_out()

    def _lay_out(self):
        """Checkpoint-named variable paths, and the variables' layouts under a `keras.distribution`."""
        from keras_sd3.distribution.layout import apply_layouts

        for name in ("diffuser", "vae", *TEXT_ENCODERS):
            if getattr(self, name) is not None:
                set_checkpoint_paths(getattr(self, name), name)
        heads = {name: config.num_heads if name == "t5" else config.num_attention_heads
                 for name, config in self.text_configs.items()}
        apply_layouts(self, dict(heads, diffuser=self.mmdit_config.num_attention_heads, vae=1))

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
        """The model-parallel `keras.distribution.LayoutMap` (see `keras_sd3.distribution.layout`) for
        `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=data_parallel_dim_name)`."""
        from keras_sd3.distribution.layout import get_layout_map

        return get_layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name)

    @classmethod
    def from_preset(cls, source, image_shape=None, dtype=None, t5_zero_tokens=None, quantize=None,
                    quantization_config=None, transformer=None, t5=None, vae_tiling=None,
                    text_encoders_device=None):
        """Builds the backbone and loads its weights from a diffusers folder or a single `.safetensors` file.

        Text encoders are loaded when the checkpoint has them (`text_encoder*/` folders, or the
        `text_encoders.*` tensors of `*_incl_clips*` files); a checkpoint without T5 loads without it.
        `t5_zero_tokens` defaults to the checkpoint's own value (`model_index.json` "_keras_sd3",
        written for the tiny models) or 77.

        `quantize`: None, "int8" / "int4", or {part: mode} (parts "mmdit", "clip_l", "clip_g", "t5"),
        with an optional Keras `quantization_config` (see `quantize`). Each selected layer is
        quantized as soon as its weight is read, so no float copy of the whole model ever exists:
        loading peaks at the quantized model plus one tensor. The result equals loading in float and
        calling `quantize` afterwards.

        `transformer` / `t5`: a `.gguf` (city96's, llama.cpp's T5 names) or `.safetensors` file (e.g.
        ComfyUI's fp8) of the MMDiT / the T5 encoder alone, taken instead of the source's. Matrices in a
        GGUF block type or float8 stay so in memory, decoded inside each product
        (`keras_sd3.quantization.stored`); `quantize` then applies to the other layers.

        `vae_tiling`: None (off), True (512 px tiles) or a tile size in pixels: `enable_vae_tiling`.

        `text_encoders_device`: None (with the rest), or a device name ("cpu", "cpu:0") or a backend
        device object (`jax.devices("cpu")[0]`) where CLIP-L, CLIP-G and T5 live and run while the
        MMDiT and the VAE stay on the accelerator (`keras_sd3.models.placement`).

        Raises:
            CheckpointError: the source is not an SD3 checkpoint, or a tensor is missing, unexpected
                or mis-shaped (the message names it).
            ValueError: a bad `quantize`, `vae_tiling` or `text_encoders_device`, or a
                `text_encoders_device` under a `keras.distribution` (before any weight is read).
        """
        from keras_sd3.weights.checkpoint import open_checkpoint  # (keras_sd3.weights imports the model configs)

        from keras_sd3 import quantization

        modes = quantization.check_quantize(quantize, quantization_config)
        if "int8" in modes.values() and keras.dtype_policies.get(dtype or keras.config.dtype_policy()).compute_dtype == "float16":
            raise ValueError("Keras' int8 quantization does not work with the float16 compute dtype (it overflows); "
                             "load with dtype='bfloat16', 'float32' or 'mixed_bfloat16' to quantize to int8.")
        check_text_encoders_device(text_encoders_device)
        checkpoint = open_checkpoint(source, transformer=transformer, t5=t5)
        tiling = None if vae_tiling in (None, False) else VAETiling(512 if vae_tiling is True else vae_tiling)
        if tiling is not None:
            tiling.check(checkpoint.vae.config.downsample_factor)
        parts = {name: getattr(checkpoint, name) for name in TEXT_ENCODERS}

        def build():
            return cls(
                checkpoint.mmdit.config, checkpoint.vae.config,
                **{f"{name}_config": part and part.config for name, part in parts.items()},
                image_shape=image_shape, dtype=dtype,
                t5_zero_tokens=next(n for n in (t5_zero_tokens, checkpoint.t5_zero_tokens, 77) if n is not None),
            )

        def load(backbone):
            loaded = quantization.quantize_while_loading(backbone, modes, quantization_config)
            store = quantization.store_while_loading(backbone)
            mmdit_what = f"transformer {transformer}" if transformer else f"MMDiT of {checkpoint.path}"
            load_layer_weights(backbone.diffuser, checkpoint.mmdit.tensors, mmdit_what, loaded, store)
            load_layer_weights(backbone.vae, checkpoint.vae.tensors, f"VAE of {checkpoint.path}")
            for name, part in parts.items():
                if part is not None:
                    what = f"T5 encoder {t5}" if name == "t5" and t5 else f"{name} encoder of {checkpoint.path}"
                    with device_scope(text_encoders_device):
                        load_layer_weights(getattr(backbone, name), part.tensors, what, loaded, store)
            backbone._lay_out()  # quantized and stored variables' layouts under a keras.distribution

        backbone = build_then_load(build, load)
        backbone.text_encoders_device = text_encoders_device
        if tiling is not None:
            backbone.enable_vae_tiling(tiling.tile_sample_size)
        return backbone

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the large matrix products of the MMDiT and the text encoders with Keras' int8 /
        int4 modes (Keras' `Model.quantize` signature; see `keras_sd3.quantization`).

        Args:
            mode: "int8" or "int4", or {part: mode} with parts "mmdit", "clip_l", "clip_g", "t5" (those
                not named stay in float).
            config: a Keras `QuantizationConfig`. int8 is weight-only unless it has an activation
                quantizer (`keras.quantizers.Int8QuantizationConfig()`: W8A8).
            filters: a regex (or list) searched in each layer's checkpoint path, or `layer -> bool`.

        Tasks built before see the quantized weights (their compiled programs are rebuilt).
        """
        if kwargs:
            raise ValueError(f"Unknown arguments to quantize: {sorted(kwargs)}.")
        from keras_sd3 import quantization

        quantization.quantize_backbone(self, mode, config, filters)
        self._lay_out()

    @property
    def latent_shape(self):
        """`(H / f, W / f, latent_channels)` of the latents for `image_shape`."""
        factor = self.vae_config.downsample_factor
        return (self.image_shape[0] // factor, self.image_shape[1] // factor, self.vae_config.latent_channels)

    def get_config(self):
        return {
            "mmdit_config": dataclasses.asdict(self.mmdit_config),
            "vae_config": dataclasses.asdict(self.vae_config),
            **{f"{name}_config": dataclasses.asdict(config) for name, config in self.text_configs.items()},
            "image_shape": self.image_shape,
            "t5_zero_tokens": self.t5_zero_tokens,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "name": self.name,
        }

    def load_lora(self, path, scale=1.0, name=None):
        """Attaches a LoRA `.safetensors` file (diffusers / PEFT or kohya format) as a named adapter.

        The base kernels are untouched (`unload_lora` gives the exact base outputs back; `fuse_loras`
        merges); several LoRAs can be loaded at once; tasks built before see it.

        Args:
            path: the file.
            scale: strength (`output += scale * alpha / rank * (x @ A) @ B`).
            name: the adapter's name (default: the file name without extension).

        Returns:
            The adapter's name.

        Raises:
            keras_sd3.lora.LoraError: a key that maps to no layer, or a shape mismatch (the message
                names the key); the model is then left exactly as it was.
        """
        from keras_sd3.lora import adapters

        return adapters.load(self, path, scale, name)

    def set_lora_scale(self, name, scale):
        """Changes a loaded LoRA's strength (a variable read at run time: no reload, no recompilation)."""
        from keras_sd3.lora import adapters

        adapters.set_scale(self, name, scale)

    def unload_lora(self, name):
        """Removes a loaded LoRA; outputs are bit-identical to the model's without it."""
        from keras_sd3.lora import adapters

        adapters.unload(self, name)

    def fuse_loras(self):
        """Merges every loaded LoRA (at its current scale) into the base kernels and drops the adapters."""
        from keras_sd3.lora import adapters

        adapters.fuse(self)

    def save_lora(self, path, name=None):
        """Writes a LoRA in the diffusers format (`pipeline.load_lora_weights(path)` reads it).

        `name`: a loaded adapter; None saves the adapters trained after `training.trainer.enable_lora`.
        """
        from keras_sd3.lora import adapters

        adapters.save(self, path, name)

    @property
    def lora_names(self):
        """Names of the loaded LoRAs."""
        from keras_sd3.lora import adapters

        return adapters.names(self)

    def call(self, inputs):
        """Velocity for `{"latents", "context", "pooled", "timestep"}` (all batched)."""
        return self.diffuser(inputs["latents"], inputs["context"], inputs["pooled"], inputs["timestep"])

    def predict_velocity(self, latents, context, pooled, sigma, skip_layers=(), control=None, timestep=None,
                         step_cache=None):
        """MMDiT velocity (float32) at noise level `sigma` (a scalar) for a batch of latents.

        `control`: None, or `control(latents, context, pooled, timestep)` -> the ControlNet residuals
        added to the MMDiT's image tokens (inputs in the compute dtype; see `tasks.controlnet`).
        `timestep`: the model's timestep input if not `1000 * sigma` (DPM-Solver feeds whole numbers).
        `step_cache`: None, or the MMDiT's `step_cache` argument; then `(velocity, new cache)` is returned.
        """
        timestep = sampling.sigma_to_timestep(sigma) if timestep is None else ops.cast(timestep, "float32")
        timestep = ops.broadcast_to(timestep, ops.shape(latents)[:1])
        dtype = self.compute_dtype
        latents, context, pooled = (ops.cast(x, dtype) for x in (latents, context, pooled))
        residuals = None if control is None else control(latents, context, pooled, timestep)
        if step_cache is not None:
            velocity, cache = self.diffuser(latents, context, pooled, timestep, step_cache=step_cache)
            return ops.cast(velocity, "float32"), cache
        velocity = self.diffuser(latents, context, pooled, timestep, skip_layers=skip_layers,
                                 controlnet_residuals=residuals)
        return ops.cast(velocity, "float32")

    def encode_text(self, token_ids, clip_skip=None):
        """Token ids `{"clip_l", "clip_g"[, "t5"]}` -> `(context, pooled)` (SPEC §4), float32.

        Args:
            token_ids: dict of (B, T) int ids, as from the preprocessor.
            clip_skip: CLIP layers to skip (None: the penultimate hidden state, as diffusers).

        Returns:
            context (B, 77 + T5 length, joint_attention_dim) and pooled (B, 2 * projection).
        """
        if self.clip_l is None:
            raise ValueError("This backbone has no text encoders: pass precomputed embeddings instead.")
        l_hidden, l_pooled = self.clip_l(token_ids["clip_l"], clip_skip=clip_skip)
        g_hidden, g_pooled = self.clip_g(token_ids["clip_g"], clip_skip=clip_skip)
        clip = ops.cast(ops.concatenate([l_hidden, g_hidden], axis=-1), "float32")  # (B, 77, dl + dg)
        width = self.mmdit_config.joint_attention_dim
        clip = ops.pad(clip, ((0, 0), (0, 0), (0, width - ops.shape(clip)[-1])))
        if self.t5 is not None:
            t5 = ops.cast(self.t5(token_ids["t5"]), "float32")
        else:
            t5 = ops.zeros((ops.shape(clip)[0], self.t5_zero_tokens, width), "float32")
        pooled = ops.cast(ops.concatenate([l_pooled, g_pooled], axis=-1), "float32")
        return ops.concatenate([clip, t5], axis=1), pooled

    def encode_text_step(self, token_ids, negative_token_ids, clip_skip=None):
        """KerasHub's step: `(positive, negative, positive_pooled, negative_pooled)` embeddings.

        As in diffusers, `clip_skip` applies to the positive prompt only; without it both prompts go
        through the encoders as one batch.
        """
        same_shapes = set(token_ids) == set(negative_token_ids) and all(
            tuple(ops.shape(token_ids[k])) == tuple(ops.shape(negative_token_ids[k])) for k in token_ids)
        if clip_skip is None and same_shapes:
            both = {k: ops.concatenate([token_ids[k], negative_token_ids[k]], axis=0) for k in token_ids}
            context, pooled = self.encode_text(both)
            n = ops.shape(context)[0] // 2  # slices, not `split`: torch's split views refuse in-place updates
            return context[:n], context[n:], pooled[:n], pooled[n:]
        positive, positive_pooled = self.encode_text(token_ids, clip_skip)
        negative, negative_pooled = self.encode_text(negative_token_ids)
        return positive, negative, positive_pooled, negative_pooled

    text_encoders_device = None  # where the text encoders live and run (None: with the rest)

    def encode_image_step(self, images):
        """(B, H, W, 3) images in [-1, 1] -> scaled latents `(mean - shift) * scale`, float32 (on tiles
        when `enable_vae_tiling` is on and the images are larger than a tile)."""
        mean = self._vae("encode", ops.convert_to_tensor(images))
        return (mean - self.vae_config.shift_factor) * self.vae_config.scaling_factor

    def add_noise_step(self, latents, noises, step, num_steps):
        """Latents noised to the level before `step` of `num_steps` (image-to-image start)."""
        return sampling.add_noise(latents, noises, sampling.sigma(step, num_steps))

    def denoise_step(self, latents, embeddings, step, num_steps, guidance_scale=None, skip_layer_guidance=None,
                     control=None):
        """One Euler step from `step` to `step + 1` of `num_steps`.

        Args:
            latents: (B, h, w, C) latents.
            embeddings: `(positive, negative, positive_pooled, negative_pooled)` from `encode_text_step`.
            step, num_steps: ints or int tensors.
            guidance_scale: None for no classifier-free guidance (only the positive pair is used),
                else a float or scalar tensor `g` giving `v = v_neg + g * (v_pos - v_neg)`.
            skip_layer_guidance: None or a `sampling.SkipLayerGuidance` (used with guidance only).
            control: None or ControlNet conditioning, as `predict_velocity`'s (not used by skip-layer
                guidance's extra pass).

        Returns:
            float32 latents after the step.
        """
        sigma_now = sampling.sigma(step, num_steps)
        sigma_next = sampling.sigma(ops.add(step, 1), num_steps)
        velocity = self.guided_velocity(latents, embeddings, sigma_now, step, num_steps, guidance_scale,
                                        skip_layer_guidance, control)
        return sampling.euler_step(latents, velocity, sigma_now, sigma_next)

    def guided_velocity(self, latents, embeddings, sigma, step, num_steps, guidance_scale=None,
                        skip_layer_guidance=None, control=None, timestep=None, step_cache=None):
        """The velocity a sampler steps with at noise level `sigma` during step `step` of `num_steps`:
        the positive prompt's, or with classifier-free (and skip-layer) guidance. Arguments as
        `denoise_step`'s; `timestep` and `step_cache` as `predict_velocity`'s (the cache serves the
        guided pass, not skip-layer guidance's extra one). Returns float32 (B, h, w, C), and with
        `step_cache` the new cache."""
        positive, negative, positive_pooled, negative_pooled = embeddings
        cached = step_cache is not None
        if guidance_scale is None:
            return self.predict_velocity(latents, positive, positive_pooled, sigma, control=control, timestep=timestep,
                                         step_cache=step_cache)
        velocity = self.predict_velocity(
            ops.concatenate([latents, latents], axis=0),
            ops.concatenate([positive, negative], axis=0),
            ops.concatenate([positive_pooled, negative_pooled], axis=0),
            sigma,
            control=control,
            timestep=timestep,
            step_cache=step_cache,
        )
        velocity, cache = velocity if cached else (velocity, None)
        v_positive, v_negative = ops.split(velocity, 2, axis=0)
        velocity = sampling.classifier_free_guidance(v_positive, v_negative, guidance_scale)
        if skip_layer_guidance is not None:
            velocity = self._skip_layer_guidance(velocity, v_positive, latents, positive, positive_pooled, sigma,
                                                 step, num_steps, skip_layer_guidance, timestep)
        return (velocity, cache) if cached else velocity

    def _skip_layer_guidance(self, guided, v_positive, latents, context, pooled, sigma, step, num_steps, slg, timestep):
        def with_skip():
            skipped = self.predict_velocity(latents, context, pooled, sigma, skip_layers=slg.layers, timestep=timestep)
            return slg.apply(guided, v_positive, skipped)

        return ops.cond(slg.is_active(step, num_steps), with_skip, lambda: guided)

    def decode_step(self, latents):
        """Scaled latents -> (B, H, W, 3) float32 images in about [-1, 1] (not clipped; on tiles when
        `enable_vae_tiling` is on and the latents are larger than a tile)."""
        latents = ops.cast(latents, "float32") / self.vae_config.scaling_factor + self.vae_config.shift_factor
        return self._vae("decode", latents)
