"""End-to-end text-to-image seconds per image: keras_sd3 vs diffusers' StableDiffusion3Pipeline.

Two models: the tests' tiny random SD3 (64 x 64 px, CLIP-L / CLIP-G / T5, prompts in, uint8 images
out, a different prompt at every call), and the SD3-Medium shape (random MMDiT + VAE, 512 x 512,
precomputed random embeddings of the real shapes as input, since the real text encoders are 11 GB).
Each backend runs in its own process that also holds the diffusers pipeline; after a warm-up
(compilation) the two are timed alternately with the same initial latents and prompts. Prints medians
and the median per-pair ratio.

Usage:
    python benchmarks/generate.py [--models tiny sd3m] [--backends jax torch tensorflow] [--steps 8]
        [--repeats 7]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from mmdit_step import SD3_MEDIUM_DIFFUSERS, SD3_VAE_DIFFUSERS, timed_pairs  # noqa: E402


PROMPTS = [f"a {size} {color} {shape} on a {background} background" for size in ("small", "large")
           for color in ("red", "green", "blue") for shape in ("circle", "square", "triangle")
           for background in ("white", "black")]


def tiny(folder):
    from tiny_text import build_pipeline

    from keras_sd3.models import StableDiffusion3TextToImage

    pipe = build_pipeline(folder, with_t5=True)
    task = StableDiffusion3TextToImage.from_preset(folder, image_shape=(64, 64, 3))
    return pipe, task, (64, 64), dict(prompt="a red circle on a blue background"), {}


def sd3_medium(dtype):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from keras_sd3.models import SD3_MEDIUM, SD3_VAE, StableDiffusion3Backbone, StableDiffusion3TextToImage
    from keras_sd3.weights import load_layer_weights
    from keras_sd3.weights.safetensors_file import TensorSource

    torch_dtype = getattr(torch, dtype)
    transformer = SD3Transformer2DModel(**SD3_MEDIUM_DIFFUSERS).to(torch_dtype).eval()
    vae = AutoencoderKL(**SD3_VAE_DIFFUSERS).to(torch_dtype).eval()
    no_text = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, **no_text)
    backbone = StableDiffusion3Backbone(SD3_MEDIUM, SD3_VAE, image_shape=(512, 512, 3), dtype=dtype)
    for layer, model in ((backbone.diffuser, transformer), (backbone.vae, vae)):  # the same weights
        state = {k: v.float().numpy() for k, v in model.state_dict().items()}
        load_layer_weights(layer, TensorSource({k: v.shape for k, v in state.items()},
                                               {k: (lambda v=v: v) for k, v in state.items()}))
    rng = np.random.default_rng(0)
    embeds = [rng.standard_normal(s).astype("float32") for s in ((1, 154, 4096), (1, 154, 4096), (1, 2048), (1, 2048))]
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    reference = {n: torch.from_numpy(e).to(torch_dtype) for n, e in zip(names, embeds)}
    return pipe, StableDiffusion3TextToImage(backbone), (512, 512), reference, {"embeddings": tuple(embeds)}


def worker(model, dtype, steps, repeats):
    import torch

    with tempfile.TemporaryDirectory() as folder:
        pipe, task, (h, w), reference_inputs, our_inputs = tiny(folder) if model == "tiny" else sd3_medium(dtype)
        pipe.set_progress_bar_config(disable=True)
        latents = np.random.default_rng(1).standard_normal((1, h // 8, w // 8, 16)).astype("float32")
        torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(pipe.transformer.dtype)

        has_prompt, calls = "prompt" in reference_inputs, {"reference": 0, "ours": 0}

        def prompt(side):  # a new prompt at every call, the same for both sides of a pair
            calls[side] += 1
            return PROMPTS[calls[side] % len(PROMPTS)] if has_prompt else None

        def reference():
            inputs = dict(reference_inputs, **({"prompt": prompt("reference")} if has_prompt else {}))
            with torch.no_grad():
                pipe(**inputs, num_inference_steps=steps, guidance_scale=7.0, height=h, width=w,
                     latents=torch_latents, output_type="np")

        def ours():
            return task.generate(prompt("ours"), num_steps=steps, guidance_scale=7.0, latents=latents, **our_inputs)

        reference_times, our_times = timed_pairs(reference, ours, repeats)
    return {"reference": reference_times, "ours": our_times}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd3m"])
    parser.add_argument("--backends", nargs="+", default=["jax", "torch", "tensorflow"])
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the SD3-Medium-shape run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.steps, args.repeats)))
        return
    print("| model | backend | keras_sd3 s / image | diffusers s / image, same process | ratio |")
    print("|---|---|---|---|---|")
    for model in args.models:
        for backend in args.backends:
            command = [sys.executable, __file__, "--worker", model, "--dtype", args.dtype,
                       "--steps", str(args.steps), "--repeats", str(args.repeats)]
            result = subprocess.run(command, env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True, text=True)
            if result.returncode:
                print(f"| {model} | {backend} | failed: {result.stderr.strip().splitlines()[-1]} | | |", flush=True)
                continue
            times = json.loads(result.stdout.strip().splitlines()[-1])
            ours, reference = statistics.median(times["ours"]), statistics.median(times["reference"])
            ratio = statistics.median([a / b for a, b in zip(times["ours"], times["reference"])])
            print(f"| {model} | {backend} | {ours:.2f} | {reference:.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
