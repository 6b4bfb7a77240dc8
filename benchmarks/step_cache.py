"""Step caching on the embedded model: how much it skips, how much faster, how much the images change.

The 48 evaluation prompts of `benchmarks/evaluate_shapes.py` at the model's defaults (20 steps,
guidance 4), batches of 8, seeds as there. For each threshold: the fraction of MMDiT passes reused,
the wall time of all 48 images with and without the cache (timed alternately, --repeats pairs, ratio
of medians), colour / shape adherence (`keras_sd3.training.evaluate`) and the mean PSNR of the cached
images to the uncached ones. `--model` / `--steps` / `--size` give the SD3-Medium-shape run (random
weights and embeddings: speed and skips only).

Usage:
    KERAS_BACKEND=jax python benchmarks/step_cache.py [--thresholds 0.05 0.1 0.15 0.2 0.3] [--repeats 3] [--batch 8]
    KERAS_BACKEND=jax python benchmarks/step_cache.py --sd3-medium --steps 28 --size 512 --thresholds 0.1 0.15
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sd3.models import StableDiffusion3TextToImage  # noqa: E402
from keras_sd3.training import evaluate  # noqa: E402


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def embedded(args):
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    steps, guidance, _ = task.settings(None, None, None)
    items, size = evaluate.evaluation_prompts(48), args.batch
    batches = [items[i:i + size] for i in range(0, 48, size)]

    def run(step_cache):
        images, skipped = [], 0
        for start, chunk in zip(range(0, 48, size), batches):
            noise = np.concatenate([task.noise(1, start + i) for i in range(len(chunk))])
            images.append(task.generate([p for p, _ in chunk], num_steps=steps, guidance_scale=guidance,
                                        latents=noise, step_cache=step_cache))
            skipped += task.step_cache_skipped
        return np.concatenate(images), skipped / (steps * len(batches))

    expected = [e for _, e in items]
    return run, expected, f"embedded sd3_tiny_shapes, 48 prompts in batches of {size}, {steps} steps, guidance {guidance}"


def sd3_medium(args):
    from keras_sd3.models import SD3_MEDIUM, SD3_VAE, StableDiffusion3Backbone

    backbone = StableDiffusion3Backbone(SD3_MEDIUM, SD3_VAE, image_shape=(args.size, args.size, 3), dtype="bfloat16")
    task = StableDiffusion3TextToImage(backbone)
    rng = np.random.default_rng(0)
    embeddings = tuple(rng.standard_normal(s).astype("float32")
                       for s in ((1, 154, 4096), (1, 154, 4096), (1, 2048), (1, 2048)))

    def run(step_cache):
        images = task.generate(None, num_steps=args.steps, guidance_scale=7.0, seed=0, embeddings=embeddings,
                               step_cache=step_cache)
        return images[None], task.step_cache_skipped / args.steps

    return run, None, f"SD3-Medium shape, random weights, bfloat16, {args.size}^2, {args.steps} steps, CFG"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate() call (embedded model)")
    parser.add_argument("--sd3-medium", action="store_true")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    run, expected, what = (sd3_medium if args.sd3_medium else embedded)(args)
    print(f"backend {keras.config.backend()}; {what}; medians of {args.repeats} alternating pairs")
    baseline, _ = run(None)  # warm-up (compilation) of both programs
    run(args.thresholds[0])
    if expected is not None:
        scores = evaluate.score(baseline, expected)
        print(f"uncached: colour {scores['color_accuracy'] * 48:.0f}/48, shape {scores['shape_accuracy'] * 48:.0f}/48")
    print("| threshold | passes reused | s uncached | s cached | speed-up | colour | shape | PSNR to uncached dB |")
    print("|---|---|---|---|---|---|---|---|")
    for threshold in args.thresholds:
        pairs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(None)
            middle = time.perf_counter()
            images, reused = run(threshold)
            pairs.append((middle - start, time.perf_counter() - middle))
        uncached, cached = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        ratio = statistics.median(a / b for a, b in pairs)
        adherence = ["", ""]
        if expected is not None:
            scores = evaluate.score(images, expected)
            adherence = [f"{scores['color_accuracy'] * 48:.0f}/48", f"{scores['shape_accuracy'] * 48:.0f}/48"]
        print(f"| {threshold:g} | {reused:.0%} | {uncached:.2f} | {cached:.2f} | {ratio:.2f}x | {adherence[0]} | "
              f"{adherence[1]} | {psnr(images, baseline):.1f} |", flush=True)


if __name__ == "__main__":
    main()
