"""Building blocks shared by the MMDiT and the VAE.

Sub-layers are created and built in `__init__` (all sizes are known from the config), and named after
the diffusers state-dict keys so that `keras_sd3.weights.assign.named_variables` finds every weight.
Normalisations and softmax run in float32 whatever the compute dtype.
"""

import threading

import keras
from keras import ops

from keras_sd3 import backend
from keras_sd3.backend import attention, linear, torch_conv2d, torch_group_norm

_CALLS = threading.local()  # how deep this thread is inside keras_sd3 layers' calls
_TORCH = keras.config.backend() == "torch"
if _TORCH:
    import torch


class DirectCalls:
    """Mixin of keras_sd3's layers: on torch, a call made from inside another keras_sd3 layer's call
    goes straight to `call`, after the input casting Keras would do.

    Keras' `Layer.__call__` (argument handling, scopes, `torch.nn.Module` dispatch) costs tens of
    microseconds a call; torch runs eagerly, so on a small model that is most of the time (the embedded
    model's MMDiT step: 22.5 ms eagerly). The outermost call still goes through Keras (its autocast
    scope then covers the nested calls); jax and tensorflow trace once, so they keep Keras' path.
    """

    def __call__(self, *args, **kwargs):
        depth = getattr(_CALLS, "depth", 0)
        if _TORCH and depth and self.built:
            args = tuple(self._convert_input(a) for a in args)
            return self.call(*args, **{k: self._convert_input(v) for k, v in kwargs.items()})
        _CALLS.depth = depth + 1
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _CALLS.depth = depth

    def _convert_input(self, value):
        if isinstance(value, (tuple, list)):
            return type(value)(self._convert_input(v) for v in value)
        if _TORCH and isinstance(value, torch.Tensor) and (
                not value.is_floating_point() or value.dtype == getattr(torch, self.input_dtype)):
            return value  # what Keras would return, without its dtype checks
        return self.dtype_policy.convert_input(value, self.autocast, self.input_dtype)


class Layer(DirectCalls, keras.layers.Layer):
    """The base of keras_sd3's layers (see `DirectCalls`)."""


class Conv2D(DirectCalls, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with `DirectCalls`; on torch its product is `torch_conv2d` (no layout copies)."""

    def call(self, inputs):
        if not _TORCH:
            return super().call(inputs)
        return torch_conv2d(inputs, self.kernel, self.bias if self.use_bias else None, self.strides, self.padding)


class Linear(DirectCalls, keras.layers.Dense):
    """A `keras.layers.Dense` (same variables) whose product goes through `keras_sd3.backend.linear`.

    LoRA adapters attached by `keras_sd3.lora` (`backbone.load_lora`) each add their low-rank product.
    `quantize("int8" | "int4", config=...)` is Keras' `Dense.quantize` (its variables and dtype
    policy); the product is then `keras_sd3.quantization.quantized_linear`. A weight loaded in a
    checkpoint's GGUF block type or float8 stays so (`weight_format`; `keras_sd3.quantization.stored`).
    """

    weight_format = None  # a `keras_sd3.weights.forms` form when the weight is stored as the file has it

    @property
    def features(self):
        """(input features, output features), whatever form the kernel is stored in."""
        return self.input_spec.axes[-1], self.units

    @property
    def compressed(self):
        """Whether the kernel is not a plain float one (Keras-quantized, or stored as a file has it)."""
        return self.quantization_mode is not None or self.weight_format is not None

    def quantize(self, mode=None, type_check=True, config=None):
        from keras_sd3.quantization import quantize_linear

        quantize_linear(self, mode, config)

    def quantized_call(self, inputs, training=None):
        return self.call(inputs)

    def call(self, inputs):
        if self.weight_format is not None:
            from keras_sd3.quantization.stored import stored_linear

            out = stored_linear(self, inputs)
        elif self.quantization_mode is None:
            out = linear(inputs, self.kernel, self.bias)
        else:
            from keras_sd3.quantization import quantized_linear

            out = quantized_linear(self, inputs)
        for adapter in getattr(self, "_lora_adapters", {}).values():
            out = out + adapter(inputs)
        return out


def dense(units, in_dim, dtype, use_bias=True):
    """A built `Linear` mapping `in_dim` -> `units`."""
    layer = Linear(units, use_bias=use_bias, dtype=dtype)
    layer.build((None, in_dim))
    return layer


def conv(filters, in_channels, kernel_size, dtype, strides=1, padding="same"):
    """A built channels-last `keras.layers.Conv2D`."""
    layer = Conv2D(filters, kernel_size, strides=strides, padding=padding, dtype=dtype)
    layer.build((None, None, None, in_channels))
    return layer


def layer_norm(x, epsilon=1e-6):
    """LayerNorm over the last axis without affine parameters, computed in float32."""
    return ops.cast(backend.layer_norm(x, epsilon), x.dtype)


def modulate(x, shift, scale):
    """adaLN modulation `x * (1 + scale) + shift` with (B, D) parameters broadcast over tokens."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def multi_head_attention(q, k, v, heads, is_causal=False, scale=None):
    """Softmax attention of (B, T, heads * H) projections; returns (B, T, heads * H).

    `scale` defaults to 1 / sqrt(H); the softmax runs in float32 inside the backends' fused kernels.
    """
    batch, head_dim = backend.shape(q)[0], backend.shape(q)[-1] // heads
    q, k, v = (backend.reshape(x, (batch, -1, heads, head_dim)) for x in (q, k, v))  # (B, T, N, H)
    out = attention(q, k, v, scale=head_dim**-0.5 if scale is None else scale, is_causal=is_causal)
    return backend.reshape(out, (batch, -1, heads * head_dim))


class LayerNorm(Layer):
    """LayerNorm over the last axis with affine `weight` / `bias`, computed in float32."""

    def __init__(self, dim, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.weight = self.add_weight(shape=(dim,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(dim,), initializer="zeros", name="bias")
        self.built = True

    def call(self, x):
        return ops.cast(backend.layer_norm(x, self.epsilon, self.weight, self.bias), self.compute_dtype)


class RMSNorm(Layer):
    """RMS normalisation over the last axis with a learned `weight`, variance in float32."""

    def __init__(self, dim, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.weight = self.add_weight(shape=(dim,), initializer="ones", name="weight")
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        x32 = x32 * ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return ops.cast(x32, self.compute_dtype) * self.weight


class GroupNorm(Layer):
    """GroupNorm over channels-last feature maps with affine `weight` / `bias`, in float32."""

    def __init__(self, channels, groups, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.epsilon = groups, epsilon
        self.weight = self.add_weight(shape=(channels,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(channels,), initializer="zeros", name="bias")
        self.built = True

    def call(self, x):
        if _TORCH:
            return torch_group_norm(x, self.groups, self.weight, self.bias, self.epsilon)
        shape = ops.shape(x)
        grouped = ops.reshape(ops.cast(x, "float32"), (-1, shape[1], shape[2], self.groups, shape[3] // self.groups))
        mean, variance = ops.moments(grouped, axes=(1, 2, 4), keepdims=True)
        y = ops.reshape((grouped - mean) * ops.rsqrt(variance + self.epsilon), (-1, shape[1], shape[2], shape[3]))
        y = y * ops.cast(self.weight, "float32") + ops.cast(self.bias, "float32")
        return ops.cast(y, self.compute_dtype)


class Modulation(Layer):
    """adaLN parameters: `linear(silu(temb))` split into `count` (B, D) chunks."""

    def __init__(self, dim, count, **kwargs):
        super().__init__(**kwargs)
        self.count = count
        self.linear = dense(count * dim, dim, self.dtype_policy)
        self.built = True

    def call(self, temb):
        return backend.split(self.linear(backend.silu(temb)), self.count)


class FeedForward(Layer):
    """Linear -> tanh-approximated GELU -> Linear (diffusers `FeedForward`, `net.0.proj` / `net.2`)."""

    checkpoint_aliases = {"proj_in": "net.0.proj", "proj_out": "net.2"}

    def __init__(self, dim, mult=4, **kwargs):
        super().__init__(**kwargs)
        self.proj_in = dense(mult * dim, dim, self.dtype_policy)
        self.proj_out = dense(dim, mult * dim, self.dtype_policy)
        self.built = True

    def call(self, x):
        return self.proj_out(backend.gelu_tanh(self.proj_in(x)))


class Attention(Layer):
    """Multi-head attention, optionally joint over image tokens and a second (context) stream.

    With `context_dim`, queries / keys / values of both streams are concatenated along the sequence
    ([image; context]) and attended jointly, as in the MMDiT. `context_output=False` (the last MMDiT
    block) drops the context's output projection and its queries: only the image tokens query the joint
    keys (diffusers computes the context's rows of the attention too, then discards them).

    Args:
        dim: width of the image stream.
        heads, head_dim: attention heads.
        qk_norm: RMS-normalise queries and keys per head (SD3.5).
        context_dim: width of the context stream, or None for self-attention.
        context_output: whether the context stream gets an output projection.
    """

    def __init__(self, dim, heads, head_dim, qk_norm=False, context_dim=None, context_output=True, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.head_dim = heads, head_dim
        inner, policy = heads * head_dim, self.dtype_policy
        self.to_q, self.to_k, self.to_v = (dense(inner, dim, policy) for _ in range(3))
        self.norm_q, self.norm_k = (RMSNorm(head_dim, dtype=policy) if qk_norm else None for _ in range(2))
        self.to_out = [dense(dim, inner, policy)]
        if context_dim is not None:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (dense(inner, context_dim, policy) for _ in range(3))
            self.norm_added_q, self.norm_added_k = (
                RMSNorm(head_dim, dtype=policy) if qk_norm else None for _ in range(2)
            )
            self.to_add_out = dense(context_dim, inner, policy) if context_output else None
            if not context_output:  # loaded from checkpoints but unused, so never trained (no gradient)
                self.add_q_proj.trainable = False
                if self.norm_added_q is not None:
                    self.norm_added_q.trainable = False
        self.built = True

    def _heads(self, x, projection, norm):
        x = backend.reshape(projection(x), (backend.shape(x)[0], -1, self.heads, self.head_dim))  # (B, T, N, H)
        return x if norm is None else norm(x)

    def call(self, x, context=None):
        """Returns `(image_output, context_output)`; the latter is None without a context output."""
        q = self._heads(x, self.to_q, self.norm_q)
        k = self._heads(x, self.to_k, self.norm_k)
        v = self._heads(x, self.to_v, None)
        context_output = context is not None and self.to_add_out is not None
        if context_output:  # without a context output, the context's queries would be thrown away
            q = backend.concatenate([q, self._heads(context, self.add_q_proj, self.norm_added_q)], axis=1)
        if context is not None:
            k = backend.concatenate([k, self._heads(context, self.add_k_proj, self.norm_added_k)], axis=1)
            v = backend.concatenate([v, self._heads(context, self.add_v_proj, None)], axis=1)
        out = attention(q, k, v, scale=self.head_dim**-0.5)
        out = backend.reshape(out, (backend.shape(out)[0], -1, self.heads * self.head_dim))
        tokens = backend.shape(x)[1]
        image_out = self.to_out[0](out[:, :tokens])
        return image_out, (self.to_add_out(out[:, tokens:]) if context_output else None)
