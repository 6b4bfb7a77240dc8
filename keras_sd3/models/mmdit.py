"""The SD3 / SD3.5 MMDiT (Esser et al., 2024), channels-last, in `keras.ops`.

Attribute names follow diffusers' `SD3Transformer2DModel` state dict, so diffusers checkpoints load
without a key map. The SD3.5 differences are named options of the config: `qk_norm` (RMSNorm on
queries and keys) and `dual_attention_layers` (MMDiT-X: an extra image-only attention in those blocks).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_sd3 import backend
from keras_sd3.models.layers import Attention, FeedForward, Layer, Modulation, conv, dense, layer_norm, modulate

# How `keras_sd3.distribution` splits the MMDiT over a mesh's model axis (Megatron style): a regex of a
# layer's path inside the MMDiT -> how its kernel is split (see `keras_sd3.distribution.layout`).
# Everything else (timestep / pooled embedders, patch conv, proj_out, qk norms) is replicated.
LAYOUT = (
    (r"transformer_blocks_\d+/(norm1|norm1_context)/linear|norm_out/linear", "columns"),  # adaLN, by output
    (r"transformer_blocks_\d+/attn2?/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)", "head_columns"),
    (r"transformer_blocks_\d+/attn2?/(to_out_0|to_add_out)", "head_rows"),
    (r"transformer_blocks_\d+/(ff|ff_context)/net_0/proj", "columns"),
    (r"transformer_blocks_\d+/(ff|ff_context)/net_2", "rows"),
    (r"context_embedder", "columns"),
    (r"pos_embed", "positions", 192 * 192),  # the (1, positions, D) table: 192² (SD3.5 Medium 384², divisible alike)
)


def timestep_sinusoid(timestep, dim=256, max_period=10000.0):
    """Sinusoidal timestep features in [cos, sin] order (diffusers `flip_sin_to_cos=True`), float32."""
    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(half, dtype="float32") / half)
    args = ops.cast(timestep, "float32")[:, None] * freqs[None, :]  # (B, half)
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


def sincos_position_table(dim, size, base_size):
    """SD3's fixed 2-D sin-cos position table, (1, size * size, dim), row-major over (y, x).

    Coordinates are `arange(size) * base_size / size`; the first `dim / 2` channels encode x and the
    rest y, each as `[sin(p * w), cos(p * w)]` with `w = 10000 ** -(arange(dim / 4) / (dim / 4))`.
    Checkpoints store the table; this is the value a freshly built model starts from.
    """
    coords = np.arange(size, dtype=np.float64) * base_size / size
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def encode(positions):  # (N,) -> (N, dim / 2)
        angles = np.outer(positions, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    y, x = np.meshgrid(coords, coords, indexing="ij")
    table = np.concatenate([encode(x.reshape(-1)), encode(y.reshape(-1))], axis=1)
    return table[None].astype(np.float32)


def controlnet_residual_index(index, num_blocks, num_residuals):
    """Which ControlNet output block `index` of `num_blocks` receives (diffusers: `int(i / (n / r))`)."""
    return int(index / (num_blocks / num_residuals))


class PatchEmbed(Layer):
    """Patchify (2x2 conv) plus the centre crop of the stored P x P position table."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.size, dim = config.pos_embed_max_size, config.hidden_size
        self.proj = conv(dim, config.in_channels, config.patch_size, self.dtype_policy, config.patch_size, "valid")
        base_size = config.sample_size // config.patch_size

        def initializer(shape, dtype=None):  # only called for a fresh model: checkpoints store the table
            return ops.cast(sincos_position_table(dim, self.size, base_size), dtype or "float32")

        self.pos_embed = self.add_weight(
            shape=(1, self.size * self.size, dim), initializer=initializer, trainable=False, name="pos_embed"
        )
        self.built = True

    def call(self, latents):
        x = self.proj(latents)  # (B, h, w, D)
        _, h, w, dim = ops.shape(x)
        top, left = (self.size - h) // 2, (self.size - w) // 2
        table = ops.reshape(self.pos_embed, (self.size, self.size, dim))
        pos = ops.reshape(table[top : top + h, left : left + w], (1, h * w, dim))
        return ops.reshape(x, (-1, h * w, dim)) + ops.cast(pos, x.dtype)


class MLPEmbedder(Layer):
    """Linear -> SiLU -> Linear (`linear_1`, `linear_2`)."""

    def __init__(self, in_dim, dim, **kwargs):
        super().__init__(**kwargs)
        self.linear_1 = dense(dim, in_dim, self.dtype_policy)
        self.linear_2 = dense(dim, dim, self.dtype_policy)
        self.built = True

    def call(self, x):
        return self.linear_2(ops.silu(self.linear_1(x)))


class TimeTextEmbed(Layer):
    """`temb = MLP(sinusoid(t)) + MLP(pooled text)`."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.timestep_embedder = MLPEmbedder(256, config.hidden_size, dtype=self.dtype_policy)
        self.text_embedder = MLPEmbedder(config.pooled_projection_dim, config.hidden_size, dtype=self.dtype_policy)
        self.built = True

    def call(self, timestep, pooled):
        t = ops.cast(timestep_sinusoid(timestep), self.compute_dtype)
        return self.timestep_embedder(t) + self.text_embedder(pooled)


class JointBlock(Layer):
    """One MMDiT block: adaLN-modulated joint attention and MLPs for the image and context streams.

    The last block (`context_pre_only`) only updates the image stream; a dual-attention block
    (MMDiT-X) adds `attn2`, an image-only attention on the same normed input with its own modulation.
    """

    def __init__(self, config, index, context_pre_only=None, **kwargs):
        super().__init__(**kwargs)
        dim, policy = config.hidden_size, self.dtype_policy
        # ControlNets update the context in every block (`context_pre_only=False`).
        self.is_last = index == config.num_layers - 1 if context_pre_only is None else context_pre_only
        self.is_dual = index in config.dual_attention_layers
        heads = (config.num_attention_heads, config.attention_head_dim, config.qk_norm)
        self.norm1 = Modulation(dim, 9 if self.is_dual else 6, dtype=policy)
        self.norm1_context = Modulation(dim, 2 if self.is_last else 6, dtype=policy)
        self.attn = Attention(dim, *heads, context_dim=dim, context_output=not self.is_last, dtype=policy)
        self.attn2 = Attention(dim, *heads, dtype=policy) if self.is_dual else None
        self.ff = FeedForward(dim, dtype=policy)
        self.ff_context = None if self.is_last else FeedForward(dim, dtype=policy)
        self.built = True

    def call(self, x, context, temb):
        """Returns the updated `(x, context)`; context is None after the last block."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(temb)
        normed = layer_norm(x)
        c_mod = self.norm1_context(temb)
        if self.is_last:
            c_scale, c_shift = c_mod  # diffusers' AdaLayerNormContinuous order
            c_attn_in = modulate(layer_norm(context), c_shift, c_scale)
        else:
            c_attn_in = modulate(layer_norm(context), c_mod[0], c_mod[1])
        attn, c_attn = self.attn(modulate(normed, shift_msa, scale_msa), c_attn_in)
        x = x + gate_msa[:, None] * attn
        if self.is_dual:
            shift_msa2, scale_msa2, gate_msa2 = dual
            x = x + gate_msa2[:, None] * self.attn2(modulate(normed, shift_msa2, scale_msa2))[0]
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.is_last:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
        context = context + c_gate_msa[:, None] * c_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


class MMDiT(Layer):
    """The SD3 diffusion transformer: predicts the flow-matching velocity.

    Args:
        config: an `MMDiTConfig`.

    Call args:
        latents: (B, H, W, C) latents, H and W multiples of the patch size, H / p and W / p at most P.
        context: (B, S, joint_attention_dim) text tokens.
        pooled: (B, pooled_projection_dim) pooled text embedding.
        timestep: (B,) timesteps, `1000 * sigma`.
        skip_layers: indices of blocks to skip (skip-layer guidance).
        controlnet_residuals: None, or a list of (B, N, D) ControlNet outputs, added to the image tokens
            after every block but the last (`controlnet_residual_index` picks which one, as diffusers).
        step_cache: None, or `(threshold, allowed, first_residual, rest_residual)` of the step cache
            (`sampling.StepCache`): when `allowed` and the first block's residual changed by less than
            `threshold` (mean absolute difference / mean absolute value) since the last full pass,
            the other blocks are skipped and their residual from that pass is reused.

    Returns:
        (B, H, W, out_channels) velocity, in the compute dtype; with `step_cache`, also the new
        `(first_residual, rest_residual, skipped)` (residuals (B, N, D), skipped a float32 0 / 1).
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config, policy = config, self.dtype_policy
        dim = config.hidden_size
        self.pos_embed = PatchEmbed(config, dtype=policy)
        self.time_text_embed = TimeTextEmbed(config, dtype=policy)
        self.context_embedder = dense(dim, config.joint_attention_dim, policy)
        self.transformer_blocks = [JointBlock(config, i, dtype=policy) for i in range(config.num_layers)]
        self.norm_out = Modulation(dim, 2, dtype=policy)
        self.proj_out = dense(config.patch_size**2 * config.out_channels, dim, policy)
        self.built = True

    def call(self, latents, context, pooled, timestep, skip_layers=(), controlnet_residuals=None, step_cache=None):
        _, height, width, _ = ops.shape(latents)
        p, limit = self.config.patch_size, self.config.pos_embed_max_size
        if height % p or width % p or height // p > limit or width // p > limit:
            raise ValueError(
                f"Latents of size {height}x{width} do not fit this MMDiT: height and width must be "
                f"multiples of {p} and at most {p * limit} (position table of {limit}x{limit})."
            )
        x = self.pos_embed(latents)  # (B, N, D)
        temb = self.time_text_embed(timestep, pooled)  # (B, D)
        context = self.context_embedder(context)  # (B, S, D)
        cache = None
        if step_cache is None:
            x = self._blocks(x, context, temb, 0, skip_layers, controlnet_residuals)
        else:
            x, cache = self._cached_blocks(x, context, temb, *step_cache)
        scale, shift = self.norm_out(temb)
        x = self.proj_out(modulate(layer_norm(x), shift, scale))  # (B, N, p * p * C), ordered (p, q, c)
        x = ops.reshape(x, (-1, height // p, width // p, p, p, self.config.out_channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, h, p, w, q, C)
        velocity = ops.reshape(x, (-1, height, width, self.config.out_channels))
        return velocity if cache is None else (velocity, cache)

    def _blocks(self, x, context, temb, first, skip_layers=(), controlnet_residuals=None):
        """The image tokens after blocks `first ..` (the context stream ends with the last block)."""
        for index, block in enumerate(self.transformer_blocks[first:], first):
            if index not in skip_layers:
                x, context = block(x, context, temb)
            if controlnet_residuals and not block.is_last:
                x = x + controlnet_residuals[controlnet_residual_index(index, len(self.transformer_blocks),
                                                                      len(controlnet_residuals))]
        return x

    def _cached_blocks(self, x, context, temb, threshold, allowed, previous_first, previous_rest):
        """Block 0, then the other blocks or the reuse of their last residual (see `step_cache`)."""
        after_first, context = self.transformer_blocks[0](x, context, temb)
        first = after_first - x
        skip = allowed & (backend.relative_change(first, previous_first) < threshold)
        cache_dtype = previous_first.dtype

        def reuse():
            return after_first + backend.cast(previous_rest, self.compute_dtype), previous_first, previous_rest

        def compute():
            out = self._blocks(after_first, context, temb, 1)
            return out, backend.cast(first, cache_dtype), backend.cast(out - after_first, cache_dtype)

        x, first, rest = backend.cond(skip, reuse, compute)
        return x, (first, rest, backend.cast(skip, "float32"))
