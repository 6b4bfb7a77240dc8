"""The SD3 VAE decode alone: keras_sd3 vs diffusers' `AutoencoderKL.decode`, same random weights.

SD3's VAE (4 levels, 128-256-512-512 channels, 16 latent channels), latents for one image of --sizes
pixels. Each backend runs in its own process, which also holds diffusers' VAE; after a warm-up (and
compilation) the two decode alternately; prints medians and the median per-pair ratio.

Usage:
    python benchmarks/vae_decode.py [--backends jax torch tensorflow] [--sizes 512 1024]
        [--dtypes float32 bfloat16] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mmdit_step import SD3_VAE_DIFFUSERS, timed_pairs  # noqa: E402


def worker(size, dtype, repeats):
    import keras
    import torch
    from diffusers import AutoencoderKL

    from keras_sd3.backend import compile_function
    from keras_sd3.models import VAEConfig
    from keras_sd3.models.vae import VAE
    from keras_sd3.weights import load_layer_weights
    from keras_sd3.weights.safetensors_file import TensorSource

    torch.manual_seed(0)
    reference = AutoencoderKL(**SD3_VAE_DIFFUSERS).to(getattr(torch, dtype)).eval()
    vae = VAE(VAEConfig.from_diffusers(dict(reference.config)), dtype=dtype)
    state = {k: v.float().numpy() for k, v in reference.state_dict().items()}
    load_layer_weights(vae, TensorSource({k: v.shape for k, v in state.items()}, {k: (lambda v=v: v) for k, v in state.items()}))
    latents = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 16)).astype("float32")
    torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(getattr(torch, dtype))
    decode = compile_function(vae, lambda x: vae.decode(keras.ops.cast(x, dtype)))

    def theirs():
        with torch.no_grad():
            return reference.decode(torch_latents).sample.float().numpy()

    def ours():
        return keras.ops.convert_to_numpy(keras.ops.cast(decode(latents), "float32"))

    reference_times, our_times = timed_pairs(theirs, ours, repeats)
    difference = float(np.abs(ours() - theirs().transpose(0, 2, 3, 1)).max())
    return {"reference": reference_times, "ours": our_times, "max_difference": difference}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["jax", "torch", "tensorflow"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.repeats)))
        return
    print("| backend | size | dtype | keras_sd3 s | diffusers s, same process | ratio | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for dtype in args.dtypes:
            for backend in args.backends:
                command = [sys.executable, __file__, "--worker", str(size), dtype, "--repeats", str(args.repeats)]
                done = subprocess.run(command, env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True,
                                      text=True)
                if done.returncode:
                    print(f"| {backend} | {size} | {dtype} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                ratio = statistics.median(a / b for a, b in zip(r["ours"], r["reference"]))
                print(f"| {backend} | {size} | {dtype} | {statistics.median(r['ours']):.2f} | "
                      f"{statistics.median(r['reference']):.2f} | {ratio:.2f} | {r['max_difference']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
