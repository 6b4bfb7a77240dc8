"""Parameter bytes per part of the real models, in bfloat16 and with Keras int8 / int4 weights.

Builds SD3 Medium, SD3.5 Medium and SD3.5 Large with CLIP-L, CLIP-G and T5-XXL and the VAE under Keras'
deferred initialisation (shapes and dtypes, no values: nothing is allocated), gives each layer that
`backbone.quantize(mode)` would quantize the variables of Keras' quantized layer (`quantized_build`,
the same variables `quantize` makes), and adds up every variable's bytes by part.

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


def sizes(mmdit, mode):
    """GiB of parameters by part with `mode` ("bfloat16", "int8", "int4") on the quantized layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with keras.StatelessScope(initialize_variables=False):
            backbone = StableDiffusion3Backbone(mmdit, SD3_VAE, CLIPConfig(), CLIP_G, T5Config(), dtype="bfloat16")
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
        for mode in ("bfloat16", "int8", "int4"):
            parts = sizes(mmdit, mode)
            cells = " | ".join(f"{parts[p]:.2f}" for p in PARTS)
            print(f"| {name} | {mode} | {cells} | {sum(parts.values()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
