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
