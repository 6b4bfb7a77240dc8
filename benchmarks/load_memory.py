"""Peak memory and time of `StableDiffusion3Backbone.from_preset` on an SD3-Medium-shaped checkpoint.

Writes a diffusers folder with random SD3-Medium weights in float16 (transformer 4.2 GB + VAE 0.17 GB)
once, then loads it in a fresh process per backend and reports the peak resident memory added by
`from_preset` (model construction + loading) relative to the size of the weights, and its wall time;
`diffusers` loads the same folder with `SD3Transformer2DModel` / `AutoencoderKL.from_pretrained`
(float16) for comparison, `diffusers-read` then reads every weight once. `--quantize int8 int4` adds
rows loaded with `from_preset(..., quantize=MODE)`: each layer is quantized as its weight is read, so
the peak should stay within the quantized model plus the largest tensor in float32 (both printed).

Usage:
    python benchmarks/load_memory.py [--folder /tmp/sd3m_random] [--backends jax torch tensorflow diffusers diffusers-read]
    python benchmarks/load_memory.py --backends jax torch --quantize none int8 int4
"""

import argparse
import os
import subprocess
import sys
import time

from mmdit_step import SD3_MEDIUM_DIFFUSERS, SD3_VAE_DIFFUSERS  # noqa: E402  (same folder)


def write_checkpoint(folder):
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    if os.path.isdir(os.path.join(folder, "vae")):
        return
    transformer = SD3Transformer2DModel(**SD3_MEDIUM_DIFFUSERS).to(torch.float16)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    del transformer
    vae = AutoencoderKL(**SD3_VAE_DIFFUSERS).to(torch.float16)
    vae.save_pretrained(os.path.join(folder, "vae"))


def folder_bytes(folder):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
        if name.endswith(".safetensors")
    )


def memory(field):
    """`VmHWM` (peak) or `VmRSS` (current) of this process in bytes. (Not `ru_maxrss`, which a
    child inherits from its parent across exec on Linux.)"""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def load_diffusers(folder, touch=False):
    """diffusers memory-maps the safetensors files: with `touch`, every weight is also read once (as the
    first generation would), which brings the pages into the process."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    before, start = memory("VmRSS"), time.perf_counter()
    models = [
        SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float16),
        AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float16),
    ]
    if touch:
        for model in models:
            for parameter in model.parameters():
                parameter.sum()
    return before, start


def load_keras_sd3(folder, quantize=None):
    """-> (RSS before, start time, bytes of the loaded model's variables, bytes of its largest weight in float32)."""
    import keras
    import numpy as np

    from keras_sd3.models import StableDiffusion3Backbone

    before, start = memory("VmRSS"), time.perf_counter()
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=(512, 512, 3), quantize=quantize,
                                                    dtype="bfloat16" if quantize else "float16")  # (Keras: no int8 over float16)
    sizes = [(int(np.prod(v.shape)), np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize)
             for v in backbone.variables]
    return before, start, sum(n * b for n, b in sizes), max(n for n, _ in sizes) * 4


def worker(folder, implementation):
    model, largest = 0, 0
    if implementation.startswith("diffusers"):
        before, start = load_diffusers(folder, touch=implementation == "diffusers-read")
    else:
        quantize = implementation.partition(":")[2] or None
        before, start, model, largest = load_keras_sd3(folder, None if quantize == "none" else quantize)
    print(memory("VmHWM") - before, time.perf_counter() - start, model, largest)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/sd3m_random_fp16")
    parser.add_argument("--backends", nargs="+", default=["jax", "torch", "tensorflow", "diffusers", "diffusers-read"])
    parser.add_argument("--quantize", nargs="+", default=["none"], help="none, int8, int4 (keras_sd3 backends)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.folder, args.worker)
        return
    write_checkpoint(args.folder)
    weights = folder_bytes(args.folder)
    print(f"weights on disk (float16): {weights / 2**30:.2f} GiB")
    print("| implementation | peak RSS added by loading | ratio to weights | seconds | loaded model GiB | "
          "largest weight in float32 GiB |")
    print("|---|---|---|---|---|---|")
    runs = [(b, None) for b in args.backends if b.startswith("diffusers")]
    runs = [(b, q) for b in args.backends if not b.startswith("diffusers") for q in args.quantize] + runs
    for backend, quantize in runs:
        env = dict(os.environ, KERAS_BACKEND="torch" if backend.startswith("diffusers") else backend)
        implementation = backend if quantize is None else f"{backend}:{quantize}"
        result = subprocess.run([sys.executable, __file__, "--worker", implementation, "--folder", args.folder],
                                env=env, capture_output=True, text=True)
        if result.returncode:
            print(f"| {implementation} | failed: {result.stderr.strip().splitlines()[-1]} | | | | |", flush=True)
            continue
        added, seconds, model, largest = result.stdout.strip().splitlines()[-1].split()
        name = backend if backend.startswith("diffusers") else f"keras_sd3 {backend}" + (
            f" {quantize}" if quantize not in (None, "none") else "")
        print(f"| {name} | {int(added) / 2**30:.2f} GiB | {int(added) / weights:.2f} | {float(seconds):.1f} | "
              f"{int(model) / 2**30:.2f} | {int(largest) / 2**30:.3f} |", flush=True)


if __name__ == "__main__":
    main()
