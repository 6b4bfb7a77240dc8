"""The CLIP text encoders of SD3 (CLIP-L and CLIP-G), channels-last Keras, named like transformers.

Attribute names follow `CLIPTextModelWithProjection`'s state dict (`text_model.encoder.layers.0.self_attn.
q_proj`, `text_projection`, ...). SD3 uses the penultimate hidden state (no final norm) as features and
`text_projection(final_layer_norm(h)[first eos])` as the pooled embedding.
"""

import dataclasses

import keras
from keras import ops

from keras_sd3.models.layers import Layer, LayerNorm, dense, multi_head_attention

# How `keras_sd3.distribution` splits a CLIP encoder over the model axis (see `keras_sd3.models.mmdit.LAYOUT`).
LAYOUT = (
    (r"text_model/encoder/layers_\d+/self_attn/(q_proj|k_proj|v_proj)", "head_columns"),
    (r"text_model/encoder/layers_\d+/self_attn/out_proj", "head_rows"),
    (r"text_model/encoder/layers_\d+/mlp/fc1", "columns"),
    (r"text_model/encoder/layers_\d+/mlp/fc2", "rows"),
    (r"text_model/embeddings/token_embedding", "table", 49408),  # tables: the real models' row count
    (r"text_model/embeddings/position_embedding", "table", 77),
    (r"text_projection", "columns"),
)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * ops.sigmoid(1.702 * x),
    "gelu": lambda x: ops.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Hyper-parameters of a CLIP text encoder (transformers `CLIPTextConfig` names).

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: sizes.
        max_position_embeddings: sequence length (77).
        hidden_act: "quick_gelu" (CLIP-L) or "gelu" (CLIP-G).
        layer_norm_eps: LayerNorm epsilon.
        projection_dim: width of `text_projection`.
        eos_token_id: id whose first occurrence gives the pooled token (2 means "argmax of ids",
            transformers' legacy rule).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported CLIP hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}.")

    @classmethod
    def from_transformers(cls, config):
        """Builds a config from a transformers `config.json` dict (`text_config` nested or not)."""
        config = config.get("text_config", config)
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: config[name] for name in names if config.get(name) is not None})


class Embedding(Layer):
    """A lookup table stored as `weight` (rows = ids)."""

    def __init__(self, count, dim, **kwargs):
        super().__init__(**kwargs)
        self.weight = self.add_weight(shape=(count, dim), initializer="normal", name="weight")
        self.built = True

    def call(self, ids):
        return ops.take(self.weight, ops.cast(ids, "int32"), axis=0)


class CLIPEmbeddings(Layer):
    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=self.dtype_policy)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size, dtype=self.dtype_policy)
        self.built = True

    def call(self, ids):
        positions = ops.arange(ops.shape(ids)[1])
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class CLIPAttention(Layer):
    """Causal multi-head self-attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`)."""

    def __init__(self, dim, heads, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (dense(dim, dim, self.dtype_policy) for _ in range(4))
        self.built = True

    def call(self, x):
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, is_causal=True)
        return self.out_proj(out)


class CLIPMLP(Layer):
    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = dense(config.intermediate_size, config.hidden_size, self.dtype_policy)
        self.fc2 = dense(config.hidden_size, config.intermediate_size, self.dtype_policy)
        self.built = True

    def call(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(Layer):
    """Pre-LayerNorm transformer layer."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        policy, dim, eps = self.dtype_policy, config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = LayerNorm(dim, eps, dtype=policy)
        self.self_attn = CLIPAttention(dim, config.num_attention_heads, dtype=policy)
        self.layer_norm2 = LayerNorm(dim, eps, dtype=policy)
        self.mlp = CLIPMLP(config, dtype=policy)
        self.built = True

    def call(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(Layer):
    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.layers = [CLIPEncoderLayer(config, dtype=self.dtype_policy) for _ in range(config.num_hidden_layers)]
        self.built = True


class CLIPTextTransformer(Layer):
    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.embeddings = CLIPEmbeddings(config, dtype=self.dtype_policy)
        self.encoder = CLIPEncoder(config, dtype=self.dtype_policy)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=self.dtype_policy)
        self.built = True


class CLIPTextEncoder(Layer):
    """CLIP text encoder with projection, returning SD3's features.

    Args:
        config: a `CLIPConfig`.

    Call args:
        token_ids: (B, 77) int token ids.
        clip_skip: number of final layers to skip (None or 0: the penultimate hidden state).

    Returns:
        `(hidden, pooled)`: (B, 77, hidden_size) = hidden state `-(clip_skip + 2)` (no final norm), and
        (B, projection_dim) = `text_projection(final_layer_norm(last)[first eos])`.
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=self.dtype_policy)
        self.text_projection = dense(config.projection_dim, config.hidden_size, self.dtype_policy, use_bias=False)
        self.built = True

    def call(self, token_ids, clip_skip=None):
        model, skip = self.text_model, clip_skip or 0
        if not 0 <= skip < self.config.num_hidden_layers:
            raise ValueError(f"clip_skip must be in [0, {self.config.num_hidden_layers - 1}], got {clip_skip}.")
        hidden_states = [model.embeddings(token_ids)]
        for layer in model.encoder.layers:
            hidden_states.append(layer(hidden_states[-1]))
        last = model.final_layer_norm(hidden_states[-1])
        if self.config.eos_token_id == 2:
            eos_position = ops.argmax(token_ids, axis=-1)
        else:
            eos_position = ops.argmax(ops.cast(ops.equal(token_ids, self.config.eos_token_id), "int32"), axis=-1)
        select = ops.one_hot(eos_position, ops.shape(token_ids)[1], dtype=last.dtype)  # (B, T), exact gather
        pooled = ops.einsum("bt,btd->bd", select, last)
        return hidden_states[-(skip + 2)], self.text_projection(pooled)
