"""Scores the embedded `sd3_tiny_shapes` model (and the same architecture untrained) on 48 fixed prompts.

    KERAS_BACKEND=torch python benchmarks/evaluate_shapes.py [--count 48] [--steps 20] [--guidance 4]
        [--sampler euler|heun|dpmpp_2m] [--grid benchmarks/results/shapes_grid.png]
    KERAS_BACKEND=torch python benchmarks/evaluate_shapes.py --skip-untrained --weights int8 int4 Q8_0 Q4_0 fp8

Colour accuracy: shape colour and background colour both right; shape accuracy: circle / square /
triangle right (keras_sd3.training.evaluate). Results go to BENCHMARKS.md.

`--weights`: the same prompts and noise with the model's weights in another form, scored and compared
to the float images (PSNR over all 48, uint8): int8 / int4 by `from_preset(quantize=)` (MMDiT and
text encoders), Q8_0 / Q4_0 the MMDiT from a GGUF file `keras-sd3 convert` writes, fp8 the MMDiT from
a ComfyUI-style `*_fp8_scaled` file written here (the blocks' matrices in float8_e4m3fn with a per-layer
scale max|W| / 448; embedders and the output layer as they are).
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sd3 import media  # noqa: E402
from keras_sd3.models import StableDiffusion3Backbone, StableDiffusion3TextToImage  # noqa: E402
from keras_sd3.training import evaluate  # noqa: E402

WEIGHTS = ("int8", "int4", "Q8_0", "Q4_0", "fp8")


def untrained_like(task):
    """The same architecture and tokenizers with fresh random weights."""
    keras.utils.set_random_seed(0)
    b = task.backbone
    backbone = StableDiffusion3Backbone(b.mmdit_config, b.vae_config, b.text_configs["clip_l"], b.text_configs["clip_g"],
                                        None, image_shape=b.image_shape, t5_zero_tokens=b.t5_zero_tokens)
    return StableDiffusion3TextToImage(backbone, task.preprocessor, task.defaults)


def write_fp8_scaled(source, path):
    """The MMDiT of `source` as ComfyUI's `*_fp8_scaled` single file of the MMDiT alone."""
    import torch
    from safetensors.torch import save_file

    from keras_sd3.weights import original_keys
    from keras_sd3.weights.checkpoint import open_checkpoint

    mmdit = open_checkpoint(source).mmdit
    tensors = original_keys.to_original_mmdit(mmdit.tensors, mmdit.config)
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name in tensors.keys():
        value = torch.from_numpy(np.asarray(tensors.read(name), np.float32))
        if name.startswith("joint_blocks.") and name.endswith(".weight") and value.ndim == 2:
            scale = float(value.abs().max()) / 448.0 or 1.0
            out[name] = (value / scale).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "scale_weight"] = torch.tensor(scale, dtype=torch.float32)
        else:
            out[name] = value
    save_file(out, path)
    return path


def load_with_weights(model, weights, folder):
    """The task with its weights in `weights` (one of WEIGHTS)."""
    if weights in ("int8", "int4"):
        return StableDiffusion3TextToImage.from_preset(model, quantize=weights)
    if weights == "fp8":
        path = write_fp8_scaled(model, os.path.join(folder, "mmdit_fp8_scaled.safetensors"))
    else:
        from keras_sd3.quantization.convert import convert_to_gguf

        path = convert_to_gguf(model, os.path.join(folder, f"mmdit_{weights}.gguf"), weights)
    return StableDiffusion3TextToImage.from_preset(model, transformer=path)


def psnr(images, reference):
    error = np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sd3_tiny_shapes")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--grid", default=None, help="write the generated images as a PNG grid")
    parser.add_argument("--skip-untrained", action="store_true")
    parser.add_argument("--weights", nargs="+", default=[], choices=WEIGHTS,
                        help="also score the trained model with its weights in these forms")
    args = parser.parse_args()
    task = StableDiffusion3TextToImage.from_preset(args.model)
    steps, guidance, _ = task.settings(args.steps, args.guidance, None)
    models = [("trained", lambda: task)] + ([] if args.skip_untrained else [("untrained", lambda: untrained_like(task))])
    scratch = tempfile.TemporaryDirectory()
    models += [(f"trained, {w}", lambda w=w: load_with_weights(args.model, w, scratch.name)) for w in args.weights]
    rows, reference = [], None
    for name, load in models:
        model = load()
        start = time.perf_counter()
        images, result = evaluate.evaluate(model, args.count, steps, guidance, sampler=args.sampler)
        seconds = time.perf_counter() - start
        reference = images if name == "trained" else reference
        rows.append(dict(model=name, sampler=args.sampler, steps=steps, guidance=guidance, count=result["count"],
                         color_accuracy=result["color_accuracy"], shape_accuracy=result["shape_accuracy"],
                         seconds=round(seconds, 1)))
        if name.startswith("trained, "):
            rows[-1]["psnr_to_float_db"] = round(psnr(images, reference), 2)
        print(json.dumps(rows[-1]), flush=True)
        if args.grid and name == "trained":
            prompts = [p for p, _ in evaluate.evaluation_prompts(args.count)]
            media.save_grid(args.grid, images, columns=8, metadata={"prompts": prompts, "steps": steps,
                                                                     "guidance": guidance, "model": args.model})


if __name__ == "__main__":
    main()
