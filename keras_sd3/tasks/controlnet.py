"""`StableDiffusion3ControlNet`: prompts and control images -> images (diffusers' SD3 ControlNet pipeline).

Each step runs every ControlNet on the (CFG-doubled) latents, sums their residuals, each weighted by
its scale while the step lies in its `[control_guidance_start, control_guidance_end]` window (else 0),
and adds them to the MMDiT's image tokens. Scales and windows are traced inputs of one compiled
loop, so changing them, the prompts or the step count never recompiles.
"""

import numpy as np
from keras import ops

from keras_sd3.models.controlnet import SD3ControlNet
from keras_sd3.tasks.inputs import batch_images, check_num_steps
from keras_sd3.tasks.loop import CompiledSteps, sampler_step
from keras_sd3.tasks.task import GenerationTask, load_parts, split_over_devices

INPUT_KEYS = ("prompts", "negative_prompts", "control_images")


def control_window(num_steps, start, end):
    """`(first, last)` steps (inclusive) at which a ControlNet acts; diffusers' `controlnet_keep`
    drops step i when `i / N < start or (i + 1) / N > end`. `(N, -1)` when it never acts."""
    kept = [i for i in range(num_steps) if not (i / num_steps < start or (i + 1) / num_steps > end)]
    return (kept[0], kept[-1]) if kept else (num_steps, -1)


def per_controlnet(value, count, name):
    """A number or a list of `count` numbers -> a list of `count` floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} ControlNets: give one number, or one per ControlNet.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
            raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}.")
    return [float(v) for v in values]


def check_control_images(control_images, count, image_shape):
    """One (H, W, 3) or (B, H, W, 3) array per ControlNet (a list for several) -> list of 4-D float32 arrays.

    Raises:
        ValueError: the count differs from the number of ControlNets, or an image is not of the output size.
    """
    images = list(control_images) if isinstance(control_images, (list, tuple)) else [control_images]
    if len(images) != count:
        raise ValueError(f"Got {len(images)} control image(s) for {count} ControlNet(s): give one control image "
                         "(or batch) per ControlNet, as a list when there are several.")
    checked = []
    for i, image in enumerate(images):
        image = np.asarray(image, np.float32)
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"control image {i} must have shape (H, W, 3) or (B, H, W, 3), got {np.shape(images[i])}.")
        if image.shape[1:3] != tuple(image_shape[:2]):
            raise ValueError(
                f"control image {i} is {image.shape[1]} x {image.shape[2]} pixels but the output is "
                f"{image_shape[0]} x {image_shape[1]} (the backbone's image_shape): give control images of the output size."
            )
        checked.append(image)
    return checked


class _Variables:
    """The variables of several layers, as `backend.compile_function` reads them from a model."""

    def __init__(self, *layers):
        self.trainable_variables = [v for layer in layers for v in layer.trainable_variables]
        self.non_trainable_variables = [v for layer in layers for v in layer.non_trainable_variables]


def controlnet_residuals(nets, control_latents, weights, patch_embed):
    """`control(latents, context, pooled, timestep)` for `backbone.denoise_step`: the weighted sum of the nets' residuals."""

    def control(latents, context, pooled, timestep):
        total = None
        for i, net in enumerate(nets):
            net_pooled = ops.zeros_like(pooled) if net.config.force_zeros_for_pooled_projection else pooled
            cond = ops.cast(control_latents[i], latents.dtype)
            weight = ops.cast(weights[i], latents.dtype)
            outputs = net(latents, cond, context, net_pooled, timestep, patch_embed=patch_embed)
            residuals = [ops.cast(r, latents.dtype) * weight for r in outputs]  # a float32 net beside a bfloat16 MMDiT
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        return total

    return control


def control_steps(backbone, nets, state, embeddings, control_latents, scales, first, last, start, stop, num_steps,
                  guidance_scale, use_cfg, decode):
    """Euler steps `start .. stop - 1` with ControlNets -> `(state, decoded images or None)`.

    Args:
        state: the loop state (`loop.initial_state`).
        control_latents: tuple of (B, h, w, C) control latents, one per net.
        scales, first, last: (n,) float32 scales and int32 step windows (inclusive), one per net.
    """
    patch_embed = backbone.diffuser.pos_embed
    if use_cfg:  # the latents are doubled for guidance in each step; so are the control latents
        control_latents = tuple(ops.concatenate([c, c]) for c in control_latents)

    def body(step, state):
        active = ops.logical_and(ops.greater_equal(step, first), ops.less_equal(step, last))
        control = controlnet_residuals(nets, control_latents, scales * ops.cast(active, "float32"), patch_embed)
        return sampler_step(backbone, "euler", state, embeddings, step, num_steps,
                            guidance_scale if use_cfg else None, control=control)

    state = ops.fori_loop(start, stop, body, tuple(state))
    return state, (backbone.decode_step(state[0]) if decode else None)


class ControlNetSteps(CompiledSteps):
    """`control_steps` compiled once per (guidance on / off, decode) with the backbone's and the nets' variables."""

    def __init__(self, backbone, nets):
        super().__init__(backbone, _Variables(backbone, *nets))
        self.nets = nets

    def __call__(self, *args, use_cfg, decode):
        program = lambda *a: control_steps(self.backbone, self.nets, *a, use_cfg=use_cfg, decode=decode)  # noqa: E731
        return self._program((use_cfg, decode), program)(*args)


def check_compatible(backbone, nets):
    """Raises ValueError unless every net fits the backbone's MMDiT and image size, and all have as many blocks."""
    mmdit, (h, w, channels) = backbone.mmdit_config, backbone.latent_shape
    for i, net in enumerate(nets):
        config = net.config
        checks = [
            ("width", config.hidden_size, mmdit.hidden_size), ("patch_size", config.patch_size, mmdit.patch_size),
            ("in_channels", config.in_channels, channels), ("extra_conditioning_channels", config.extra_conditioning_channels, 0),
            ("pooled_projection_dim", config.pooled_projection_dim, mmdit.pooled_projection_dim),
        ]
        if config.joint_attention_dim is not None:
            checks.append(("joint_attention_dim", config.joint_attention_dim, mmdit.joint_attention_dim))
        for name, got, expected in checks:
            if got != expected:
                raise ValueError(f"ControlNet {i} has {name}={got}, but this backbone needs {expected}.")
        if config.use_pos_embed and max(h, w) > config.patch_size * config.pos_embed_max_size:
            raise ValueError(f"ControlNet {i}'s position table ({config.pos_embed_max_size}^2) is too small for "
                             f"{h} x {w} latents.")
    layers = sorted({net.config.num_layers for net in nets})
    if len(layers) > 1:
        raise ValueError(f"ControlNets with different numbers of blocks {layers} cannot be combined.")


class StableDiffusion3ControlNet(GenerationTask):
    """Text-to-image guided by one or several ControlNets (diffusers' `StableDiffusion3ControlNetPipeline`).

    Args:
        backbone: a `StableDiffusion3Backbone`.
        preprocessor: its preprocessor (or None with precomputed embeddings).
        controlnets: an `SD3ControlNet` or a list of them.
        defaults: generation defaults, as `GenerationTask`.

    Example:
        >>> net = SD3ControlNet.from_preset("path/to/SD3-Controlnet-Canny")
        >>> task = StableDiffusion3ControlNet.from_preset("path/to/sd3", [net], image_shape=(1024, 1024, 3))
        >>> image = task.generate({"prompts": "a house", "control_images": [edges]}, controlnet_conditioning_scale=0.7)
    """

    def __init__(self, backbone, preprocessor=None, controlnets=(), defaults=None):
        super().__init__(backbone, preprocessor, defaults)
        nets = list(controlnets) if isinstance(controlnets, (list, tuple)) else [controlnets]
        if not nets or not all(isinstance(net, SD3ControlNet) for net in nets):
            raise ValueError(f"controlnets must be an SD3ControlNet or a non-empty list of them, got {controlnets!r}.")
        check_compatible(backbone, nets)
        self.controlnets = nets
        self.control_compiled = ControlNetSteps(backbone, nets)

    @classmethod
    def from_preset(cls, source, controlnets, image_shape=None, dtype=None, **kwargs):
        """Loads the backbone and preprocessor (as `GenerationTask.from_preset`) and the ControlNets
        (`SD3ControlNet`s, or paths given to `SD3ControlNet.from_preset`)."""
        backbone, preprocessor, defaults = load_parts(source, image_shape, dtype, **kwargs)
        nets = controlnets if isinstance(controlnets, (list, tuple)) else [controlnets]
        nets = [net if isinstance(net, SD3ControlNet) else SD3ControlNet.from_preset(net, dtype=dtype) for net in nets]
        return cls(backbone, preprocessor, nets, defaults)

    def generate(self, inputs, num_steps=None, guidance_scale=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0, seed=None, latents=None, num_images=1,
                 embeddings=None, output="images", callback=None, progress=False):
        """Generates images from `{"prompts"[, "negative_prompts"], "control_images"}`.

        Control images and settings are checked before any model work.

        Args:
            inputs: prompts as `StableDiffusion3TextToImage`; `control_images`: per ControlNet an (H, W, 3)
                image or (B, H, W, 3) batch in [-1, 1] of the output size (one, or one per prompt); a list
                of them for several ControlNets.
            controlnet_conditioning_scale: a float, or one per ControlNet (diffusers' default 1.0).
            control_guidance_start, control_guidance_end: fractions of the steps in which each
                ControlNet acts (a float or one per ControlNet; 0 <= start < end <= 1).
            Others: as `StableDiffusion3TextToImage.generate` (no skip-layer guidance).

        Returns:
            (H, W, 3) uint8 for one prompt string, else (B, H, W, 3); latents likewise.
        """
        count = len(self.controlnets)
        if not isinstance(inputs, dict) or "control_images" not in inputs:
            raise ValueError("inputs must be a dict with 'control_images' (and 'prompts' unless embeddings are given).")
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown:
            raise ValueError(f"inputs has unknown key(s) {unknown}; expected {list(INPUT_KEYS)}.")
        control_images = check_control_images(inputs["control_images"], count, self.backbone.image_shape)
        scales = per_controlnet(controlnet_conditioning_scale, count, "controlnet_conditioning_scale")
        starts = per_controlnet(control_guidance_start, count, "control_guidance_start")
        ends = per_controlnet(control_guidance_end, count, "control_guidance_end")
        for start, end in zip(starts, ends):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"control guidance must satisfy 0 <= start < end <= 1, got start {start}, end {end}.")
        num_steps, guidance_scale, _ = self.settings(num_steps, guidance_scale, None)
        if output not in ("images", "latents"):
            raise ValueError(f"output must be 'images' or 'latents', got {output!r}.")
        prompt_inputs = {k: v for k, v in inputs.items() if k != "control_images"}
        single, _, embeddings = self.prepare(prompt_inputs, ("prompts",), embeddings, num_images)
        batch = embeddings[0].shape[0]
        latents = self.noise(batch, seed) if latents is None else self.check_noise(latents, batch, "latents")
        use_cfg = guidance_scale > 1.0
        control_latents = tuple(self.encode_control(net, image, batch, num_images)
                                for net, image in zip(self.controlnets, control_images))
        windows = [control_window(num_steps, s, e) for s, e in zip(starts, ends)]
        controls = (control_latents, ops.convert_to_tensor(np.asarray(scales, np.float32)),
                    ops.convert_to_tensor(np.asarray([w[0] for w in windows], np.int32)),
                    ops.convert_to_tensor(np.asarray([w[1] for w in windows], np.int32)))
        outputs = self.run_controlled(latents, embeddings, controls, num_steps, guidance_scale, use_cfg, output,
                                      callback, progress)
        return self.unbatch(outputs, single, num_images)

    def encode_control(self, net, images, batch, num_images):
        """Control images -> (batch, h, w, C) latents: the VAE posterior mean, `* scale`, and `- shift`
        unless the net is an InstantX one (`force_zeros_for_pooled_projection`)."""
        if len(images) not in (1, batch) and len(images) * num_images == batch:
            images = np.repeat(images, num_images, axis=0)
        images = batch_images(images, batch, self.backbone.image_shape, "control_images")
        latents = ops.convert_to_numpy(self.compiled.encode(images))
        if net.config.force_zeros_for_pooled_projection:
            vae = self.backbone.vae_config
            latents = latents + vae.shift_factor * vae.scaling_factor
        return latents

    def run_controlled(self, latents, embeddings, controls, num_steps, guidance_scale, use_cfg, output, callback,
                       progress):
        """The compiled loop over all steps, or step by step for a callback / progress bar; the batch
        split over the devices' batch axis as in `GenerationTask.run`."""
        batch, (control_latents, *settings) = latents.shape[0], controls
        callback, latents, embeddings, *control_latents = split_over_devices(
            callback, latents, embeddings, *control_latents)
        outputs = self.run_program(self.control_compiled, latents, (embeddings, tuple(control_latents), *settings), 0,
                                   check_num_steps(num_steps), guidance_scale, output, callback, progress, use_cfg=use_cfg)
        return outputs[:batch]
