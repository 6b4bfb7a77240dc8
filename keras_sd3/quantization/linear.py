"""The product of a quantized `Linear` (Keras' int8 / int4 variables) on each backend.

Keras' `Dense.quantize` makes the variables: int8 `kernel` (in, out) with `kernel_scale` (out,), the
float weight being `kernel / kernel_scale`; int4 packs two values a byte along the output axis
(`kernel` (in, ceil(out / 2))), per output channel or, with `Int4QuantizationConfig(block_size=...)`,
per group of input rows (`kernel_scale` / `kernel_zero` (groups, out)). Here:

- weight-only (no activation quantizer): `(x @ float(kernel)) / kernel_scale`; jax and tensorflow
  trace the int -> float conversion into the compiled program, where XLA fuses it with the product;
- W8A8 (int8 with an activation quantizer): each token of `x` quantised by the quantizer, the product
  in int32 (`torch._int_mm` on torch where its shape rules allow, CUDA's int8 tensor cores; XLA's
  int8 dot elsewhere), divided by both scales.
"""

import contextlib
import gc

import keras
from keras import ops

from keras_sd3 import backend

_TORCH = keras.config.backend() == "torch"


def quantize_linear(layer, mode, config=None):
    """Quantizes a built `Linear` with Keras' `Dense.quantize` (`mode` "int8" or "int4", optional Keras
    `config`) and keeps its checkpoint-named variable paths."""
    prefix = layer._kernel.path.rpartition("/")[0]
    with _young_collections():
        keras.layers.Dense.quantize(layer, mode, type_check=False, config=config)
    for name in ("_kernel", "kernel_scale", "kernel_zero", "g_idx"):
        variable = getattr(layer, name, None)
        if variable is not None and prefix:
            variable._path = f"{prefix}/{variable.name}"


@contextlib.contextmanager
def _young_collections():
    """Keras runs a full `gc.collect()` after deleting a layer's variable (0.2 s a layer for the embedded
    model, more for a large heap: minutes over SD3.5 Large's ~800 layers). The float kernel it deletes
    is freed by reference counting, so here a collection of the youngest generation stands in for it."""
    full = gc.collect
    gc.collect = lambda generation=2: full(0)
    try:
        yield
    finally:
        gc.collect = full


def _int_matmul(x, kernel):
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32."""
    if _TORCH:
        import torch

        m, k = x.shape
        n = kernel.shape[1]
        if m > 16 and k >= 16 and k % 8 == 0 and n % 8 == 0:
            return torch._int_mm(x, kernel)
        return torch.mm(x.to(torch.int32), kernel.to(torch.int32))
    return ops.matmul(x, kernel)  # int32 products (Keras asks XLA for preferred_element_type=int32)


def _w8a8(layer, x):
    shape = backend.shape(x)
    flat = backend.reshape(x, (-1, shape[-1]))
    q, scale = layer.inputs_quantizer(flat, axis=-1)  # (M, K) int8, (M, 1)
    out = backend.cast(_int_matmul(q, layer._kernel.value), layer.compute_dtype)
    out = out / (layer.kernel_scale.value * backend.cast(scale, layer.compute_dtype))
    return backend.reshape(out, (*shape[:-1], out.shape[-1]))


def _float_kernel(layer, dtype=None):
    """(kernel in `dtype` (default the compute dtype), the per-output-channel scale it is still to be
    divided by), or (the dequantised kernel, None) for int4 per group of input rows (Keras' default
    int4, groups of 128)."""
    dtype = dtype or layer.compute_dtype
    if layer.quantization_mode == "int8":
        return backend.cast(layer._kernel.value, dtype), layer.kernel_scale.value
    from keras import quantizers

    unpacked = quantizers.unpack_int4(layer._kernel.value, layer._orig_output_dim, axis=-1)
    if getattr(layer, "_int4_block_size", None) in (None, -1):
        return backend.cast(unpacked, dtype), layer.kernel_scale.value
    from keras.src.quantizers.quantizers import dequantize_with_sz_map

    kernel = dequantize_with_sz_map(unpacked, layer.kernel_scale.value, layer.kernel_zero.value, layer.g_idx.value,
                                    group_axis=0)  # (q - zero) * scale, per group of input rows
    return backend.cast(kernel, dtype), None


def _activation_quantizer(layer, x):
    """The layer's activation quantizer; on CUDA torch int8 layers always quantize their activations, so
    that the product runs on the int8 tensor cores instead of a float copy of the kernel at every call."""
    quantizer = getattr(layer, "inputs_quantizer", None)
    if quantizer is None and _TORCH and x.device.type == "cuda":
        from keras import quantizers

        quantizer = layer.inputs_quantizer = quantizers.AbsMaxQuantizer(axis=-1)
    return quantizer


def float_kernel(layer):
    """The (in, out) float32 kernel a quantized or stored `Linear` stands for (what an export writes)."""
    if layer.weight_format is not None:
        from keras_sd3.quantization.stored import stored_weight

        return ops.transpose(stored_weight(layer))
    kernel, scale = _float_kernel(layer, "float32")
    return kernel if scale is None else kernel / backend.cast(scale, "float32")


def quantized_linear(layer, x):
    """`x @ W + b` for a quantized `Linear` (W8A8 when it has an activation quantizer)."""
    if layer.quantization_mode == "int8" and _activation_quantizer(layer, x) is not None:
        out = _w8a8(layer, x)
    else:
        kernel, scale = _float_kernel(layer)
        out = backend.linear(x, kernel)
        if scale is not None:
            out = out / backend.cast(scale, out.dtype)
    if layer.bias is not None:
        out = out + backend.cast(layer.bias.value, out.dtype)
    return out
