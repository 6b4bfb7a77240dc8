"""GGUF (ggml) block formats, dequantised with `keras.ops` inside compiled programs.

A GGUF tensor is a sequence of blocks: each block holds `block` values in `bytes` bytes, laid out as
named fields (scales as float16, packed integers). Each supported type is described once, as data
(`BlockType`: sizes and byte layout) with one small decoding function, in `TYPES`. `dequantize`
turns a tensor's raw uint8 bytes into float32 values, bit for bit as `gguf.quants.dequantize` (NaN
payloads aside: the backends' float16 -> float32 conversion quiets F16's signalling NaNs).

The decoders use `keras.ops` only, so they run eagerly or traced (`jax.jit`,
`tf.function(jit_compile=True)`, torch) on every backend. Integer fields are unpacked in int32.
With finite float16 scales, every product of a scale with the small integers of a block is exact in
float32 (at most 24 significant bits), so the only rounding is the final addition of the offset: the
results do not depend on how a compiler orders or fuses (FMA) the arithmetic.
"""

import dataclasses
import functools
import math
from typing import Callable

import gguf
import keras
from gguf.constants import GGML_QUANT_SIZES
from keras import ops

_Q = gguf.GGMLQuantizationType


@dataclasses.dataclass(frozen=True)
class BlockType:
    """One ggml type.

    Attributes:
        name: the ggml name, e.g. "Q8_0".
        block: values per block.
        bytes: bytes per block.
        dequantize: (n_blocks, bytes) uint8 tensor -> (n_blocks, block) float32 tensor.
        layout: the block's fields in byte order, as (name, bytes) pairs.
    """

    name: str
    block: int
    bytes: int
    dequantize: Callable
    layout: tuple = ()


TYPES = {}


def _decode(decoder, layout, blocks):
    fields, start = {}, 0
    for name, size in layout:
        fields[name] = blocks[:, start:start + size]
        start += size
    return decoder(**fields)


def _block(ggml_type, **layout):
    """Registers the decorated decoder for `ggml_type`, whose blocks hold the fields `layout` (name=bytes)."""

    def register(decoder):
        block, size = GGML_QUANT_SIZES[ggml_type]
        assert sum(layout.values()) == size, ggml_type.name
        fields = tuple(layout.items())
        TYPES[ggml_type] = BlockType(ggml_type.name, block, size, functools.partial(_decode, decoder, fields), fields)
        return decoder

    return register


def _f16(x):
    """(n, 2) uint8 -> (n, 1) float32: one float16 per block."""
    return ops.cast(ops.view(x, "float16"), "float32")


def _int8(x):
    """(n, k) uint8 -> (n, k) float32, each byte read as a signed int8."""
    return ops.cast(ops.view(x, "int8"), "float32")


def _unpack(x, bits, group):
    """Unpacks `bits`-bit fields, lowest bits first.

    Args:
        x: (n, k) uint8 tensor; k a multiple of `group`.
        bits: 1, 2 or 4.
        group: bytes per group: a group gives the lowest field of each of its bytes, then the next
            field of each byte, and so on.

    Returns:
        (n, k * 8 // bits) int32 tensor, in group, field, byte order.
    """
    width = x.shape[-1]
    x = ops.reshape(ops.cast(x, "int32"), (-1, width // group, group))
    mask = (1 << bits) - 1
    fields = [ops.bitwise_and(ops.right_shift(x, shift), mask) for shift in range(0, 8, bits)]
    return ops.reshape(ops.stack(fields, axis=-2), (-1, width * 8 // bits))


def _float(x):
    return ops.cast(x, "float32")


@_block(_Q.F32, x=4)
def _f32_block(x):
    return ops.view(x, "float32")


@_block(_Q.F16, x=2)
def _f16_block(x):
    return _f16(x)


@_block(_Q.BF16, x=2)
def _bf16_block(x):
    return ops.cast(ops.view(x, "bfloat16"), "float32")


@_block(_Q.Q8_0, d=2, qs=32)
def _q8_0(d, qs):
    return _int8(qs) * _f16(d)


@_block(_Q.Q4_0, d=2, qs=16)
def _q4_0(d, qs):
    return _f16(d) * _float(_unpack(qs, 4, 16) - 8)


@_block(_Q.Q4_1, d=2, m=2, qs=16)
def _q4_1(d, m, qs):
    return _f16(d) * _float(_unpack(qs, 4, 16)) + _f16(m)


def _five_bits(qh, qs):
    """(n, 4) high bits (bit i of the little-endian uint32 for value i), (n, 16) nibbles -> (n, 32) int32."""
    return ops.bitwise_or(_unpack(qs, 4, 16), ops.left_shift(_unpack(qh, 1, 1), 4))


@_block(_Q.Q5_0, d=2, qh=4, qs=16)
def _q5_0(d, qh, qs):
    return _f16(d) * _float(_five_bits(qh, qs) - 16)


@_block(_Q.Q5_1, d=2, m=2, qh=4, qs=16)
def _q5_1(d, m, qh, qs):
    return _f16(d) * _float(_five_bits(qh, qs)) + _f16(m)


def _per_sub_block(x, scale, offset=None):
    """(n, 256) values, (n, s) scales and offsets -> (n, 256) scale * x - offset, in s sub-blocks."""
    s = scale.shape[-1]
    x = ops.reshape(_float(x), (-1, s, 256 // s)) * scale[:, :, None]
    if offset is not None:
        x = x - offset[:, :, None]
    return ops.reshape(x, (-1, 256))


@_block(_Q.Q2_K, scales=16, qs=64, d=2, dmin=2)
def _q2_k(scales, qs, d, dmin):
    scales = ops.cast(scales, "int32")
    scale = _f16(d) * _float(ops.bitwise_and(scales, 0xF))
    offset = _f16(dmin) * _float(ops.right_shift(scales, 4))
    return _per_sub_block(_unpack(qs, 2, 32), scale, offset)


@_block(_Q.Q3_K, hmask=32, qs=64, scales=12, d=2)
def _q3_k(hmask, qs, scales, d):
    low, high = _unpack(scales[:, :8], 4, 8), _unpack(scales[:, 8:], 2, 4)
    scale = _float(ops.bitwise_or(low, ops.left_shift(high, 4)) - 32)
    q = _unpack(qs, 2, 32) - 4 * (1 - _unpack(hmask, 1, 32))
    return _per_sub_block(q, _f16(d) * scale)


def _high(y):
    """The top two bits of a 6-bit field, stored in bits 6-7 of y, moved to bits 4-5."""
    return ops.bitwise_and(ops.right_shift(y, 2), 0x30)


def _k_scales(d, dmin, scales):
    """Q4_K / Q5_K: (n, 2) d, (n, 2) dmin, (n, 12) packed 6-bit scales and mins -> (n, 8) scale, offset."""
    x = ops.cast(scales, "int32")
    a, b, c = x[:, 0:4], x[:, 4:8], x[:, 8:12]
    scale = ops.concatenate([ops.bitwise_and(a, 0x3F), ops.bitwise_or(ops.bitwise_and(c, 0xF), _high(a))], axis=-1)
    minimum = ops.concatenate([ops.bitwise_and(b, 0x3F), ops.bitwise_or(ops.right_shift(c, 4), _high(b))], axis=-1)
    return _f16(d) * _float(scale), _f16(dmin) * _float(minimum)


@_block(_Q.Q4_K, d=2, dmin=2, scales=12, qs=128)
def _q4_k(d, dmin, scales, qs):
    return _per_sub_block(_unpack(qs, 4, 32), *_k_scales(d, dmin, scales))


@_block(_Q.Q5_K, d=2, dmin=2, scales=12, qh=32, qs=128)
def _q5_k(d, dmin, scales, qh, qs):
    q = ops.bitwise_or(_unpack(qs, 4, 32), ops.left_shift(_unpack(qh, 1, 32), 4))
    return _per_sub_block(q, *_k_scales(d, dmin, scales))


@_block(_Q.Q6_K, ql=128, qh=64, scales=16, d=2)
def _q6_k(ql, qh, scales, d):
    q = ops.bitwise_or(_unpack(ql, 4, 64), ops.left_shift(_unpack(qh, 2, 32), 4)) - 32
    return _per_sub_block(q, _f16(d) * _int8(scales))


def block_type(ggml_type):
    """The `BlockType` of `ggml_type` (a `gguf.GGMLQuantizationType` or its integer value).

    Raises:
        ValueError: a type without a decoder here (the message names it and lists the supported ones).
    """
    try:
        name = _Q(ggml_type).name
    except ValueError:
        name = str(ggml_type)
    if ggml_type not in TYPES:
        supported = ", ".join(kind.name for kind in TYPES.values())
        raise ValueError(f"GGUF type {name} is not supported; supported: {supported}.")
    return TYPES[ggml_type]


def byte_shape(ggml_type, shape):
    """The shape of a tensor's raw bytes, one row per row of values: (..., row) -> (..., row_bytes).

    Args:
        ggml_type: the tensor's ggml type.
        shape: the (row-major) shape of its values.

    Raises:
        ValueError: an unsupported type, or a row that is not a whole number of blocks.
    """
    kind = block_type(ggml_type)
    shape = tuple(int(s) for s in shape)
    row = shape[-1] if shape else 1
    if row % kind.block:
        raise ValueError(f"A {kind.name} row holds whole blocks of {kind.block} values; shape {shape} has rows "
                         f"of {row}.")
    return (*shape[:-1], row // kind.block * kind.bytes)


def dequantize(raw, ggml_type, shape):
    """Decodes a GGUF tensor, as `gguf.quants.dequantize(raw, ggml_type).reshape(shape)`.

    Args:
        raw: uint8 tensor of the tensor's bytes, of any shape holding them in order, e.g.
            (n_blocks * bytes,) or `byte_shape(ggml_type, shape)`. On torch its data must start at a
            multiple of 4 bytes (bitcasts of a tensor view), as GGUF's aligned tensor data does.
        ggml_type: the tensor's ggml type (`gguf.GGMLQuantizationType`).
        shape: the (row-major, numpy) shape of its values.

    Returns:
        float32 tensor of `shape`.

    Raises:
        ValueError: an unsupported type, a row that is not a whole number of blocks, or `raw` not uint8
            or of another size.
    """
    kind = block_type(ggml_type)
    n_bytes = math.prod(byte_shape(ggml_type, shape))
    raw = ops.convert_to_tensor(raw)
    if keras.backend.standardize_dtype(raw.dtype) != "uint8":
        raise ValueError(f"GGUF tensor bytes must be uint8, got {raw.dtype}.")
    size = math.prod(raw.shape) if all(isinstance(s, int) for s in raw.shape) else None
    if size is not None and size != n_bytes:
        raise ValueError(f"A {kind.name} tensor of shape {tuple(shape)} takes {n_bytes} bytes, got {size}.")
    values = kind.dequantize(ops.reshape(raw, (-1, kind.bytes)))
    return ops.reshape(values, tuple(int(s) for s in shape))
