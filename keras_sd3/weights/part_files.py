"""Files holding one part of SD3: an MMDiT or a T5 encoder alone, as `.gguf` or `.safetensors`.

`from_preset(source, transformer=PATH, t5=PATH)` takes these parts from such files (city96's GGUF
transformers, ComfyUI's `*_fp8_e4m3fn*` / `*_fp8_scaled` files, T5 GGUFs of llama.cpp's names) and
everything else from `source`. Tensors keep their storage form (`TensorSource.forms`): the large
matrix products stay in it in memory (`keras_sd3.quantization.stored`).
"""

import os
import re

from keras_sd3.errors import CheckpointError
from keras_sd3.weights import original_keys
from keras_sd3.weights.safetensors_file import open_safetensors

MMDIT_PREFIXES = ("model.diffusion_model.",)  # a single file's prefix, which MMDiT-only files may keep
T5_PREFIXES = ("text_encoders.t5xxl.transformer.",)
# llama.cpp's T5 encoder names (its GGUF files) -> transformers' names, applied in order.
T5_GGUF_NAMES = (
    (r"^token_embd\.", "shared."),
    (r"^enc\.output_norm\.", "encoder.final_layer_norm."),
    (r"^enc\.blk\.(\d+)\.", r"encoder.block.\1."),
    (r"\.attn_q\.", ".layer.0.SelfAttention.q."),
    (r"\.attn_k\.", ".layer.0.SelfAttention.k."),
    (r"\.attn_v\.", ".layer.0.SelfAttention.v."),
    (r"\.attn_o\.", ".layer.0.SelfAttention.o."),
    (r"\.attn_rel_b\.", ".layer.0.SelfAttention.relative_attention_bias."),
    (r"\.attn_norm\.", ".layer.0.layer_norm."),
    (r"\.ffn_gate\.", ".layer.1.DenseReluDense.wi_0."),
    (r"\.ffn_up\.", ".layer.1.DenseReluDense.wi_1."),
    (r"\.ffn_down\.", ".layer.1.DenseReluDense.wo."),
    (r"\.ffn_norm\.", ".layer.1.layer_norm."),
)
T5_ARCHITECTURES = ("t5", "t5encoder")


def _open(path, what):
    """`(TensorSource, GGUF architecture or None)` of a `.gguf` or `.safetensors` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"The {what} file {path} does not exist.")
    if path.endswith(".gguf"):
        from keras_sd3.weights.gguf_file import open_gguf

        return open_gguf(path)
    if path.endswith(".safetensors"):
        return open_safetensors(path), None
    raise CheckpointError(f"The {what} file must be a .gguf or .safetensors file, got {path}.")


def _strip(source, prefixes):
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in source.keys()):
            return source.subset(prefix)
    return source


def open_transformer(path):
    """An MMDiT file -> `(MMDiTConfig, TensorSource with diffusers names)`; the variant (SD3 / SD3.5
    Medium / Large) is inferred from the shapes, as for single files.

    Raises:
        CheckpointError: a missing or unreadable file, a GGUF file of another architecture than "sd3",
            or tensors that are not an SD3 MMDiT's (the message names one).
    """
    source, architecture = _open(path, "transformer")
    if architecture not in (None, "sd3"):
        raise CheckpointError(f"{path} is a GGUF file of architecture {architecture!r}; an SD3 / SD3.5 "
                              "transformer has 'sd3'.")
    source = _strip(source, MMDIT_PREFIXES)
    config = original_keys.infer_mmdit_config(source)
    return config, original_keys.rename(source, original_keys.mmdit_rules(config.num_layers - 1),
                                        f"transformer {path}")


def _t5_gguf_name(name):
    for pattern, replacement in T5_GGUF_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def open_t5(path):
    """A T5-XXL encoder file -> `(T5Config, TensorSource with transformers' names)`: a GGUF of
    llama.cpp's names (`enc.blk.0.attn_q.weight`), or a `.safetensors` of transformers' names, with or
    without a single file's `text_encoders.t5xxl.transformer.` prefix.

    Raises:
        CheckpointError: a missing or unreadable file, a GGUF file of another architecture, or tensors
            that are not a T5 encoder's.
    """
    source, architecture = _open(path, "T5")
    if architecture is not None:
        if architecture not in T5_ARCHITECTURES:
            raise CheckpointError(f"{path} is a GGUF file of architecture {architecture!r}; a T5 encoder has "
                                  f"one of {T5_ARCHITECTURES}.")
        source = source._select(list(source.keys()), _t5_gguf_name)
    source = _strip(source, T5_PREFIXES).without(("encoder.embed_tokens.weight",))  # (tied to `shared`)
    return original_keys.infer_t5_config(source, f"T5 in {path}"), source
