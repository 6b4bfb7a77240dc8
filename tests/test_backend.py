"""`keras_sd3.backend.linear` in half precision against a closed form.

Products of two bfloat16 / float16 numbers are exact in float32, and `linear` accumulates them in
float32 (on CPU it runs the product in float32 itself; fast half-precision GEMMs elsewhere accumulate
in float32 too), so the result must be the float32 product of the rounded inputs,
rounded at most twice (product, then bias add): within half a unit in the last place of each.
"""

import keras
import numpy as np
import pytest

from keras_sd3.backend import linear

ULP = {"bfloat16": 2.0**-7, "float16": 2.0**-10}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_linear_is_the_rounded_float32_product(dtype):
    rng = np.random.default_rng(0)
    x, kernel, bias = rng.standard_normal((2, 5, 96)), rng.standard_normal((96, 40)), rng.standard_normal(40)
    x, kernel, bias = (keras.ops.cast(a, dtype) for a in (x, kernel, bias))
    out = linear(x, kernel, bias)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    rounded = [keras.ops.convert_to_numpy(keras.ops.cast(a, "float32")).astype("float64") for a in (x, kernel, bias)]
    product = rounded[0] @ rounded[1]
    expected = product + rounded[2]
    error = np.abs(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")) - expected)
    # Half an ulp (relative spacing ULP) of the product and of the sum; float32 accumulation over 96
    # terms adds ~1e-6 relative, far below it.
    bound = ULP[dtype] / 2 * (np.abs(product) + np.abs(expected)) + 1e-4
    assert np.all(error <= bound), (error - bound).max()


@pytest.mark.parametrize("path", ["all heads at once", "head by head", "query blocks"])
def test_cpu_attention_matches_closed_form(monkeypatch, path):
    """XLA:CPU's attention (`backend._attention_on_cpu`) takes one of three paths by size; each is forced
    here (blocks: 8 of 37 queries, the last one padded). The result is softmax(q k^T / sqrt(H)) v in
    float64 within 1e-5 (float32 arithmetic over 37 keys)."""
    from keras_sd3 import backend

    monkeypatch.setattr(backend, "_BATCHED_SCORES", 1 << 30 if path == "all heads at once" else 0)
    monkeypatch.setattr(backend, "_SCORES_PER_BLOCK", 37 * 8 if path == "query blocks" else 1 << 30)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 37, 3, 16)) for _ in range(3))  # (B, T, N, H)
    out = backend._attention_on_cpu(*(keras.ops.cast(a, "float32") for a in (q, k, v)))
    scores = np.einsum("btnh,bsnh->bnts", q, k) / 4.0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bnts,bsnh->btnh", weights / weights.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), expected, atol=1e-5)
