"""One classifier-free-guidance step of the MMDiT at the SD3-Medium shape: keras_sd3 vs diffusers.

Random weights, 24 layers, hidden 1536, 512 x 512 image (64 x 64 latents -> 1024 image tokens),
154 context tokens (77 CLIP + 77 T5 / zero tokens), batch 2 (positive + negative). Each keras_sd3
backend runs in its own process (the Keras backend is fixed per process), which also holds diffusers'
model: after one warm-up each, the two are timed alternately, so that the machine's drift (large on
shared machines) hits both alike. Prints the medians of --repeats steps and the median of the
per-pair ratios keras_sd3 / diffusers.

Usage:
    python benchmarks/mmdit_step.py [--dtypes float32 bfloat16] [--backends jax torch tensorflow] [--keras-hub]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

BATCH, LATENT, TOKENS = 2, 64, 154
# diffusers' defaults are not SD3 Medium (18 layers, hidden 1152): spell the real config out.
SD3_MEDIUM_DIFFUSERS = dict(
    sample_size=128, num_layers=24, num_attention_heads=24, attention_head_dim=64,
    caption_projection_dim=1536, joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192,
)
SD3_VAE_DIFFUSERS = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((BATCH, LATENT, LATENT, 16)).astype("float32"),
        rng.standard_normal((BATCH, TOKENS, 4096)).astype("float32"),
        rng.standard_normal((BATCH, 2048)).astype("float32"),
        np.full((BATCH,), 500.0, "float32"),
    )


def seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def timed_pairs(reference, ours, repeats):
    """Alternating timings after a warm-up (and compilation) of each; returns both lists."""
    reference(), ours()
    pairs = [(seconds(reference), seconds(ours)) for _ in range(repeats)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def diffusers_step_function(dtype):
    import torch
    from diffusers import SD3Transformer2DModel

    torch_dtype = getattr(torch, dtype)
    model = SD3Transformer2DModel(**SD3_MEDIUM_DIFFUSERS).to(torch_dtype).eval()
    latents, context, pooled, timestep = (torch.from_numpy(x) for x in inputs())
    latents = latents.permute(0, 3, 1, 2).to(torch_dtype)
    context, pooled = context.to(torch_dtype), pooled.to(torch_dtype)

    def step():
        with torch.no_grad():
            model(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep)

    return step


def keras_step_function(backbone):
    """The compiled forward pass as a user would run it on each backend."""
    import keras

    latents, context, pooled, timestep = inputs()
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def forward(state, *args):
            mapping = zip(backbone.diffuser.variables, state)
            with keras.StatelessScope(state_mapping=mapping):
                return backbone.diffuser(*args)

        state = [v.value for v in backbone.diffuser.variables]
        return lambda: forward(state, latents, context, pooled, timestep).block_until_ready()
    if backend == "tensorflow":
        import tensorflow as tf

        forward = tf.function(backbone.diffuser, jit_compile=True)
        return lambda: forward(latents, context, pooled, timestep).numpy()
    import torch

    def forward():
        with torch.no_grad():
            return backbone.diffuser(latents, context, pooled, timestep).cpu()

    return forward


def keras_hub_step_function(dtype):
    """keras-hub's MMDiT (if installed) at the same shape, jitted the same way."""
    import jax
    import keras
    from keras_hub.src.models.stable_diffusion_3.mmdit import MMDiT

    model = MMDiT(2, 1536, 24, 24, 192, latent_shape=(LATENT, LATENT, 16), context_shape=(TOKENS, 4096), dtype=dtype)
    latents, context, pooled, timestep = inputs()
    feed = {"latent": latents, "context": context, "pooled_projection": pooled, "timestep": timestep[:, None]}

    @jax.jit
    def forward(state, feed):
        with keras.StatelessScope(state_mapping=zip(model.variables, state)):
            return model(feed)

    state = [v.value for v in model.variables]
    return lambda: forward(state, feed).block_until_ready()


def run_worker(implementation, dtype, repeats):
    if implementation == "keras_hub":
        ours = keras_hub_step_function(dtype)
    else:
        from keras_sd3.models import SD3_MEDIUM, SD3_VAE, StableDiffusion3Backbone

        backbone = StableDiffusion3Backbone(SD3_MEDIUM, SD3_VAE, image_shape=(512, 512, 3), dtype=dtype)
        ours = keras_step_function(backbone)
    reference, ours = timed_pairs(diffusers_step_function(dtype), ours, repeats)
    return {"reference": reference, "ours": ours}


def run_keras(backend, dtype, repeats, implementation="keras_sd3"):
    env = dict(os.environ, KERAS_BACKEND=backend)
    command = [sys.executable, __file__, "--worker", implementation, "--dtypes", dtype, "--repeats", str(repeats)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        return None, result.stderr.strip().splitlines()[-1]
    return json.loads(result.stdout.strip().splitlines()[-1]), ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=["jax", "torch", "tensorflow"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keras-hub", action="store_true", help="also time keras-hub's jax MMDiT (needs keras-hub)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.dtypes[0], args.repeats)))
        return
    print("| dtype | implementation | s / CFG step | diffusers s / CFG step, same process | ratio |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        runs = [("keras_sd3", backend) for backend in args.backends]
        for implementation, backend in runs + ([("keras_hub", "jax")] if args.keras_hub else []):
            times, error = run_keras(backend, dtype, args.repeats, implementation)
            name = f"{implementation} {backend}"
            if times is None:
                print(f"| {dtype} | {name} | failed: {error} | | |", flush=True)
                continue
            ours, reference = statistics.median(times["ours"]), statistics.median(times["reference"])
            ratio = statistics.median([a / b for a, b in zip(times["ours"], times["reference"])])
            print(f"| {dtype} | {name} | {ours:.2f} | {reference:.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
