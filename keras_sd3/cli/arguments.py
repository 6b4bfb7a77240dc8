"""What the commands of `keras-sd3` share: constants and argparse types (no Keras import here)."""

import argparse
import os

from keras_sd3 import keras_backend

DEFAULT_MODEL = "sd3_tiny_shapes"
MAX_SEED = 2**32 - 1
DTYPES = ("float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")
SAMPLERS = ("euler", "heun", "dpmpp_2m")  # keras_sd3.sampling.SAMPLERS (this module imports no Keras)
TASKS = {"generate": "text to image", "img2img": "image to image", "inpaint": "inpainting",
         "control": "text to image guided by ControlNets"}


def number(kind, low, high=None, what=None):
    """An argparse type: a `kind` (int / float) in [low, high], with a message naming the rule."""
    what = what or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or not low <= value <= (float("inf") if high is None else high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def path_and_scale(text):
    """"PATH" or "PATH:SCALE" -> (path, scale); the scale defaults to 1 (a path may contain ':')."""
    path, _, tail = text.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0
    if not path or scale != scale or abs(scale) == float("inf"):
        raise argparse.ArgumentTypeError(f"must be PATH or PATH:SCALE with a finite SCALE, got {text!r}")
    return path, scale


def parse_size(text):
    """"512" or "768x512" (height x width) -> (height, width); the model's rule is checked later."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be N or HxW in pixels (e.g. 512 or 768x512), got {text!r}")
    return (int(parts[0]), int(parts[-1]))


def mesh(text):
    from keras_sd3.distribution import parse_mesh

    try:
        parse_mesh(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_mesh_argument(command):
    command.add_argument("--mesh", type=mesh, metavar="BxM", help="spread over B x M devices (jax): B groups of "
                         "images at a time, the model split over M devices, e.g. 1x8 or 8x1 (default: one device)")


QUANTIZE_MODES, QUANTIZE_PARTS = ("int8", "int4"), ("mmdit", "clip_l", "clip_g", "t5")  # as keras_sd3.quantization


def quantize_mode(text):
    """"int8", "int4" or "mmdit=int4,t5=int8" -> the `quantize=` argument of `from_preset`."""
    if text in QUANTIZE_MODES:
        return text
    modes = {}
    for item in text.split(","):
        part, _, mode = item.partition("=")
        if part.strip() not in QUANTIZE_PARTS or mode.strip() not in QUANTIZE_MODES:
            raise argparse.ArgumentTypeError(
                f"must be {' or '.join(QUANTIZE_MODES)}, or PART=MODE pairs joined by commas with PART one of "
                f"{', '.join(QUANTIZE_PARTS)} (e.g. mmdit=int4,t5=int8); got {text!r}")
        modes[part.strip()] = mode.strip()
    return modes


def add_model_arguments(command):
    """`--model`, `--backend`, `--dtype`, `--quantize`, `--transformer`, `--t5`, `--vae-tiling` and `--text-encoders-on-cpu`: which model every
    command loads, and how (`load_options`)."""
    command.add_argument("--model", default=DEFAULT_MODEL, help="preset, diffusers folder or .safetensors file "
                         "(default: %(default)s)")
    command.add_argument("--backend", choices=keras_backend.BACKENDS,
                         help="Keras backend (default: KERAS_BACKEND, else the first installed)")
    command.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
    command.add_argument("--quantize", type=quantize_mode, metavar="MODE", help="int8 or int4 weights for the MMDiT "
                         "and text encoders (Keras quantization, weight-only), or PART=MODE,... with parts mmdit, "
                         "clip_l, clip_g, t5 (default: the float dtype)")
    command.add_argument("--transformer", type=weights_file, metavar="PATH", help="the MMDiT from this .gguf "
                         "(city96's Q8_0, Q4_0, ...) or .safetensors file (e.g. ComfyUI's fp8), the rest from --model")
    command.add_argument("--t5", type=weights_file, metavar="PATH", help="the T5-XXL encoder from this .gguf or "
                         ".safetensors file (e.g. t5xxl_fp8_e4m3fn.safetensors)")
    command.add_argument("--vae-tiling", type=tile_size, nargs="?", const=512, metavar="SIZE",
                         help="encode and decode pictures larger than SIZE pixels (default 512) on overlapping tiles, "
                         "as diffusers' vae.enable_tiling(): big pictures in small memory")
    command.add_argument("--text-encoders-on-cpu", action="store_true", help="keep CLIP-L, CLIP-G and T5 on the "
                         "host CPU, the MMDiT and the VAE on the accelerator (only the embeddings cross over)")


def weights_file(text):
    """A `--transformer` / `--t5` path: an existing .gguf or .safetensors file."""
    if not text.lower().endswith((".gguf", ".safetensors")):
        raise argparse.ArgumentTypeError(f"must be a .gguf or .safetensors file, got {text!r}")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def tile_size(text):
    """A `--vae-tiling` size: a positive multiple of 8 pixels."""
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 8 or size % 8:
        raise argparse.ArgumentTypeError(f"must be a tile size in pixels, a positive multiple of 8 (e.g. 512), got {text!r}")
    return size


def load_options(args):
    """The `from_preset` keyword arguments of `add_model_arguments`' options."""
    return dict(dtype=args.dtype, quantize=args.quantize, transformer=args.transformer, t5=args.t5,
                vae_tiling=args.vae_tiling, text_encoders_device="cpu" if args.text_encoders_on_cpu else None)
