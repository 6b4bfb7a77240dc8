"""Storage forms of checkpoint tensors that are not plain float: GGUF blocks and (scaled) float8.

A `TensorSource` records a form per tensor (`source.forms`); its reader then returns the stored array
(uint8 rows of GGUF blocks, float8 values), rows in the checkpoint's own (PyTorch) order so that key
maps can still split and reorder rows (a fused qkv, swapped adaLN halves). `load_layer_weights` keeps
the large matrix products in their stored form (`keras_sd3.quantization.stored`); any other tensor in
a stored form is turned into float on the host (`to_float`).
"""

import dataclasses

import ml_dtypes
import numpy as np

FLOAT8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}
# ComfyUI's scaled float8 files: a marker tensor, and per layer a float32 scale (and an input scale,
# used only by its float8 matrix products; the weights here are scaled into the compute dtype).
SCALED_MARKER, WEIGHT_SCALE, INPUT_SCALE = "scaled_fp8", "scale_weight", "scale_input"


@dataclasses.dataclass(frozen=True)
class GGUFBlocks:
    """A GGUF tensor of a block type (Q8_0, Q4_K, ...): stored as (rows, row bytes) uint8."""

    ggml_type: int

    @property
    def name(self):
        import gguf

        return gguf.GGMLQuantizationType(self.ggml_type).name

    def to_float(self, raw, shape):
        import gguf

        return gguf.quants.dequantize(np.asarray(raw), self.ggml_type).reshape(shape).astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class Float8:
    """float8 values (`dtype` "float8_e4m3fn" or "float8_e5m2") times a per-tensor `scale`."""

    dtype: str
    scale: float = 1.0

    @property
    def name(self):
        return self.dtype if self.scale == 1.0 else f"{self.dtype} (scaled)"

    def to_float(self, values, shape):
        return (np.asarray(values).astype(np.float32) * np.float32(self.scale)).reshape(shape)


def float8_forms(shapes, readers, dtypes):
    """The float8 tensors of one safetensors file as `Float8` forms, with ComfyUI's scales folded in.

    Args:
        shapes, readers, dtypes: name -> shape / reader / numpy dtype of the file's tensors.

    Returns:
        `(shapes, readers, forms)` without the scale and marker tensors (`*.scale_weight`,
        `*.scale_input`, `*scaled_fp8`); each float8 `X.weight` gets the scale `X.scale_weight`
        (1 where the file has none, as in the unscaled `*_fp8_e4m3fn` files).
    """
    names = {np.dtype(v).name: k for k, v in FLOAT8.items()}
    float8 = {name for name, dtype in dtypes.items() if np.dtype(dtype).name in names}
    scales = {name for name in shapes if name.rpartition(".")[2] in (WEIGHT_SCALE, INPUT_SCALE)
              or name.rpartition(".")[2] == SCALED_MARKER or name == SCALED_MARKER}
    if not float8 and not scales:
        return shapes, readers, {}
    forms = {}
    for name in float8 - scales:
        scale_key = name.rpartition(".")[0] + "." + WEIGHT_SCALE
        scale = float(np.asarray(readers[scale_key](), np.float32).reshape(-1)[0]) if scale_key in shapes else 1.0
        forms[name] = Float8(names[np.dtype(dtypes[name]).name], scale)
    keep = [name for name in shapes if name not in scales]
    return {k: shapes[k] for k in keep}, {k: readers[k] for k in keep}, forms
