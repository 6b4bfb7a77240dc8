"""`Linear` layers whose weight stays in the form a checkpoint stores it in: GGUF blocks or float8.

A GGUF file's Q8_0 / Q4_K / ... matrices and ComfyUI's float8 matrices are loaded as they are stored
(`store_while_loading`), one variable per layer in place of the float kernel:

- GGUF blocks: `kernel_blocks`, uint8 (out, row bytes), the file's rows;
- float8 (e4m3fn or e5m2): `kernel_fp8`, its bits as uint8 (out, in) (tensorflow has no float8
  bitcast, and torch cannot build a float8 variable from numpy), with a float32 `kernel_fp8_scale`
  (ComfyUI's `scale_weight`, 1 for unscaled files).

Each call decodes the weight inside the traced program (`keras_sd3.quantization.ggml.dequantize`,
equal to `gguf.quants.dequantize` bit for bit; float8 through a 256-entry table of its values, times
the scale in float32), casts it to the compute dtype and multiplies, as diffusers' GGUF linear and
ComfyUI's fp8 weights do. These layers are not re-quantized (`quantize` skips them), cannot be
fused with a LoRA or exported, and stay replicated under a model-parallel distribution (their
variables are not in the layout tables; use Keras int8 / int4 to split a quantized model).
"""

import functools

import keras
import ml_dtypes
import numpy as np
from keras import ops

from keras_sd3 import backend
from keras_sd3.quantization.linear import _young_collections
from keras_sd3.weights.forms import FLOAT8, Float8, GGUFBlocks

_TORCH = keras.config.backend() == "torch"


def _add(layer, name, value, dtype):
    return layer.add_weight(shape=value.shape, dtype=dtype, trainable=False, name=name,
                            initializer=lambda shape, dtype: ops.convert_to_tensor(value, dtype))


def store_linear(layer, form, value):
    """Replaces the float kernel of a built `Linear` by `value`, its (out, in) weight stored in `form`
    (a `GGUFBlocks` or `Float8`: uint8 rows of blocks, or float8 values); keeps the variable path."""
    from keras_sd3.weights.assign import forget_pending

    prefix = layer._kernel.path.rpartition("/")[0]
    shape = tuple(reversed(layer._kernel.shape))  # (out, in)
    forget_pending(layer._kernel)
    layer._tracker.unlock()
    try:
        with _young_collections():
            del layer._kernel
        if isinstance(form, GGUFBlocks):
            layer._kernel = _add(layer, "kernel_blocks", np.ascontiguousarray(value, np.uint8), "uint8")
            added = [layer._kernel]
        else:
            bits = np.ascontiguousarray(value).astype(FLOAT8[form.dtype], copy=False).view(np.uint8)
            layer._kernel = _add(layer, "kernel_fp8", bits, "uint8")
            layer.kernel_fp8_scale = _add(layer, "kernel_fp8_scale", np.float32(form.scale), "float32")
            added = [layer._kernel, layer.kernel_fp8_scale]
    finally:
        layer._tracker.lock()
    for variable in added:
        if prefix:
            variable._path = f"{prefix}/{variable.name}"
    layer.weight_format, layer.weight_shape = form, shape


def store_while_loading(backbone):
    """The `store` hook of `load_layer_weights` for `backbone`: keeps each `Linear` weight that the
    checkpoint has in a GGUF block type or in float8 in that form (returns True), declines the rest."""
    from keras_sd3.models.layers import Linear

    layers = {id(layer._kernel): layer for layer in backbone._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, Linear)}

    def store(variable, form, value):
        layer = layers.get(id(variable))
        if layer is None or not isinstance(form, (GGUFBlocks, Float8)):
            return False
        store_linear(layer, form, value)
        return True

    return store


@functools.lru_cache(maxsize=None)
def _float8_values(dtype):
    """The float32 value of each of the 256 bit patterns of `dtype` ("float8_e4m3fn" / "float8_e5m2")."""
    return np.arange(256, dtype=np.uint8).view(getattr(ml_dtypes, dtype)).astype(np.float32)


# torch runs eagerly: a GGUF matrix is decoded this many rows at a time (a multiple of 4, so that each
# slice of its bytes stays 4-byte aligned), bounding the int32 / float32 temporaries of the decoder to
# a slice (decoding SD3.5 Large's 2432 x 14592 adaLN matrix whole takes ~0.7 GB of them).
TORCH_ROWS = 1024


def stored_weight(layer, dtype="float32"):
    """The (out, in) weight of a stored `Linear` in `dtype`, decoded (in float32) from its variables."""
    from keras_sd3.quantization import ggml

    form, raw = layer.weight_format, layer._kernel.value
    if isinstance(form, GGUFBlocks):
        rows, columns = layer.weight_shape
        step = TORCH_ROWS if _TORCH else rows
        parts = [backend.cast(ggml.dequantize(raw[i : i + step], form.ggml_type, (min(step, rows - i), columns)), dtype)
                 for i in range(0, rows, step)]
        return parts[0] if len(parts) == 1 else backend.concatenate(parts, axis=0)
    values = ops.take(ops.convert_to_tensor(_float8_values(form.dtype)), ops.cast(raw, "int32"), axis=0)
    return backend.cast(values * layer.kernel_fp8_scale.value, dtype)


def stored_linear(layer, x):
    """`x @ W.T + b` for a `Linear` whose weight `W` is stored (see the module docstring)."""
    weight = stored_weight(layer, layer.compute_dtype)
    bias = None if layer.bias is None else layer.bias.value
    return backend.linear(x, ops.transpose(weight), bias)
