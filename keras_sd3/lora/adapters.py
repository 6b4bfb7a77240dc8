"""Named LoRA adapters beside the base kernels of `keras_sd3.models.layers.Linear` (peft's LoRA layer).

An adapter of a layer holds `A` (in, rank), `B` (rank, out) and a scalar `factor = scale * alpha / rank`,
all Keras variables tracked by the layer (so that compiled programs read them as state: changing the
scale never recompiles), and adds `factor * (x @ A) @ B` to the layer's output. The base kernel is
never touched until `fuse`. Adding or removing adapters bumps `backbone.lora_version`, which makes
`tasks.loop.CompiledSteps` rebuild its programs (they read a different set of variables).
"""

import os
import re

import keras
import numpy as np
from keras import ops

from keras_sd3.backend import linear
from keras_sd3.lora.formats import LoraError, LoraWeights, read_lora, write_lora

PART_ATTRIBUTES = {"transformer": "diffuser", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}


class LoraAdapter:
    """One adapter of one layer: variables `a` (in, rank), `b` (rank, out), `factor` (scalar)."""

    def __init__(self, a, b, factor, alpha, scale):
        self.a, self.b, self.factor, self.alpha, self.scale = a, b, factor, alpha, scale

    @property
    def rank(self):
        return self.a.shape[1]

    def __call__(self, x):
        return linear(linear(x, self.a), self.b) * ops.cast(self.factor, x.dtype)

    def set_scale(self, scale):
        self.scale = float(scale)
        self.factor.assign(self.scale * self.alpha / self.rank)

    def delta(self):
        """`factor * A @ B`, the (in, out) kernel update, in float32 (on the variables' device)."""
        return self.factor * ops.matmul(ops.cast(self.a, "float32"), ops.cast(self.b, "float32"))


def dense_layers(layer, prefix=""):
    """`{diffusers module name: Dense layer}` under `layer`, named as `weights.assign.named_variables` does."""
    if isinstance(layer, keras.layers.Dense):
        return {prefix[:-1]: layer}
    found, aliases = {}, getattr(layer, "checkpoint_aliases", {})
    for attr in dict.fromkeys([*vars(layer), *getattr(layer, "_modules", {})]):  # torch: sub-layers in _modules
        if attr.startswith("_"):
            continue
        value, key = getattr(layer, attr), prefix + aliases.get(attr, attr)
        if isinstance(value, keras.layers.Layer):
            found.update(dense_layers(value, key + "."))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    found.update(dense_layers(item, f"{key}.{i}."))
    return found


def adapters_of(layer):
    """The `{name: LoraAdapter}` of a layer (an untracked plain dict, created on first use)."""
    if "_lora_adapters" not in vars(layer):
        object.__setattr__(layer, "_lora_adapters", {})  # bypasses Keras / torch attribute tracking
    return layer._lora_adapters


def _parts(backbone):
    return {part: getattr(backbone, attr) for part, attr in PART_ATTRIBUTES.items() if getattr(backbone, attr, None) is not None}


def _all_layers(backbone):
    """`[(part, module, layer)]` of every Dense layer of the MMDiT and CLIP encoders."""
    return [(part, module, layer) for part, root in _parts(backbone).items() for module, layer in dense_layers(root).items()]


def names(backbone):
    """The names of the adapters attached to `backbone`, in loading order."""
    found = {}
    for _, _, layer in _all_layers(backbone):
        found.update(dict.fromkeys(adapters_of(layer)))
    return list(found)


def _resolve(backbone, weights, path):
    """`[(layer, LoraWeights)]`, every module and shape checked before anything is attached."""
    layers = {(part, module): (module, layer) for part, module, layer in _all_layers(backbone)}
    underscored = {(part, module.replace(".", "_")): value for (part, module), value in layers.items()}
    resolved = []
    for w in weights:
        if w.part not in _parts(backbone):
            raise LoraError(f"{path}: '{w.key}' adapts the {w.part}, which this backbone does not have.")
        w.module, layer = (underscored if w.underscored else layers).get((w.part, w.module), (w.module, None))
        if layer is None:
            raise LoraError(f"{path}: '{w.key}' names no linear layer of the {w.part} ('{w.module}').")
        kernel_in, kernel_out = layer.features
        if (w.down.shape[1], w.up.shape[0]) != (kernel_in, kernel_out):
            raise LoraError(
                f"{path}: '{w.key}' has shape {w.down.shape} with up {w.up.shape}, but '{w.part}.{w.module}' "
                f"maps {kernel_in} -> {kernel_out} features."
            )
        resolved.append((layer, w))
    return resolved


def _add_variable(layer, name, value):
    layer._tracker.unlock()
    try:
        return layer.add_weight(
            shape=value.shape, initializer=lambda shape, dtype: ops.cast(value, dtype), trainable=False,
            dtype=layer.variable_dtype if value.ndim else "float32", name=name,
        )
    finally:
        layer._tracker.lock()


def _bump(backbone):
    backbone.lora_version = getattr(backbone, "lora_version", 0) + 1


def load(backbone, path, scale=1.0, name=None):
    """Attaches the LoRA file `path` as adapter `name` (default: the file's stem); returns the name.

    Raises:
        LoraError: the name is taken, or the file does not fit (nothing is attached then).
    """
    path = os.fspath(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    if name in names(backbone):
        raise LoraError(f"A LoRA named '{name}' is already loaded: unload it or pass another name.")
    last_block = backbone.mmdit_config.num_layers - 1
    resolved = _resolve(backbone, read_lora(path, last_block), path)
    by_layer = {}
    for layer, w in resolved:  # a fused kohya qkv gives several parts of one up matrix: one adapter each
        if id(layer) in by_layer:
            raise LoraError(f"{path}: '{w.key}' adapts '{w.part}.{w.module}' a second time.")
        by_layer[id(layer)] = (layer, w)
    variable_name = "lora_" + re.sub(r"\W", "_", name)  # Keras variable names cannot hold "/"
    for layer, w in by_layer.values():
        a = _add_variable(layer, f"{variable_name}_a", w.down.T)
        b = _add_variable(layer, f"{variable_name}_b", w.up.T)
        factor = _add_variable(layer, f"{variable_name}_factor", np.float32(scale * w.alpha / w.rank))
        adapters_of(layer)[name] = LoraAdapter(a, b, factor, w.alpha, scale)
    _bump(backbone)
    return name


def _adapters_named(backbone, name):
    found = [(layer, adapters_of(layer)[name]) for _, _, layer in _all_layers(backbone) if name in adapters_of(layer)]
    if not found:
        raise KeyError(f"No LoRA named '{name}' is loaded (loaded: {names(backbone)}).")
    return found


def set_scale(backbone, name, scale):
    """Sets adapter `name`'s scale: a variable assignment, read by compiled programs at run time."""
    for _, adapter in _adapters_named(backbone, name):
        adapter.set_scale(scale)


def unload(backbone, name):
    """Removes adapter `name`; the layers compute exactly their base product again."""
    for layer, adapter in _adapters_named(backbone, name):
        del adapters_of(layer)[name]
        for variable in (adapter.a, adapter.b, adapter.factor):
            layer._untrack_variable(variable)
    _bump(backbone)


def fuse(backbone):
    """Adds every adapter's `scale * alpha / rank * A @ B` to its base kernel, then drops the adapters.

    Raises:
        LoraError: an adapter sits on a quantized layer, or one whose weight is stored as a GGUF / float8
            file has it (checked before anything is merged).
    """
    quantized = sorted({layer._kernel.path.rpartition("/")[0] for name in names(backbone)
                        for layer, _ in _adapters_named(backbone, name) if layer.compressed})
    if quantized:
        raise LoraError(f"fuse_loras cannot merge into quantized layers ({len(quantized)}, e.g. {quantized[0]}): a merged "
                        "kernel would have to be quantized again, losing the LoRA's small changes to rounding. Keep "
                        "the LoRA loaded (it runs in float beside the quantized kernel), or load the model in float, "
                        "fuse, then quantize.")
    for name in names(backbone):
        for layer, adapter in _adapters_named(backbone, name):
            kernel = layer._kernel
            kernel.assign(ops.cast(ops.cast(kernel, "float32") + adapter.delta(), kernel.dtype))
        unload(backbone, name)


def _keras_lora_weights(backbone):
    """`LoraWeights` of the layers given Keras' own adapters (`Dense.enable_lora`, the trainer's)."""
    weights = []
    for part, module, layer in _all_layers(backbone):
        if getattr(layer, "lora_enabled", False):
            a, b = (ops.convert_to_numpy(ops.cast(v, "float32")) for v in (layer.lora_kernel_a, layer.lora_kernel_b))
            weights.append(LoraWeights(part, module, a.T, b.T, float(layer.lora_alpha), f"{part}.{module}"))
    return weights


def save(backbone, path, name=None):
    """Writes adapter `name` in the diffusers format; `name=None`: the `enable_lora` adapters (Keras'
    `lora_kernel_a` / `lora_kernel_b`), or the only loaded adapter if there are none."""
    weights = _keras_lora_weights(backbone) if name is None else []
    if name is None and not weights:
        loaded = names(backbone)
        if len(loaded) != 1:
            raise ValueError(f"save_lora needs a name: {len(loaded)} LoRAs are loaded ({loaded}) and none is trained.")
        name = loaded[0]
    if name is not None:
        modules = {id(layer): (part, module) for part, module, layer in _all_layers(backbone)}
        for layer, adapter in _adapters_named(backbone, name):
            a, b = (ops.convert_to_numpy(ops.cast(v, "float32")) for v in (adapter.a, adapter.b))
            weights.append(LoraWeights(*modules[id(layer)], a.T, b.T, adapter.alpha, name))
    write_lora(os.fspath(path), weights)
