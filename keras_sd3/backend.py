"""The only backend-specific code of keras_sd3: fast paths that `keras.ops` cannot express, compiled
functions and the persistent compilation cache.

Everything else in the models and the sampler is written with `keras.ops` alone.
"""

import functools
import os

from keras_sd3.keras_backend import require

require()  # a clear error for a missing or unknown backend, before Keras is imported

import keras  # noqa: E402
from keras import ops

_TORCH = keras.config.backend() == "torch"
if _TORCH:
    import torch


# Eager torch: every `keras.ops` call first searches its arguments for symbolic tensors (10-30 µs a
# call) and the MMDiT makes a few hundred calls a step, more time than the embedded model's arithmetic.
# So the layers' most frequent operations below call torch directly there; jax and tensorflow trace
# them once, so they keep `keras.ops`.


def shape(x):
    return tuple(x.shape) if _TORCH else ops.shape(x)


def reshape(x, new_shape):
    return x.reshape(new_shape) if _TORCH else ops.reshape(x, new_shape)


def concatenate(xs, axis):
    return torch.cat(xs, axis) if _TORCH else ops.concatenate(xs, axis=axis)


def split(x, count):
    """`count` equal parts of `x` along its last axis."""
    return x.chunk(count, -1) if _TORCH else ops.split(x, count, axis=-1)


def cast(x, dtype):
    """`x` in `dtype` (a Keras dtype name or the backend's dtype)."""
    if _TORCH:
        return x.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return ops.cast(x, dtype)


def cond(pred, true_fn, false_fn):
    """`ops.cond`; torch decides in Python at once (its eager `ops.cond` does the same, after Keras'
    search of the arguments for symbolic tensors)."""
    if _TORCH:
        return true_fn() if pred else false_fn()
    return ops.cond(pred, true_fn, false_fn)


def relative_change(new, old):
    """mean |new - old| / mean |old| in float32 (a scalar), the step cache's measure of change."""
    new, old = cast(new, "float32"), cast(old, "float32")
    if _TORCH:
        return (new - old).abs().mean() / (old.abs().mean() + 1e-12)
    return ops.mean(ops.abs(new - old)) / (ops.mean(ops.abs(old)) + 1e-12)


def silu(x):
    return torch.nn.functional.silu(x) if _TORCH else ops.silu(x)


def gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh") if _TORCH else ops.gelu(x, approximate=True)


def layer_norm(x, epsilon, weight=None, bias=None):
    """LayerNorm over the last axis, computed and returned in float32, with optional affine parameters."""
    if _TORCH:
        weight, bias = (None if v is None else _torch_tensor(v, torch.float32) for v in (weight, bias))
        return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight, bias, epsilon)
    weight, bias = (None if v is None else ops.cast(v, "float32") for v in (weight, bias))
    return ops.layer_normalization(ops.cast(x, "float32"), gamma=weight, beta=bias, epsilon=epsilon)


def linear(x, kernel, bias=None):
    """`x @ kernel + bias` over the last axis of `x`.

    On torch the bias add is fused into the matrix product (`torch.addmm` on a 2-D view), as
    `torch.nn.functional.linear` does; other backends fuse it in their compilers.

    Half precision on CPU: the inputs are rounded to bfloat16 / float16, then multiplied in float32 and
    the result rounded back. Products of two half-precision numbers are exact in float32 and fast
    half-precision GEMMs accumulate in float32 as well, so this is the half-precision product up to the
    order of summation; it is also what runs fastest there. On a CPU without native half-precision
    arithmetic (no AVX512-BF16 / AMX) torch's own half-precision GEMM is 50-300x slower than its float32
    one (0.4 GFLOP/s for bfloat16 with Keras' (in, out) kernel vs 83 GFLOP/s in float32 on an AVX2
    EPYC); XLA:CPU has no half-precision GEMM of its own on any CPU (jax SD3-Medium block 1.40 s vs
    1.59 s in bfloat16), and tensorflow's eager bfloat16 matmul rounds partial sums to bfloat16.
    """
    if _TORCH:
        return _torch_linear(x, kernel, bias)
    dtype = keras.backend.standardize_dtype(x.dtype)
    kernel, bias = ops.cast(kernel, dtype), None if bias is None else ops.cast(bias, dtype)
    if dtype in ("bfloat16", "float16") and _half_precision_gemm_is_slow(x, dtype):
        float32 = [None if a is None else ops.cast(a, "float32") for a in (x, kernel, bias)]
        return ops.cast(linear(*float32), dtype)
    out = ops.matmul(x, kernel)
    return out if bias is None else out + bias


def _torch_linear(x, kernel, bias):
    """`linear` with torch's own calls only: it runs eagerly, so Keras' per-op dispatch would cost
    more than the product itself on small layers."""
    kernel, bias = _torch_tensor(kernel, x.dtype), None if bias is None else _torch_tensor(bias, x.dtype)
    half = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(x.dtype)
    if half and _half_precision_gemm_is_slow(x, half):
        return _torch_linear(x.float(), kernel.float(), None if bias is None else bias.float()).to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, kernel) if bias is None else torch.addmm(bias, flat, kernel)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


def torch_conv2d(x, kernel, bias, strides, padding):
    """Channels-last 2-D convolution on torch: (B, H, W, C) `x`, Keras' (kh, kw, in, out) kernel.

    Keras' torch conv copies the input to channels-first, back to channels-last memory, pads it and
    transposes the output (four copies of every feature map: the SD3 VAE decode at 512² took 1.66x
    diffusers' time). Here `x` is viewed as NCHW with channels-last strides, which oneDNN convolves
    as it lies, and the output is viewed back: no copies of the feature maps.
    """
    kernel = _torch_tensor(kernel, x.dtype).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else _torch_tensor(bias, x.dtype)
    if padding == "same" and all(s == 1 for s in strides):
        padding = "same"
    elif padding == "valid":
        padding = 0
    else:
        raise ValueError(f"torch_conv2d takes padding 'same' with stride 1 or 'valid', got {padding!r} and {strides}")
    out = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), kernel, bias, tuple(strides), padding)
    return out.permute(0, 2, 3, 1)


# Nearest x2 upsampling then a 3x3 conv: output row 2i + a sees input rows (i - 1, i) for a = 0, with
# kernel rows (k0, k1 + k2), and rows (i, i + 1) for a = 1, with (k0 + k1, k2). Rows: (phase, tap, 3x3 row).
_PHASE_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))
# The same taps as a stride-2 transposed convolution's 4 kernel rows (torch's `conv_transpose2d`, padding 1).
_TRANSPOSED_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsample_conv(x, kernel, bias):
    """Nearest-neighbour x2 upsampling of (B, H, W, C) `x`, then a 3x3 'same' conv with Keras'
    (3, 3, in, out) `kernel`: (B, 2H, 2W, out).

    Each output pixel of that conv sees only 2 x 2 distinct input pixels, so the four output phases
    (row and column parity) are 2 x 2 convs of the small map with summed kernel taps: 16 instead of 36
    multiply-adds per output pixel and channel pair, and no upsampled copy of the input. One conv with
    4 x out channels computes all phases, which are then interleaved; torch runs it as the equivalent
    stride-2 transposed conv. Equal to the direct form up to float rounding (the kernel taps are summed
    in float32 first): the SD3 VAE's 1024^2 upsampler (256 channels) takes 2.3 s instead of 6.1 s on jax.
    """
    if _TORCH:
        return _torch_upsample_conv(x, kernel, bias)
    channels = kernel.shape[-1]
    taps = ops.convert_to_tensor(_PHASE_TAPS, "float32")
    phases = ops.einsum("apr,bqs,rsio->pqiabo", taps, taps, ops.cast(kernel, "float32"))
    phases = ops.cast(ops.reshape(phases, (2, 2, kernel.shape[2], 4 * channels)), x.dtype)
    y = ops.conv(ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), phases, padding="valid")
    y = y + ops.tile(ops.cast(bias, x.dtype), (4,))
    _, height, width, _ = ops.shape(x)

    def phase(a, b):  # output pixels (2i + a, 2j + b)
        return y[:, a : a + height, b : b + width, (2 * a + b) * channels : (2 * a + b + 1) * channels]

    rows = [ops.stack([phase(a, 0), phase(a, 1)], axis=3) for a in (0, 1)]  # (B, H, W, 2, out) each
    return ops.reshape(ops.stack(rows, axis=2), (-1, 2 * height, 2 * width, channels))


def _torch_upsample_conv(x, kernel, bias):

    taps = torch.tensor(_TRANSPOSED_TAPS, dtype=torch.float32)
    kernel = torch.einsum("kr,ls,rsio->iokl", taps, taps, _torch_tensor(kernel, torch.float32))
    kernel = kernel.to(x.dtype).contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.conv_transpose2d(x.permute(0, 3, 1, 2), kernel, _torch_tensor(bias, x.dtype),
                                               stride=2, padding=1)
    return out.permute(0, 2, 3, 1)


def torch_group_norm(x, groups, weight, bias, epsilon):
    """GroupNorm of channels-last (B, H, W, C) `x` on torch, in float32, returned in `x`'s dtype
    (`torch.nn.functional.group_norm` on the channels-last view, as `torch_conv2d`)."""
    weight, bias = (_torch_tensor(v, torch.float32) for v in (weight, bias))
    out = torch.nn.functional.group_norm(x.permute(0, 3, 1, 2).float(), groups, weight, bias, epsilon)
    return out.permute(0, 2, 3, 1).to(x.dtype)


def _torch_tensor(value, dtype):
    """A Keras variable's value (autocast as Keras reads it) or a tensor, in `dtype`."""
    value = value.value if isinstance(value, keras.Variable) else value
    return value if value.dtype == dtype else value.to(dtype)


def _half_precision_gemm_is_slow(x, dtype):
    """Whether `x`'s device lacks a fast `dtype` GEMM: XLA on CPU, torch on a CPU without AVX512-BF16 / AMX."""
    if keras.config.backend() == "torch":
        return x.device.type == "cpu" and not _torch_cpu_has_native(dtype)
    return _xla_on_cpu()


@functools.cache
def _xla_on_cpu():
    """Whether the jax / tensorflow backend computes on the CPU (fixed for the process)."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    return False


@functools.cache
def _torch_cpu_has_native(dtype):

    if dtype == "bfloat16":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def attention(q, k, v, bias=None, scale=None, is_causal=False):
    """`keras.ops.dot_product_attention` on (B, T, N, H) inputs.

    On jax on a GPU, half-precision attention without a bias is cuDNN's flash attention
    (`jax.nn.dot_product_attention(..., implementation="cudnn")`) where cuDNN takes it (Ampere or later),
    else XLA's. On jax on CPU, attention without a bias or mask runs one head at a time (below); XLA:CPU has no
    float16 x float16 -> float32 dot, which jax's attention asks for under `jit`, so there float16
    inputs are upcast to float32 (the softmax runs in float32 anyway).
    """
    if _TORCH and bias is None:  # SDPA picks the fastest kernel itself (flash / memory-efficient / math)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, is_causal=is_causal)
        return out.transpose(1, 2)
    dtype = keras.backend.standardize_dtype(q.dtype)
    if keras.config.backend() == "jax" and not _xla_on_cpu() and bias is None and dtype in ("bfloat16", "float16"):
        out = _cudnn_attention(q, k, v, scale, is_causal)
        if out is not None:
            return out
    if keras.config.backend() == "jax" and _xla_on_cpu():
        if bias is None and not is_causal:
            return ops.cast(_attention_on_cpu(q, k, v, scale), dtype)
        if dtype == "float16":
            q, k, v = (ops.cast(x, "float32") for x in (q, k, v))
            bias = None if bias is None else ops.cast(bias, "float32")
    out = ops.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=is_causal)
    return ops.cast(out, dtype)


def _cudnn_attention(q, k, v, scale, is_causal):
    """cuDNN flash attention through jax, or None (one warning) where cuDNN refuses these inputs or this GPU."""
    import jax

    try:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, implementation="cudnn")
    except Exception as e:  # raised while tracing: no cuDNN, an older GPU, an unsupported head size
        _warn_once(f"cuDNN flash attention is not available here ({type(e).__name__}: {e}); using XLA's attention.")
        return None


@functools.cache
def _warn_once(message):
    import warnings

    warnings.warn(message, stacklevel=3)


# `_attention_on_cpu`: up to this many float32 scores in all (8 MiB), every head at once; longer
# sequences in blocks of queries of at most `_SCORES_PER_BLOCK` scores (64 MiB).
_BATCHED_SCORES = 1 << 21
_SCORES_PER_BLOCK = 1 << 24


def _attention_on_cpu(q, k, v, scale=None):
    """Softmax attention in float32 for XLA:CPU, in one of three ways by size.

    - Small attentions (the tiny models' 4 heads over 349 tokens) run every head at once: the embedded
      text-to-image benchmark is 0.69× diffusers that way against 0.72-0.76× head by head.
    - Larger ones run one (batch, head) at a time through `ops.map` (`lax.map`): XLA:CPU runs SD3 Medium's
      joint attention (2 x 24 heads over 1178 tokens) 3x faster this way than as one batched attention
      (0.27 s vs 0.88 s per layer here): one head's (T, T) scores stay in cache.
    - Long sequences also go in blocks of queries with at most `_SCORES_PER_BLOCK` scores each (every
      row's softmax is still whole, so the result is the same): the VAE's attention at 1024² (16384
      pixels) took 31 s with the whole (T, T) matrix and takes 6.7 s this way (its mid block, jax on CPU).
    """
    batch, length, heads, dim = ops.shape(q)
    keys = ops.shape(k)[1]
    scale = dim**-0.5 if scale is None else scale

    def by_head(x):  # (B, T, N, H) -> (B * N, T, H) in float32
        return ops.reshape(ops.transpose(ops.cast(x, "float32"), (0, 2, 1, 3)), (batch * heads, -1, dim))

    def rows(q, k, v):  # (..., T, H) each
        return ops.matmul(ops.softmax(ops.matmul(q * scale, ops.swapaxes(k, -1, -2)), axis=-1), v)

    q, k, v = by_head(q), by_head(k), by_head(v)
    if batch * heads * length * keys <= _BATCHED_SCORES:
        out = rows(q, k, v)
    else:
        count = -(-length // max(1, _SCORES_PER_BLOCK // keys))  # query blocks per head
        block = -(-length // count)  # equal blocks: fewer than `count` padded rows

        def one_head(qkv):
            q, k, v = qkv
            if count == 1:
                return rows(q, k, v)
            blocks = ops.reshape(ops.pad(q, ((0, count * block - length), (0, 0))), (count, block, dim))
            return ops.reshape(ops.map(lambda q: rows(q, k, v), blocks), (-1, dim))[:length]

        out = ops.map(one_head, (q, k, v))  # (B * N, T, H)
    return ops.transpose(ops.reshape(out, (batch, heads, length, dim)), (0, 2, 1, 3))


def is_traced(x):
    """Whether `x` belongs to a program being traced (jax.jit, tf.function); torch is always eager."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return False


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

        return tf.function(function, jit_compile=True, autograph=False)  # one trace per input shape, as jax.jit (static shapes)
    import torch

    return torch.no_grad()(function)


CACHE_VARIABLE = "KERAS_SD3_CACHE"


def compilation_cache_folder(backend=None):
    """Where compiled XLA programs are kept between processes, or None when the cache is off.

    `$KERAS_SD3_CACHE/<backend>` (`KERAS_SD3_CACHE=0` turns it off), else
    `$XDG_CACHE_HOME/keras_sd3/<backend>` (`~/.cache/keras_sd3/<backend>`). jax and tensorflow only:
    torch compiles nothing.
    """
    backend = backend or keras.config.backend()
    root = os.environ.get(CACHE_VARIABLE)
    if root == "0" or backend not in ("jax", "tensorflow"):
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keras_sd3")
    return os.path.join(root, backend)


def use_compilation_cache():
    """Points jax's persistent compilation cache (every program, however quick to compile) or
    tensorflow's XLA cache (`--tf_xla_persistent_cache_directory`) at `compilation_cache_folder()`,
    unless the user set one already. Called when keras_sd3 is imported; a second start then loads the
    compiled denoising loop, decoder and encoders instead of compiling them again."""
    folder = compilation_cache_folder()
    if folder is None:
        return
    if keras.config.backend() == "jax":
        import jax

        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        return
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" not in flags:
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={folder}".strip()


use_compilation_cache()
