"""Scores the embedded `sd3_tiny_shapes` model (and the same architecture untrained) on 48 fixed prompts.

    KERAS_BACKEND=torch python benchmarks/evaluate_shapes.py [--count 48] [--steps 20] [--guidance 4]
        [--sampler euler|heun|dpmpp_2m] [--grid benchmarks/results/shapes_grid.png]

Colour accuracy: shape colour and background colour both right; shape accuracy: circle / square /
triangle right (keras_sd3.training.evaluate). Results go to BENCHMARKS.md.
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

from keras_sd3 import media  # noqa: E402
from keras_sd3.models import StableDiffusion3Backbone, StableDiffusion3TextToImage  # noqa: E402
from keras_sd3.training import evaluate  # noqa: E402


def untrained_like(task):
    """The same architecture and tokenizers with fresh random weights."""
    keras.utils.set_random_seed(0)
    b = task.backbone
    backbone = StableDiffusion3Backbone(b.mmdit_config, b.vae_config, b.text_configs["clip_l"], b.text_configs["clip_g"],
                                        None, image_shape=b.image_shape, t5_zero_tokens=b.t5_zero_tokens)
    return StableDiffusion3TextToImage(backbone, task.preprocessor, task.defaults)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd3_tiny_shapes")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--grid", default=None, help="write the generated images as a PNG grid")
    parser.add_argument("--skip-untrained", action="store_true")
    args = parser.parse_args()
    task = StableDiffusion3TextToImage.from_preset(args.model)
    steps, guidance, _ = task.settings(args.steps, args.guidance, None)
    rows = []
    for name, model in [("trained", task)] + ([] if args.skip_untrained else [("untrained", untrained_like(task))]):
        start = time.perf_counter()
        images, result = evaluate.evaluate(model, args.count, steps, guidance, sampler=args.sampler)
        seconds = time.perf_counter() - start
        rows.append(dict(model=name, sampler=args.sampler, steps=steps, guidance=guidance, count=result["count"],
                         color_accuracy=result["color_accuracy"], shape_accuracy=result["shape_accuracy"],
                         seconds=round(seconds, 1)))
        print(json.dumps(rows[-1]), flush=True)
        if args.grid and name == "trained":
            prompts = [p for p, _ in evaluate.evaluation_prompts(args.count)]
            media.save_grid(args.grid, images, columns=8, metadata={"prompts": prompts, "steps": steps,
                                                                     "guidance": guidance, "model": args.model})


if __name__ == "__main__":
    main()
