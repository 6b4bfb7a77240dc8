"""Lazy reading of `.safetensors` files (single or sharded), one tensor at a time.

The header is parsed here rather than through `safetensors.safe_open(framework="numpy")` because
numpy has no bfloat16 / float8 and the real SD3.5 checkpoints are stored in those types; `ml_dtypes`
provides them. Tensors are read one at a time with plain file reads (no memory map, whose pages would
count against the process), so loading never holds more than the model plus one tensor in memory.
Nothing here can execute code from the file (no pickle).
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from keras_sd3.errors import CheckpointError  # noqa: F401 (re-exported)
from keras_sd3.weights.forms import float8_forms

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class TensorSource:
    """A read-only mapping from tensor names to lazily read numpy arrays.

    Args:
        shapes: dict of name -> shape tuple (the values' shape, also for tensors stored in blocks).
        readers: dict of name -> zero-argument function returning the array.
        forms: dict of name -> the storage form (`keras_sd3.weights.forms`) of a tensor that is not
            plain float: its reader then returns the stored array (GGUF blocks as uint8 rows, float8
            values before their scale), which `forms[name].to_float` turns into float32.
    """

    def __init__(self, shapes, readers, forms=None):
        self.shapes = dict(shapes)
        self._readers = readers
        self.forms = {k: v for k, v in (forms or {}).items() if k in self.shapes}

    def keys(self):
        return self.shapes.keys()

    def __contains__(self, key):
        return key in self.shapes

    def read(self, key):
        """Returns the tensor `key` as a new numpy array, in its stored dtype (or stored form)."""
        return self._readers[key]()

    def read_float(self, key):
        """Returns the tensor `key` as float values: stored forms decoded to float32, else as `read`."""
        value = self.read(key)
        form = self.forms.get(key)
        return value if form is None else form.to_float(value, self.shapes[key])

    def _select(self, names, rename=lambda k: k):
        return TensorSource({rename(k): self.shapes[k] for k in names}, {rename(k): self._readers[k] for k in names},
                            {rename(k): self.forms[k] for k in names if k in self.forms})

    def without(self, names):
        """Returns a copy without the tensors `names` (absent names are ignored)."""
        return self._select([k for k in self.shapes if k not in names])

    def with_tensor(self, name, array):
        """Returns a copy with one more (in-memory) tensor."""
        return TensorSource({**self.shapes, name: array.shape}, {**self._readers, name: lambda: array}, self.forms)

    def subset(self, prefix):
        """Returns the tensors whose names start with `prefix`, with the prefix removed."""
        return self._select([k for k in self.shapes if k.startswith(prefix)], lambda k: k[len(prefix):])


def _read_header(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it has only {size} bytes.")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise CheckpointError(
                f"{path} is not a safetensors file (or is truncated): its header claims {length} "
                f"bytes but the file has {size}."
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file: unreadable header ({e}).")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: the header is not a JSON object.")
    header.pop("__metadata__", None)
    return header, 8 + length, size


def _entry(path, name, info, data_start, size):
    try:
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed header entry for tensor '{name}' ({e!r}).")
    if end - begin != int(np.prod(shape)) * dtype.itemsize or data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: tensor '{name}' of shape {shape} ({info['dtype']}) "
            f"does not fit its byte range [{begin}, {end}) in a file of {size} bytes."
        )
    return shape, dtype, data_start + begin


def open_safetensors(path):
    """Opens one `.safetensors` file as a `TensorSource` (only the header is read now).

    Raises:
        CheckpointError: the file is missing, truncated or not in safetensors format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file not found: {path}")
    header, data_start, size = _read_header(path)
    shapes, readers, dtypes = {}, {}, {}
    for name, info in header.items():
        shape, dtype, offset = _entry(path, name, info, data_start, size)

        def reader(offset=offset, dtype=dtype, shape=shape):
            array = np.empty(shape, dtype)
            with open(path, "rb") as f:
                f.seek(offset)
                f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
            return array

        shapes[name], readers[name], dtypes[name] = shape, reader, dtype
    return TensorSource(*float8_forms(shapes, readers, dtypes))


def open_sharded(index_path):
    """Opens a sharded checkpoint from its `*.safetensors.index.json` file."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index file ({e!r}).")
    folder = os.path.dirname(index_path)
    shapes, readers, forms = {}, {}, {}
    for shard_name in sorted(set(weight_map.values())):
        shard = open_safetensors(os.path.join(folder, shard_name))
        forms.update(shard.forms)
        for name in shard.keys():
            shapes[name], readers[name] = shard.shapes[name], shard._readers[name]
    missing = sorted(set(weight_map) - set(shapes))
    if missing:
        raise CheckpointError(f"{index_path} lists tensors that no shard holds, e.g. '{missing[0]}'.")
    return TensorSource(shapes, readers, forms)


def open_weights(folder, stem):
    """Opens `{folder}/{stem}.safetensors` or its sharded form `{stem}.safetensors.index.json`."""
    single = os.path.join(folder, f"{stem}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return open_safetensors(single)
    if os.path.isfile(index):
        return open_sharded(index)
    raise CheckpointError(f"No weights in {folder}: expected {stem}.safetensors or {stem}.safetensors.index.json.")
