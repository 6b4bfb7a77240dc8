"""SD3 / SD3.5 ControlNets (diffusers' `SD3ControlNetModel`), built from the MMDiT's layers.

A ControlNet is a shorter copy of the MMDiT that also sees the control image's latents (through the
zero-initialised `pos_embed_input` patchify) and returns one residual per block through the
zero-initialised `controlnet_blocks`; the MMDiT adds them to its image tokens
(`MMDiT.call(controlnet_residuals=...)`). Two families, told apart by their config:

- InstantX SD3 ControlNets: their own position table (`use_pos_embed`), joint blocks fed the prompt
  context, a zero pooled embedding and control latents without the VAE shift
  (`force_zeros_for_pooled_projection=True`).
- Stability's SD3.5 ControlNets: no position table (they patchify with the MMDiT's `pos_embed`), no
  context (`joint_attention_dim=None`: single-stream blocks), the prompt's pooled embedding and the
  VAE shift (`force_zeros_for_pooled_projection=False`).
"""

import dataclasses
import json
import os

import keras
from keras import ops

from keras_sd3.models.config import MMDiTConfig
from keras_sd3.models.layers import Attention, FeedForward, Layer, Modulation, conv, dense, layer_norm, modulate
from keras_sd3.models.mmdit import JointBlock, PatchEmbed, TimeTextEmbed
from keras_sd3.weights.assign import build_then_load, load_layer_weights
from keras_sd3.weights.safetensors_file import CheckpointError, open_safetensors, open_weights


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """Hyper-parameters of an SD3 ControlNet (diffusers' `SD3ControlNetModel` config names).

    Attributes:
        num_layers: number of blocks (one residual each).
        num_attention_heads, attention_head_dim: attention heads; width = their product.
        patch_size, in_channels: latent patchify.
        joint_attention_dim: width of the prompt context, or None for single-stream blocks (no context).
        pooled_projection_dim: width of the pooled text embedding.
        pos_embed_max_size: side of the own position table (with `use_pos_embed`).
        extra_conditioning_channels: control-latent channels beyond `in_channels` (inpainting nets).
        dual_attention_layers, qk_norm: as `MMDiTConfig` (joint blocks only).
        use_pos_embed: own patchify + position table; False: the MMDiT's `pos_embed` is used.
        force_zeros_for_pooled_projection: zero pooled embedding and no VAE shift on the control
            latents (InstantX SD3); False: the prompt's pooled embedding and the shift (SD3.5).
        sample_size: native latent size (initial position table only; checkpoints store it).
    """

    num_layers: int = 18
    num_attention_heads: int = 18
    attention_head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 96
    extra_conditioning_channels: int = 0
    dual_attention_layers: tuple = ()
    qk_norm: bool = False
    use_pos_embed: bool = True
    force_zeros_for_pooled_projection: bool = True
    sample_size: int = 128

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if not self.use_pos_embed:  # the MMDiT's table is used
            object.__setattr__(self, "pos_embed_max_size", None)
        if self.use_pos_embed and not self.pos_embed_max_size:
            raise ValueError("A ControlNet with its own position table (use_pos_embed) needs pos_embed_max_size.")
        if self.joint_attention_dim is None and (self.dual_attention_layers or self.qk_norm):
            raise ValueError("Single-stream ControlNets (joint_attention_dim=None) have no dual attention or qk_norm.")

    @property
    def hidden_size(self):
        return self.num_attention_heads * self.attention_head_dim

    def block_config(self):
        """The `MMDiTConfig` the joint blocks and patch embedding are built from."""
        return MMDiTConfig(
            num_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim, patch_size=self.patch_size, in_channels=self.in_channels,
            joint_attention_dim=self.joint_attention_dim or self.hidden_size, caption_projection_dim=self.hidden_size,
            pooled_projection_dim=self.pooled_projection_dim, pos_embed_max_size=self.pos_embed_max_size or 1,
            qk_norm=self.qk_norm, dual_attention_layers=self.dual_attention_layers, sample_size=self.sample_size,
        )

    @classmethod
    def from_diffusers(cls, config):
        """Builds a config from a diffusers ControlNet `config.json` dict."""
        qk_norm = config.get("qk_norm")
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"Unsupported qk_norm {qk_norm!r}; expected None or 'rms_norm'.")
        if config.get("use_pos_embed", True) and config.get("pos_embed_type", "sincos") != "sincos":
            raise ValueError(f"Unsupported pos_embed_type {config.get('pos_embed_type')!r}; expected 'sincos'.")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("qk_norm", "joint_attention_dim")]
        values = {name: config[name] for name in names if config.get(name) is not None}
        return cls(qk_norm=qk_norm == "rms_norm", joint_attention_dim=config.get("joint_attention_dim"), **values)

    @classmethod
    def infer(cls, source, force_zeros_for_pooled_projection=None):
        """Infers the config of a single file from its (diffusers-named) tensor shapes.

        Single files do not record `force_zeros_for_pooled_projection`; it defaults to `use_pos_embed`
        (InstantX SD3 nets have a position table, Stability's SD3.5 nets do not).
        """
        def shape(key):
            if key not in source:
                raise CheckpointError(f"This file is not an SD3 ControlNet: tensor '{key}' is missing.")
            return source.shapes[key]

        dim, channels, patch, _ = shape("pos_embed_input.proj.weight")
        blocks = {int(k.split(".")[1]) for k in source.keys() if k.startswith("transformer_blocks.")}
        use_pos_embed = "pos_embed.proj.weight" in source
        in_channels = shape("pos_embed.proj.weight")[1] if use_pos_embed else channels
        joint = "context_embedder.weight" in source
        return cls(
            num_layers=max(blocks, default=-1) + 1, num_attention_heads=dim // 64, attention_head_dim=64,
            patch_size=patch, in_channels=in_channels, extra_conditioning_channels=channels - in_channels,
            joint_attention_dim=shape("context_embedder.weight")[1] if joint else None,
            pooled_projection_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
            pos_embed_max_size=int(round(shape("pos_embed.pos_embed")[1] ** 0.5)) if use_pos_embed else None,
            qk_norm=any(".attn.norm_q." in k for k in source.keys()),
            dual_attention_layers=tuple(sorted(b for b in blocks if f"transformer_blocks.{b}.attn2.to_q.weight" in source)),
            use_pos_embed=use_pos_embed,
            force_zeros_for_pooled_projection=(
                use_pos_embed if force_zeros_for_pooled_projection is None else force_zeros_for_pooled_projection
            ),
        )


class SingleBlock(Layer):
    """diffusers' `SD3SingleTransformerBlock`: adaLN-modulated self-attention and MLP on image tokens only."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        dim, policy = config.hidden_size, self.dtype_policy
        self.norm1 = Modulation(dim, 6, dtype=policy)
        self.attn = Attention(dim, config.num_attention_heads, config.attention_head_dim, dtype=policy)
        self.ff = FeedForward(dim, dtype=policy)
        self.built = True

    def call(self, x, context, temb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))[0]
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        return x, context


class ConditionEmbed(Layer):
    """Patchify of the control latents without a position table (`pos_embed_input`)."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        channels = config.in_channels + config.extra_conditioning_channels
        p = config.patch_size
        self.proj = conv(config.hidden_size, channels, p, self.dtype_policy, p, "valid")
        self.built = True

    def call(self, latents):
        x = self.proj(latents)  # (B, h, w, D)
        return ops.reshape(x, (ops.shape(x)[0], -1, ops.shape(x)[-1]))  # (B, N, D)


class SD3ControlNet(Layer):
    """An SD3 / SD3.5 ControlNet: latents and control latents -> one (B, N, D) residual per block.

    Args:
        config: a `ControlNetConfig` (or its dict).

    Call args:
        latents: (B, h, w, C) noisy latents (compute dtype).
        control_latents: (B, h, w, C + extra) VAE latents of the control image.
        context: (B, S, joint_attention_dim) prompt context (ignored by single-stream nets).
        pooled: (B, pooled_projection_dim) pooled embedding (the task passes zeros where
            `force_zeros_for_pooled_projection`).
        timestep: (B,) timesteps.
        patch_embed: the MMDiT's `pos_embed`, used when the net has none of its own.

    Returns:
        list of `num_layers` (B, N, D) residuals (unscaled).
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = ControlNetConfig(**config)
        self.config, policy = config, self.dtype_policy
        blocks, dim = config.block_config(), config.hidden_size
        self.pos_embed = PatchEmbed(blocks, dtype=policy) if config.use_pos_embed else None
        self.time_text_embed = TimeTextEmbed(blocks, dtype=policy)
        joint = config.joint_attention_dim is not None
        self.context_embedder = dense(dim, config.joint_attention_dim, policy) if joint else None
        self.transformer_blocks = [
            JointBlock(blocks, i, context_pre_only=False, dtype=policy) if joint else SingleBlock(blocks, dtype=policy)
            for i in range(config.num_layers)
        ]
        self.controlnet_blocks = [dense(dim, dim, policy) for _ in range(config.num_layers)]
        self.pos_embed_input = ConditionEmbed(config, dtype=policy)
        self.built = True

    def call(self, latents, control_latents, context, pooled, timestep, patch_embed=None):
        if self.pos_embed is None and patch_embed is None:
            raise ValueError("This ControlNet has no position table of its own: pass the MMDiT's `pos_embed`.")
        x = (self.pos_embed or patch_embed)(latents)  # (B, N, D)
        temb = self.time_text_embed(timestep, pooled)
        context = self.context_embedder(context) if self.context_embedder is not None else None
        x = x + self.pos_embed_input(control_latents)
        residuals = []
        for block, projection in zip(self.transformer_blocks, self.controlnet_blocks):
            x, context = block(x, context, temb)
            residuals.append(projection(x))
        return residuals

    def get_config(self):
        return {"config": dataclasses.asdict(self.config), **super().get_config()}

    @classmethod
    def from_preset(cls, source, dtype=None, force_zeros_for_pooled_projection=None):
        """Loads a ControlNet from a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`,
        possibly sharded) or one `.safetensors` file with the same tensor names.

        Args:
            source: the folder or file.
            dtype: Keras dtype or policy.
            force_zeros_for_pooled_projection: overrides the family rule (for single files, which do
                not record it; see `ControlNetConfig.infer`).

        Raises:
            CheckpointError: not an SD3 ControlNet, or a tensor is missing, unexpected or mis-shaped
                (the message names it).
        """
        source = os.fspath(source)
        if os.path.isdir(source):
            config_path = os.path.join(source, "config.json")
            try:
                with open(config_path) as f:
                    config = ControlNetConfig.from_diffusers(json.load(f))
            except (OSError, ValueError, TypeError) as e:
                raise CheckpointError(f"{config_path} is not a diffusers SD3 ControlNet config ({e}).") from None
            tensors = open_weights(source, "diffusion_pytorch_model")
        else:
            tensors = open_safetensors(source)
            config = ControlNetConfig.infer(tensors)
        if force_zeros_for_pooled_projection is not None:
            config = dataclasses.replace(config, force_zeros_for_pooled_projection=force_zeros_for_pooled_projection)
        return build_then_load(
            lambda: cls(config, dtype=dtype), lambda net: load_layer_weights(net, tensors, f"ControlNet {source}")
        )
