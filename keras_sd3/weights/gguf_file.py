"""Lazy reading of GGUF files (city96's SD3 / SD3.5 transformers, T5 encoders), one tensor at a time.

`gguf.GGUFReader` (gguf-py, numpy) parses the header; each tensor's bytes are then read with plain file
reads, as for safetensors (no memory map whose touched pages would count against the process). F32,
F16 and BF16 tensors are returned as float arrays (as diffusers' loader does); block types are
returned as their uint8 rows with a `GGUFBlocks` form (`keras_sd3.weights.forms`).
"""

import os

import ml_dtypes
import numpy as np

from keras_sd3.errors import CheckpointError
from keras_sd3.weights.forms import GGUFBlocks
from keras_sd3.weights.safetensors_file import TensorSource

ORIGINAL_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's key for a tensor stored under another shape


def _float_types():
    import gguf

    types = gguf.GGMLQuantizationType
    return {types.F32: np.float32, types.F16: np.float16, types.BF16: ml_dtypes.bfloat16}


def _field(reader, name):
    field = reader.fields.get(name)
    if field is None:
        return None
    values = [field.parts[i] for i in field.data]
    if field.types and field.types[0].name == "STRING":
        return bytes(values[0]).decode("utf-8")
    return [v.tolist()[0] for v in values] if len(values) > 1 else values[0].tolist()[0]


def _reader(path, offset, n_bytes, dtype, shape, byte_shape):
    def read():
        raw = np.empty(n_bytes, np.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(raw)) != n_bytes:
                raise CheckpointError(f"{path} is truncated: a tensor's bytes end past the end of the file.")
        return raw.view(dtype).reshape(shape) if dtype is not None else raw.reshape(byte_shape)

    return read


def open_gguf(path):
    """Opens a `.gguf` file as `(TensorSource, architecture)`; only the header is read now.

    Tensor shapes are numpy's (row-major, the reverse of ggml's); `architecture` is the file's
    `general.architecture` ("sd3", "t5", "t5encoder", ...) or None.

    Raises:
        CheckpointError: the file is missing or not GGUF, or a tensor has a type without a decoder
            here (the message names the tensor and the type, and lists the supported types).
    """
    import gguf

    from keras_sd3.quantization import ggml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file not found: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # gguf-py raises ValueError / struct errors on a file that is not GGUF
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error}).") from None
    floats = _float_types()
    shapes, readers, forms = {}, {}, {}
    for tensor in reader.tensors:
        name, kind = tensor.name, tensor.tensor_type
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        original = _field(reader, ORIGINAL_SHAPE + name)
        if kind not in floats and kind not in ggml.TYPES:
            supported = ", ".join(["F32", "F16", "BF16", *(t.name for t in ggml.TYPES.values())])
            raise CheckpointError(f"{path}: tensor '{name}' is of GGUF type {kind.name}, which keras_sd3 cannot "
                                  f"decode; supported types: {supported}.")
        n_bytes = int(tensor.n_bytes)
        dtype = floats.get(kind)
        byte_shape = None if dtype is not None else ggml.byte_shape(kind, shape)
        read = _reader(path, int(tensor.data_offset), n_bytes, dtype, shape, byte_shape)
        if original is not None:  # stored as rows of 256 values: decoded on the host, into its own shape
            original = tuple(int(d) for d in original)
            read = (lambda read=read, kind=kind, shape=shape, original=original:
                    GGUFBlocks(kind).to_float(read(), shape).reshape(original)) if dtype is None else \
                   (lambda read=read, original=original: read().reshape(original))
            shape = original
        elif dtype is None:
            forms[name] = GGUFBlocks(int(kind))
        shapes[name], readers[name] = shape, read
    architecture = _field(reader, "general.architecture")
    del reader  # (closes its memory map of the header)
    return TensorSource(shapes, readers, forms), architecture
