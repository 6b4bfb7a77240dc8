"""Parameter bytes per part of the real models, in bfloat16, with Keras int8 / int4 weights, and with
the MMDiT and T5-XXL from Q8_0 / Q4_0 GGUF or fp8 files.

Builds SD3 Medium, SD3.5 Medium and SD3.5 Large with CLIP-L, CLIP-G and T5-XXL and the VAE under Keras'
deferred initialisation (shapes and dtypes, no values: nothing is allocated), gives each layer that
`backbone.quantize(mode)` would quantize the variables of Keras' quantized layer (`quantized_build`,
the same variables `quantize` makes), and adds up every variable's bytes by part.

The file rows count what those files keep in memory: the matrices of the MMDiT's and T5's large
products in their blocks (Q8_0 34 bytes and Q4_0 18 bytes per 32 weights; fp8 one byte a weight and
a float32 scale a layer), as city96's GGUF files and ComfyUI's fp8 files store them (their embedders,
norms and biases are float, loaded in the compute dtype); CLIP and the VAE in bfloat16.

Usage:
    python benchmarks/quantized_size.py
"""

import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sd3 import quantization  # noqa: E402
from keras_sd3.models import (  # noqa: E402
    SD3_MEDIUM, SD3_VAE, SD35_LARGE, SD35_MEDIUM, CLIPConfig, StableDiffusion3Backbone, T5Config)

CLIP_G = CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    hidden_act="gelu", projection_dim=1280)
PARTS = {"diffuser": "MMDiT", "t5": "T5-XXL", "clip_g": "CLIP-G", "clip_l": "CLIP-L", "vae": "VAE"}
GIB = 2**30
STORED = {"Q8_0": (34 / 32, 0), "Q4_0": (18 / 32, 0), "fp8": (1, 4)}  # bytes a weight, bytes a layer


def _backbone(mmdit):
    return StableDiffusion3Backbone(mmdit, SD3_VAE, CLIPConfig(), CLIP_G, T5Config(), dtype="bfloat16")


def stored_sizes(mmdit, weight_bytes, layer_bytes):
    """`sizes` with the MMDiT's and T5's large matrices stored `weight_bytes` a weight."""
    out = sizes(mmdit, "bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with keras.StatelessScope(initialize_variables=False):
            backbone = _backbone(mmdit)
    for part, name in (("mmdit", "diffuser"), ("t5", "t5")):
        for layer in quantization.selected_layers(backbone, part):
            count = int(np.prod(layer._kernel.shape))
            out[name] += (count * (weight_bytes - 2) + layer_bytes) / GIB
    return out


def sizes(mmdit, mode):
    """GiB of parameters by part with `mode` ("bfloat16", "int8", "int4", or a file's `STORED` form)."""
    if mode in STORED:
        return stored_sizes(mmdit, *STORED[mode])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with keras.StatelessScope(initialize_variables=False):
            backbone = _backbone(mmdit)
            if mode != "bfloat16":
                for part in quantization.PARTS:
                    for layer in quantization.selected_layers(backbone, part):
                        shape, part_name = tuple(layer._kernel.shape), layer._kernel.path.split("/")[0]
                        layer._tracker.unlock()
                        del layer._kernel
                        layer.quantized_build(shape, mode, quantization.resolve_config(mode, None))
                        layer._tracker.lock()
                        for variable in layer.variables:
                            variable._path = f"{part_name}/{variable.name}"  # (only the part is read below)
    out = dict.fromkeys(PARTS, 0.0)
    for variable in backbone.variables:
        part = variable.path.split("/")[0]
        out[part] += int(np.prod(variable.shape)) * np.dtype(keras.backend.standardize_dtype(variable.dtype)
                                                              .replace("bfloat16", "float16")).itemsize / GIB
    return out


def main():
    print("| model | weights | " + " | ".join(f"{name} GiB" for name in PARTS.values()) + " | total GiB |")
    print("|---|---|" + "---|" * (len(PARTS) + 1))
    for name, mmdit in (("SD3 Medium", SD3_MEDIUM), ("SD3.5 Medium", SD35_MEDIUM), ("SD3.5 Large", SD35_LARGE)):
        for mode in ("bfloat16", "int8", "int4", *STORED):
            parts = sizes(mmdit, mode)
            cells = " | ".join(f"{parts[p]:.2f}" for p in PARTS)
            print(f"| {name} | {mode} | {cells} | {sum(parts.values()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
