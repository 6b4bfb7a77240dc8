"""The T5 v1.1 encoder of SD3 (T5-XXL), named like transformers' `T5EncoderModel` state dict.

Pre-RMSNorm blocks (variance in float32), attention without 1/sqrt(d) scaling plus a relative position
bias computed once from block 0's table, gated GELU feed-forward (tanh approximation, as T5 v1.1).
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_sd3.backend import attention
from keras_sd3.models.clip import Embedding
from keras_sd3.models.layers import Layer, RMSNorm, dense

# How `keras_sd3.distribution` splits T5 over the model axis (see `keras_sd3.models.mmdit.LAYOUT`); the
# relative position bias table (buckets x heads) and the norms are replicated.
LAYOUT = (
    (r"encoder/block_\d+/layer_0/SelfAttention/(q|k|v)", "head_columns"),
    (r"encoder/block_\d+/layer_0/SelfAttention/o", "head_rows"),
    (r"encoder/block_\d+/layer_1/DenseReluDense/(wi_0|wi_1)", "columns"),
    (r"encoder/block_\d+/layer_1/DenseReluDense/wo", "rows"),
    (r"shared", "table", 32128),  # the real vocabulary's rows
)


TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 encoder (transformers `T5Config` names)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str = "gelu_new"  # the tanh GELU of T5 v1.1; "gelu" (exact) for KerasHub's T5 encoder

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"Only gated-gelu T5 (v1.1, as in SD3) is supported, got {self.feed_forward_proj!r}.")
        if self.dense_act_fn not in TANH_GELU + ("gelu",):
            raise ValueError(f"T5 dense_act_fn must be one of {TANH_GELU + ('gelu',)}, got {self.dense_act_fn!r}.")

    @classmethod
    def from_transformers(cls, config):
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: config[name] for name in names if config.get(name) is not None})


def relative_position_buckets(length, num_buckets=32, max_distance=128):
    """(length, length) int32 buckets of `key - query` for a bidirectional encoder.

    Half the buckets per sign; exact below `num_buckets // 4`, log-spaced up to `max_distance`.
    The log is taken in float32 as transformers does, so boundary cases land in the same bucket.
    """
    positions = np.arange(length)
    relative = positions[None, :] - positions[:, None]  # (query, key)
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    exact = half // 2
    safe = np.maximum(distance, 1).astype(np.float32)
    scaled = np.log(safe / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    large = np.minimum(exact + (scaled * np.float32(half - exact)).astype(np.int64), half - 1)
    return (buckets + np.where(distance < exact, distance, large)).astype(np.int32)


class T5Attention(Layer):
    """Unscaled multi-head self-attention (`q`, `k`, `v`, `o`); block 0 owns the position table."""

    def __init__(self, config, has_position_table, **kwargs):
        super().__init__(**kwargs)
        self.config, policy = config, self.dtype_policy
        inner = config.num_heads * config.d_kv
        self.q, self.k, self.v = (dense(inner, config.d_model, policy, use_bias=False) for _ in range(3))
        self.o = dense(config.d_model, inner, policy, use_bias=False)
        if has_position_table:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads, dtype=policy)
        self.built = True

    def position_bias(self, length):
        """(1, heads, length, length) additive bias."""
        buckets = relative_position_buckets(
            length, self.config.relative_attention_num_buckets, self.config.relative_attention_max_distance
        )
        values = self.relative_attention_bias(buckets)  # (q, k, heads)
        return ops.transpose(values, (2, 0, 1))[None]

    def call(self, x, bias):
        batch, heads, head_dim = ops.shape(x)[0], self.config.num_heads, self.config.d_kv
        q, k, v = (ops.reshape(p(x), (batch, -1, heads, head_dim)) for p in (self.q, self.k, self.v))
        bias = ops.cast(ops.broadcast_to(bias, (batch, *ops.shape(bias)[1:])), q.dtype)
        out = attention(q, k, v, bias=bias, scale=1.0)
        return self.o(ops.reshape(out, (batch, -1, heads * head_dim)))


class T5SelfAttentionLayer(Layer):
    checkpoint_aliases = {"attention": "SelfAttention"}

    def __init__(self, config, has_position_table, **kwargs):
        super().__init__(**kwargs)
        self.attention = T5Attention(config, has_position_table, dtype=self.dtype_policy)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=self.dtype_policy)
        self.built = True

    def call(self, x, bias):
        return x + self.attention(self.layer_norm(x), bias)


class T5GatedFeedForward(Layer):
    """`wo(gelu(wi_0 x) * wi_1 x)`, the tanh GELU unless `dense_act_fn` is "gelu"."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.wi_0, self.wi_1 = (dense(config.d_ff, config.d_model, policy, use_bias=False) for _ in range(2))
        self.wo = dense(config.d_model, config.d_ff, policy, use_bias=False)
        self.approximate = config.dense_act_fn in TANH_GELU
        self.built = True

    def call(self, x):
        return self.wo(ops.gelu(self.wi_0(x), approximate=self.approximate) * self.wi_1(x))


class T5FeedForwardLayer(Layer):
    checkpoint_aliases = {"feed_forward": "DenseReluDense"}

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.feed_forward = T5GatedFeedForward(config, dtype=self.dtype_policy)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=self.dtype_policy)
        self.built = True

    def call(self, x):
        return x + self.feed_forward(self.layer_norm(x))


class T5Block(Layer):
    def __init__(self, config, index, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.layer = [T5SelfAttentionLayer(config, index == 0, dtype=policy), T5FeedForwardLayer(config, dtype=policy)]
        self.built = True

    def call(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(Layer):
    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.block = [T5Block(config, i, dtype=self.dtype_policy) for i in range(config.num_layers)]
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=self.dtype_policy)
        self.built = True


class T5Encoder(Layer):
    """T5 encoder: (B, T) token ids -> (B, T, d_model) last hidden state (after the final norm).

    Args:
        config: a `T5Config`.
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model, dtype=self.dtype_policy)
        self.encoder = T5Stack(config, dtype=self.dtype_policy)
        self.built = True

    def call(self, token_ids):
        x = self.shared(token_ids)
        bias = self.encoder.block[0].layer[0].attention.position_bias(ops.shape(token_ids)[1])
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
