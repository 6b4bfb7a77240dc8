"""keras_sd3.quantization.ggml against gguf-py's numpy reference, bit for bit, eagerly and compiled."""

import gguf
import keras
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES

from keras_sd3.quantization import ggml

Q = gguf.GGMLQuantizationType
SUPPORTED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf-py can quantize these
# Byte offsets of the float16 scales in a block (from ggml's block structs), set to moderate values in random blocks.
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
ROWS, COLUMNS = 4, 512


def _values():
    """(4, 512) float32: normal values, a few large outliers, scattered exact zeros and an all-zero block."""
    values = np.random.default_rng(0).normal(size=(ROWS, COLUMNS)).astype(np.float32)
    values[0, 7], values[2, 300], values[3, 511] = 40.0, -25.0, 1e4
    values[1, ::5] = 0.0
    values[3, 64:96] = 0.0
    return values


def _raw(ggml_type):
    """(rows, row bytes) uint8: random blocks (every bit pattern of the packed integers, finite float16 scales, one
    block with zero scales; F16 and BF16: all 65536 values; F32: random bits and special values), then gguf-py's
    quantization of `_values()` where gguf-py can quantize the type."""
    rng = np.random.default_rng(int(ggml_type))
    block, size = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in (Q.F16, Q.BF16):
        raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, size)
    else:
        raw = rng.integers(0, 256, size=(ROWS * COLUMNS // block, size), dtype=np.uint8)
    for offset in F16_FIELDS.get(ggml_type, ()):
        scales = (rng.normal(size=len(raw)) * 0.05).astype(np.float16)
        scales[1] = 0.0
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    if ggml_type == Q.F32:
        specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 3.4e38], np.float32)
        raw[:len(specials)] = specials.view(np.uint8).reshape(-1, 4)
    raw = raw.reshape(-1, COLUMNS // block * size)
    if ggml_type in QUANTIZABLE:
        quantized = np.ascontiguousarray(gguf.quants.quantize(_values(), ggml_type)).view(np.uint8)
        raw = np.concatenate([raw, quantized])
    return raw


def _expected(raw, ggml_type):
    return gguf.quants.dequantize(raw, ggml_type).reshape(-1, COLUMNS)


def _assert_same_bits(actual, expected):
    """Same float32 bits, except NaN payloads (the backends' float16 -> float32 conversion quiets signalling NaNs,
    numpy's keeps them)."""
    actual = keras.ops.convert_to_numpy(actual)
    assert actual.dtype == np.float32 and expected.dtype == np.float32
    assert actual.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(actual), nan)
    differ = actual.view(np.uint32)[~nan] != expected.view(np.uint32)[~nan]
    assert not differ.any(), (
        f"{differ.sum()} of {actual.size} values differ; max |diff| "
        f"{np.max(np.abs(actual[~nan].astype(np.float64) - expected[~nan]))}")


def _compiled(function):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    pytest.skip(f"the {backend} backend runs eagerly; only jax and tensorflow compile with XLA")


def test_types_describe_ggml_blocks():
    assert set(ggml.TYPES) == set(SUPPORTED)
    for ggml_type, kind in ggml.TYPES.items():
        assert (kind.name, kind.block, kind.bytes) == (ggml_type.name, *GGML_QUANT_SIZES[ggml_type])
        assert sum(size for _, size in kind.layout) == kind.bytes
        assert ggml.byte_shape(ggml_type, (3, 2, 512)) == gguf.quant_shape_to_byte_shape((3, 2, 512), ggml_type)


@pytest.mark.parametrize("ggml_type", SUPPORTED, ids=lambda t: t.name)
def test_dequantize(ggml_type):
    raw = _raw(ggml_type)
    expected = _expected(raw, ggml_type)
    assert raw.shape == ggml.byte_shape(ggml_type, expected.shape)
    _assert_same_bits(ggml.dequantize(keras.ops.convert_to_tensor(raw), ggml_type, expected.shape), expected)


@pytest.mark.parametrize("ggml_type", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_compiled(ggml_type):
    raw = _raw(ggml_type).reshape(-1)
    expected = _expected(raw, ggml_type)
    function = _compiled(lambda x: ggml.dequantize(x, ggml_type, expected.shape))
    _assert_same_bits(function(keras.ops.convert_to_tensor(raw)), expected)


def test_dequantize_to_any_shape():
    raw = _raw(Q.Q4_K)
    expected = _expected(raw, Q.Q4_K).reshape(2, -1, COLUMNS)
    _assert_same_bits(ggml.dequantize(keras.ops.convert_to_tensor(raw.reshape(-1)), Q.Q4_K, expected.shape), expected)


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match=r"GGUF type IQ2_XXS is not supported; supported: F32, F16, .*Q6_K"):
        ggml.dequantize(keras.ops.zeros((66,), "uint8"), Q.IQ2_XXS, (256,))


def test_wrong_sizes_raise():
    with pytest.raises(ValueError, match="whole blocks of 32"):
        ggml.byte_shape(Q.Q8_0, (4, 48))
    with pytest.raises(ValueError, match="takes 68 bytes, got 34"):
        ggml.dequantize(keras.ops.zeros((34,), "uint8"), Q.Q8_0, (64,))
    with pytest.raises(ValueError, match="uint8"):
        ggml.dequantize(keras.ops.zeros((34,), "int32"), Q.Q8_0, (32,))
