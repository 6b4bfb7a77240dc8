"""Writing a checkpoint's MMDiT as a GGUF file, as city96's ComfyUI-GGUF tools do.

The file is what `tools/convert.py` (to F16) followed by the patched `llama-quantize` give: tensors
under their original single-file names (`joint_blocks.0.x_block.attn.qkv.weight`, no prefix),
`general.architecture` = "sd3", and one ggml type per tensor (`tensor_type`). ComfyUI-GGUF and
diffusers' GGUF loader (`SD3Transformer2DModel.from_single_file`) read it.

Tensors are declared first, then read, quantised (`gguf.quants.quantize`) and written one at a time,
so converting never holds more than one tensor: the 16 GB of SD3.5 Large fit in any memory.
"""

import math
import pathlib
import os

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES

from keras_sd3.weights import original_keys
from keras_sd3.weights.checkpoint import open_checkpoint

_Q = gguf.GGMLQuantizationType
FILE_TYPES = {
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}
# The embedders and the output layer are small and the most sensitive: city96's quantizer keeps them.
KEPT_IN_FLOAT = ("final_layer.", "t_embedder.", "y_embedder.", "x_embedder.", "context_embedder.")
SMALL = 1024  # tensors of at most this many values stay float32


def tensor_type(name, shape, ggml_type):
    """The ggml type of one tensor in a file of type `ggml_type` (city96's rules).

    Args:
        name: the tensor's original name.
        shape: its shape.
        ggml_type: the file's type, a `gguf.GGMLQuantizationType`.

    Returns:
        F32 for 1-D and small tensors; F16 (BF16 in a BF16 file) for `KEPT_IN_FLOAT` and `pos_embed`,
        and for rows that are not whole blocks of `ggml_type`; `ggml_type` otherwise. One exception to
        city96's rules: the tensors that are not matrices (the patch convolution, `pos_embed`) are F16
        in a BF16 file too, since diffusers treats BF16 as a quantized type and dequantises only the
        weights of Linear layers (a BF16 convolution kernel fails there).
    """
    if len(shape) == 1 or math.prod(shape) <= SMALL:
        return _Q.F32
    if ggml_type == _Q.BF16 and len(shape) != 2:
        return _Q.F16
    if name == "pos_embed" or any(part in name for part in KEPT_IN_FLOAT):
        return _Q.BF16 if ggml_type == _Q.BF16 else _Q.F16
    return ggml_type if shape[-1] % GGML_QUANT_SIZES[ggml_type][0] == 0 else _Q.F16


def check_output(output, ggml_type):
    """The file type for `ggml_type` after checking it and the output's folder.

    Raises:
        ValueError: an unknown type (the message lists the valid ones).
        FileNotFoundError: the output's folder does not exist.
    """
    if ggml_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {ggml_type!r}: choose one of {', '.join(FILE_TYPES)}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the output folder {folder} does not exist")
    return FILE_TYPES[ggml_type]


def _declare(writer, tensors, ggml_type):
    plan = [(name, tensor_type(name, tensors.shapes[name], ggml_type)) for name in tensors.keys()]
    for name, qtype in plan:
        block, size = GGML_QUANT_SIZES[qtype]
        shape = tensors.shapes[name]
        # The values' shape: `add_tensor_info` would read a uint8 dtype's shape as bytes per row.
        writer.add_tensor_info(name, shape, np.float32, math.prod(shape) // block * size, raw_dtype=qtype)
    return plan


def convert_to_gguf(source, output, ggml_type="Q8_0", progress=None):
    """Writes the MMDiT of `source` as a GGUF file that ComfyUI-GGUF and diffusers load.

    The file appears complete or not at all: it is written as `output + ".partial"`, renamed at the
    end and removed on any error.

    Args:
        source: anything `open_checkpoint` opens (a preset name, a diffusers folder, an original
            single file, a KerasHub preset).
        output: the `.gguf` path to write (str or path-like).
        ggml_type: one of `FILE_TYPES` ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16").
        progress: None, or a function `(done, total)` called after each tensor.

    Returns:
        `output`.

    Raises:
        ValueError: an unknown type (before anything is read).
        FileNotFoundError: the output's folder does not exist (before anything is read).
        CheckpointError: the source does not exist or is not an SD3 / SD3.5 checkpoint.
    """
    output = os.fspath(output)
    file_type = check_output(output, ggml_type)
    mmdit = open_checkpoint(source).mmdit
    tensors = original_keys.to_original_mmdit(mmdit.tensors, mmdit.config)
    writer = gguf.GGUFWriter(path=None, arch="sd3")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    plan = _declare(writer, tensors, _Q[ggml_type])
    partial = output + ".partial"
    try:
        writer.write_header_to_file(pathlib.Path(partial))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (name, qtype) in enumerate(plan, 1):
            writer.write_tensor_data(gguf.quants.quantize(np.asarray(tensors.read(name), np.float32), qtype))
            if progress is not None:
                progress(done, len(plan))
        writer.close()
        os.replace(partial, output)
    except BaseException:
        writer.close()
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return output
