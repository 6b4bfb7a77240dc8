"""Which layers of a backbone are quantized, and `backbone.quantize(mode)` over them."""

import re

from keras_sd3.models.layers import Linear

MODES = ("int8", "int4")
PARTS = ("mmdit", "clip_l", "clip_g", "t5")  # names in a `quantize={part: mode}` dict
_ATTRIBUTES = {"mmdit": "diffuser", "clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5"}
_MATMUL_KINDS = ("columns", "head_columns", "rows", "head_rows")


def check_quantize(quantize, config=None):
    """`quantize` (None, a mode, or {part: mode}) and an optional Keras config -> {part: mode}.

    Raises:
        ValueError: an unknown mode or part (the message lists the valid ones), a config for another
            mode, or an int4 config that quantizes activations.
    """
    if quantize is None:
        return {}
    if isinstance(quantize, str):
        quantize = dict.fromkeys(PARTS, quantize)
    if not isinstance(quantize, dict):
        raise ValueError(f"quantize must be None, one of {MODES} or a dict {{part: mode}} with parts {PARTS}; "
                         f"got {quantize!r}.")
    for part, mode in quantize.items():
        if part not in PARTS:
            raise ValueError(f"quantize names the part {part!r}; the parts are {PARTS} (the VAE stays in float).")
        if mode is not None and mode not in MODES:
            raise ValueError(f"quantize mode for {part} must be one of {MODES} or None, got {mode!r}.")
    modes = {part: mode for part, mode in quantize.items() if mode is not None}
    if config is not None and getattr(config, "mode", None) not in (None, *modes.values()):
        raise ValueError(f"The quantization config is for {config.mode!r}, but the mode is {quantize!r}.")
    if "int4" in modes.values() and getattr(config, "activation_quantizer", None) is not None:
        raise ValueError("int4 is weight-only here: give Int4QuantizationConfig(activation_quantizer=None).")
    return modes


def quantize_while_loading(backbone, modes, config=None):
    """The `loaded` hook of `load_layer_weights` that quantizes each selected layer of `backbone` (for
    `modes`, {part: mode}) as soon as its float kernel holds the checkpoint's tensor, or None for no
    quantization."""
    from keras_sd3.weights.assign import forget_pending, release_freed_memory

    layers = {id(layer._kernel): (layer, mode) for part, mode in modes.items()
              for layer in selected_layers(backbone, part)}
    if not layers:
        return None

    def loaded(variable):
        layer, mode = layers.get(id(variable), (None, None))
        if layer is not None:
            forget_pending(variable)
            layer.quantize(mode, config=resolve_config(mode, config))
            release_freed_memory()  # (the float kernel just freed)

    return loaded


def resolve_config(mode, config):
    """The Keras config a layer is quantized with: `config`, else int8 weight-only
    (`Int8QuantizationConfig(activation_quantizer=None)`; Keras' own default would quantize the
    activations too) or Keras' default int4 (weight-only, groups of 128 input rows)."""
    if config is None and mode == "int8":
        import keras

        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    return config


def selected_layers(backbone, part):
    """The `Linear` layers of `part` ("mmdit", "clip_l", ...) that quantization applies to: those whose
    kernel a model-parallel `LAYOUT` rule splits (the large matrix products), in checkpoint order."""
    from keras_sd3.distribution.layout import rule_kind

    model = getattr(backbone, _ATTRIBUTES[part], None)
    if model is None:
        return []
    layers = [layer for layer in _linears(model) if not layer.compressed]
    return [layer for layer in layers if rule_kind(layer._kernel.path) in _MATMUL_KINDS]


def _linears(layer):
    return (sub for sub in layer._flatten_layers(include_self=True, recursive=True) if isinstance(sub, Linear))


def _matches(layer, filters):
    if filters is None:
        return True
    if callable(filters):
        return bool(filters(layer))
    patterns = [filters] if isinstance(filters, str) else list(filters)
    path = layer._kernel.path.rpartition("/")[0]
    return any(re.search(p, path) for p in patterns)


def quantize_backbone(backbone, mode=None, config=None, filters=None):
    """Quantizes the backbone's large matrix products in place (see `keras_sd3.quantization`).

    Args:
        mode: "int8" or "int4" for every part, or {part: mode} (parts "mmdit", "clip_l", "clip_g", "t5";
            those not named stay in float). With `config` alone, the config's mode.
        config: a Keras `QuantizationConfig` (`Int8QuantizationConfig`, `Int4QuantizationConfig`).
        filters: a regex (or list) searched in the layer's checkpoint path
            (`diffuser/transformer_blocks_3/attn/to_q`), or a callable `layer -> bool`.

    Returns:
        The number of layers quantized.
    """
    if mode is None and config is not None:
        mode = config.mode
    modes = check_quantize(mode, config)
    if not modes:
        raise ValueError(f"quantize needs a mode ({MODES}) or a Keras quantization config; got mode={mode!r}.")
    count = 0
    for part, part_mode in modes.items():
        for layer in selected_layers(backbone, part):
            if _matches(layer, filters):
                layer.quantize(part_mode, config=resolve_config(part_mode, config))
                count += 1
    backbone.lora_version = getattr(backbone, "lora_version", 0) + 1  # compiled programs read other variables now
    return count
