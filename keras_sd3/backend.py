"""The only backend-specific code of keras_sd3: fast paths that `keras.ops` cannot express.

Everything else in the models and the sampler is written with `keras.ops` alone.
"""

import keras
from keras import ops


def linear(x, kernel, bias=None):
    """`x @ kernel + bias` over the last axis of `x`.

    On torch the bias add is fused into the matrix product (`torch.addmm` on a 2-D view), as
    `torch.nn.functional.linear` does; other backends fuse it in their compilers.
    """
    kernel = ops.cast(kernel, x.dtype)
    if keras.config.backend() == "torch":
        import torch

        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, kernel) if bias is None else torch.addmm(ops.cast(bias, x.dtype), flat, kernel)
        return out.reshape(*x.shape[:-1], kernel.shape[-1])
    out = ops.matmul(x, kernel)
    return out if bias is None else out + ops.cast(bias, x.dtype)


def attention(q, k, v, bias=None, scale=None, is_causal=False):
    """`keras.ops.dot_product_attention` on (B, T, N, H) inputs.

    XLA:CPU has no float16 x float16 -> float32 dot, which jax's attention asks for under `jit`;
    there the float16 inputs are upcast to float32 (the softmax runs in float32 anyway).
    """
    dtype = keras.backend.standardize_dtype(q.dtype)
    if dtype == "float16" and keras.config.backend() == "jax":
        import jax

        if jax.default_backend() == "cpu":
            q, k, v = (ops.cast(x, "float32") for x in (q, k, v))
            bias = None if bias is None else ops.cast(bias, "float32")
    out = ops.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=is_causal)
    return ops.cast(out, dtype)


def compile_function(model, function):
    """`function(*args)` compiled once per input signature, reading `model`'s variables.

    jax: `jax.jit`, the variables passed in through a `keras.StatelessScope` (the latent-walk guide's
    pattern); tensorflow: `tf.function(jit_compile=True)` (XLA); torch: eager under `torch.no_grad()`.
    """
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        variables = model.trainable_variables + model.non_trainable_variables

        @jax.jit
        def stateless(state, *args):
            with keras.StatelessScope(state_mapping=zip(variables, state)):
                return function(*args)

        return lambda *args: stateless([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True, reduce_retracing=True)
    import torch

    return torch.no_grad()(function)
