"""Parameters per device of the real models under `keras.distribution.ModelParallel`, in bfloat16.

Builds SD3.5 Large and SD3 Medium, each with CLIP-L, CLIP-G and T5-XXL and the VAE, with Keras' deferred
initialisation (shapes, no values: nothing of the 26 GB is allocated) under a (batch, model) mesh of 8
forced XLA CPU devices, and adds up each device's shard of every variable from the layout map's entry for
its path (`jax.sharding.NamedSharding.shard_shape`), after checking that the entry is the layout the
backbone gave the variable. Also lists the variables of 1M+ parameters left
replicated outside the VAE (none are expected besides the few small embedders).

Usage:
    python benchmarks/sharding.py [--meshes 1x1 1x4 1x8 2x4]
"""

import argparse
import os
import warnings

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sd3.distribution import mesh_distribution, parse_mesh  # noqa: E402
from keras_sd3.models import SD3_MEDIUM, SD3_VAE, SD35_LARGE, CLIPConfig, StableDiffusion3Backbone, T5Config  # noqa: E402

CLIP_L = CLIPConfig()
CLIP_G = CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    hidden_act="gelu", projection_dim=1280)
T5_XXL = T5Config()
GIB = 2**30


def per_device(mmdit, mesh):
    """(GiB of parameters on each device by part, variables of 1M+ parameters replicated outside the VAE)."""
    keras.distribution.set_distribution(mesh_distribution(*parse_mesh(mesh)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 38 heads over 4 or 8 devices: split by columns (see layout.py)
        with keras.StatelessScope(initialize_variables=False):
            backbone = StableDiffusion3Backbone(mmdit, SD3_VAE, CLIP_L, CLIP_G, T5_XXL, dtype="bfloat16")
    layout_map = keras.distribution.distribution()._layout_map
    parts, replicated = {}, []
    for variable in backbone.variables:
        entry = layout_map[variable.path]
        axes = tuple(entry.axes) if entry is not None else (None,) * len(variable.shape)
        if axes != tuple(variable._layout.axes):
            raise AssertionError(f"{variable.path}: the layout map says {axes}, the variable has {variable._layout.axes}")
        shard = jax.sharding.NamedSharding(variable._layout.backend_layout.mesh,
                                           jax.sharding.PartitionSpec(*axes)).shard_shape(tuple(variable.shape))
        part = variable.path.split("/")[0]
        parts[part] = parts.get(part, 0) + int(np.prod(shard)) * 2 / GIB
        if mesh != "1x1" and shard == tuple(variable.shape) and part != "vae" and np.prod(variable.shape) >= 2**20:
            replicated.append(variable.path)
    keras.distribution.set_distribution(None)
    return parts, replicated


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", nargs="+", default=["1x1", "1x4", "1x8", "2x4"])
    args = parser.parse_args()
    print("| model | mesh | MMDiT GiB | T5-XXL GiB | CLIP-L + G GiB | VAE GiB | total GiB per device | replicated 1M+ |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mmdit in (("SD3.5 Large", SD35_LARGE), ("SD3 Medium", SD3_MEDIUM)):
        for mesh in args.meshes:
            parts, replicated = per_device(mmdit, mesh)
            clip = parts["clip_l"] + parts["clip_g"]
            print(f"| {name} | {mesh} | {parts['diffuser']:.2f} | {parts['t5']:.2f} | {clip:.2f} | {parts['vae']:.2f} | "
                  f"{sum(parts.values()):.2f} | {', '.join(replicated) or 'none'} |", flush=True)


if __name__ == "__main__":
    main()
