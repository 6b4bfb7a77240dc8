"""Strict assignment of checkpoint tensors to Keras variables.

Every layer of keras_sd3 names its sub-layers after the diffusers state-dict keys (`transformer_blocks`,
`attn`, `to_q`, `norm1_context`, ...), so the key of each variable is derived from the attribute path
alone, as `torch.nn.Module.named_parameters()` would: no per-model mapping table is needed for diffusers
checkpoints. A layer may rename an attribute through a class dict `checkpoint_aliases`
(e.g. `{"proj_in": "net.0.proj"}`).
"""

import ctypes
import ctypes.util
import functools

import keras
import numpy as np
from keras.src.backend.common import global_state

from keras_sd3.weights.safetensors_file import CheckpointError


def _torch_linear(weight, tile=256):
    """(out, in) -> (in, out), contiguous. Copied in 256 x 256 tiles that stay in cache: 3x faster than
    `np.ascontiguousarray(weight.T)` on the large matrices (0.3 -> 1 GB/s here)."""
    out = np.empty(weight.shape[::-1], weight.dtype)
    for i in range(0, weight.shape[0], tile):
        for j in range(0, weight.shape[1], tile):
            out[j : j + tile, i : i + tile] = weight[i : i + tile, j : j + tile].T
    return out


def _torch_conv(weight):
    return weight.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)


def _torch_shape(keras_shape, transform):
    """The PyTorch-layout shape of a Keras variable of shape `keras_shape`."""
    if transform is _torch_linear:
        return tuple(reversed(keras_shape))
    if transform is _torch_conv:
        return tuple(keras_shape[i] for i in (3, 2, 0, 1))
    return tuple(keras_shape)


def named_variables(layer, prefix=""):
    """Yields `(key, variable, transform)` for each weight of `layer`, keyed as in diffusers.

    `transform` maps the stored (PyTorch-layout) array to the Keras layout, or is None.
    """
    if isinstance(layer, keras.layers.Conv2D):
        yield prefix + "weight", layer.kernel, _torch_conv
        if layer.bias is not None:
            yield prefix + "bias", layer.bias, None
        return
    if isinstance(layer, keras.layers.Dense):
        if getattr(layer, "weight_format", None) is not None:  # as the file stores it (GGUF blocks, float8)
            yield prefix + "weight", layer._kernel, None
        else:  # a quantized layer's int8 / int4 variable; else `kernel`, which merges the trainer's Keras LoRA
            yield prefix + "weight", layer._kernel if layer.quantization_mode else layer.kernel, _torch_linear
        if layer.bias is not None:
            yield prefix + "bias", layer.bias, None
        return
    aliases = getattr(layer, "checkpoint_aliases", {})
    # On the torch backend, sub-layers are torch modules and live in `_modules`, not `__dict__`.
    attrs = dict.fromkeys([*vars(layer), *getattr(layer, "_modules", {})])
    for attr in attrs:
        if attr.startswith("_"):
            continue
        value = getattr(layer, attr)
        key = prefix + aliases.get(attr, attr)
        if isinstance(value, keras.Variable):
            yield key, value, None
        elif isinstance(value, keras.layers.Layer):
            yield from named_variables(value, key + ".")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    yield from named_variables(item, f"{key}.{i}.")


def set_checkpoint_paths(layer, root):
    """Gives every variable of `layer` the path of its checkpoint key under `root`:
    `transformer_blocks.3.attn.to_q.weight` -> `<root>/transformer_blocks_3/attn/to_q/kernel`.

    Keras names paths after its automatic layer names (`linear_57/kernel`); these are the names that
    `keras.distribution.LayoutMap` rules match (`keras_sd3.distribution.layout`).
    """
    for key, variable, _ in named_variables(layer):
        parts = []
        for piece in key.split(".")[:-1]:
            if piece.isdigit() and parts:
                parts[-1] += f"_{piece}"
            else:
                parts.append(piece)
        variable._path = "/".join([root, *parts, variable.name])


def _describe(keys, limit=5):
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(f"'{k}'" for k in keys[:limit]) + more


def load_layer_weights(layer, source, what="checkpoint", loaded=None, store=None):
    """Copies every tensor of `source` into `layer`, strictly.

    Args:
        layer: a built keras_sd3 layer.
        source: a `TensorSource` keyed like `named_variables(layer)`.
        what: a name for the checkpoint part, used in error messages.
        loaded: None, or a function called with each variable once it holds its tensor (quantized
            loading quantizes the layer there).
        store: None, or a function `(variable, form, stored array) -> bool` offered each tensor that
            the source has in a storage form (`source.forms`: GGUF blocks, float8); where it returns
            False (or without it) the tensor is turned into float on the host.

    Raises:
        CheckpointError: a tensor is missing, unexpected, or of the wrong shape. Shapes are checked
            for all tensors before any is read.
    """
    expected = {key: (var, transform) for key, var, transform in named_variables(layer)}
    missing = set(expected) - set(source.keys())
    unexpected = set(source.keys()) - set(expected)
    if missing:
        raise CheckpointError(
            f"The {what} is missing {len(missing)} tensor(s) the model needs: {_describe(missing)}. "
            "Is it the right checkpoint for this model?"
        )
    if unexpected:
        raise CheckpointError(
            f"The {what} has {len(unexpected)} tensor(s) this model does not use: "
            f"{_describe(unexpected)}. Is it the right checkpoint for this model?"
        )
    for key, (var, transform) in expected.items():
        stored, wanted = tuple(source.shapes[key]), _torch_shape(tuple(var.shape), transform)
        if stored != wanted:
            raise CheckpointError(
                f"Tensor '{key}' in the {what} has shape {stored}, but the model expects {wanted}."
            )
    forms = getattr(source, "forms", {})
    for key in list(expected):
        var, transform = expected.pop(key)  # (no reference left here once done: quantized loading frees each kernel)
        value = source.read(key)
        form = forms.get(key)
        if form is not None:
            if store is not None and store(var, form, value):
                continue
            value = form.to_float(value, source.shapes[key])
        if transform is not None:
            value = transform(value)
        _set_value(var, np.ascontiguousarray(value).astype(var.dtype, copy=False))
        del value
        if loaded is not None:
            loaded(var)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc
        return None


def release_freed_memory():
    """Hands the C heap's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere).

    Quantized loading frees a float kernel of 5-50 MB for every layer it quantizes. glibc serves
    blocks below its mmap threshold from its heaps, and raises that threshold to the size of each
    mapped block freed (up to 32 MB), so the freed kernels become holes in a heap that never shrinks:
    loading SD3 Medium in int8 on torch peaked at 4.14 GiB instead of 2.42 (the int8 model is 2.16).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _pending():
    return global_state.get_global_attribute("uninitialized_variables", [], set_to_default=True)


def forget_pending(variable):
    """Drops `variable` from Keras' list of variables awaiting deferred initialisation (which would keep
    it alive: quantized loading replaces each float kernel as soon as it is read)."""
    pending = _pending()
    pending[:] = [var for var in pending if var is not variable]


def _set_value(var, value):
    if var._value is None:  # created by `build_then_load`: the checkpoint's tensor is its first value
        layout = getattr(var, "_layout", None)  # under a keras.distribution: straight into its shards
        value = keras.distribution.distribute_tensor(value, layout) if layout is not None else value
        var._initialize(var._convert_to_tensor(value, dtype=var.dtype))
        var._initializer = None
    else:
        var.assign(value)


def build_then_load(build, load):
    """`load(build())` where `build` creates its variables with Keras' deferred initialisation.

    Inside a `keras.StatelessScope(initialize_variables=False)` a variable gets its shape and dtype
    but no value, so building SD3 Medium costs neither the ~30-80 s of drawing 2B random numbers nor
    their memory; `load_layer_weights` then gives each variable the checkpoint's tensor as its first
    value, and loading peaks at the weights' size plus one tensor. Variables that `load` leaves
    without a value get their initializer's. (Uses Keras' private `_value`, `_initialize` and
    `_deferred_initialize`, the same path Keras takes on leaving a stateless scope.)
    """
    known = {id(var) for var in _pending()}
    try:
        with keras.StatelessScope(initialize_variables=False):
            model = build()
        load(model)
        for var in model.variables:
            if var._value is None:
                var._deferred_initialize()
        return model
    finally:  # also after an error: Keras would otherwise initialise an abandoned model's variables later
        global_state.set_global_attribute(
            "uninitialized_variables", [var for var in _pending() if id(var) in known]
        )
