"""`keras-sd3`: text-to-image, image-to-image and inpainting from the command line.

    keras-sd3 generate "a red circle on a blue background" -o circle.png
    keras-sd3 img2img "a green square" --image in.png --strength 0.7 -o out.png
    keras-sd3 inpaint "a yellow triangle" --image in.png --mask mask.png -o out.png

`--model` takes a preset name, a diffusers folder or a .safetensors file (default: the embedded
`sd3_tiny_shapes`). PNGs carry their generation parameters in their metadata. Without `--backend`
or `KERAS_BACKEND`, the first installed of torch, jax, tensorflow is used (torch starts fastest for
one-off runs on CPU, see BENCHMARKS.md).
"""

import argparse
import importlib.util
import os
import secrets
import sys

BACKENDS = ("torch", "jax", "tensorflow")
DEFAULT_MODEL = "sd3_tiny_shapes"


def parse_size(text):
    """"512" or "768x512" (height x width) -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW in pixels, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 16 or any(p % 16 for p in parts):
        raise argparse.ArgumentTypeError(f"size must be N or HxW with multiples of 16 (>= 16), got {text!r}")
    return (parts[0], parts[-1])


def strength(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"strength must be in [0, 1], got {text}")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-sd3", description="Stable Diffusion 3 with Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "text to image"), ("img2img", "image to image"), ("inpaint", "inpainting")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("prompt")
        command.add_argument("--model", default=DEFAULT_MODEL, help="preset, diffusers folder or .safetensors file")
        command.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's)")
        command.add_argument("--guidance", type=float, help="guidance scale, <= 1 disables CFG (default: the model's)")
        command.add_argument("--negative", default="", help="negative prompt")
        command.add_argument("--seed", type=int, help="noise seed (default: random, written to the PNG)")
        command.add_argument("--size", type=parse_size, help="N or HxW pixels (default: the model's / the image's)")
        command.add_argument("--num-images", type=positive_int, default=1)
        command.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: KERAS_BACKEND or installed)")
        command.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default float32)")
        command.add_argument("-o", "--output", default="image.png", help="output PNG (-1, -2, ... added for several)")
        if name != "generate":
            command.add_argument("--image", required=True, help="input picture")
            command.add_argument("--strength", type=strength, default=0.8 if name == "img2img" else 0.6)
        if name == "inpaint":
            command.add_argument("--mask", required=True, help="mask picture, white = repaint")
    return parser


def choose_backend(requested):
    """Sets KERAS_BACKEND (before keras is imported): the requested one, the environment's, or the first installed."""
    backend = requested or os.environ.get("KERAS_BACKEND")
    if backend is None:
        backend = next((b for b in BACKENDS if importlib.util.find_spec(b) is not None), None)
        if backend is None:
            raise SystemExit("keras-sd3: error: no Keras backend installed: pip install torch (or jax, tensorflow)")
    os.environ["KERAS_BACKEND"] = backend
    return backend


def read_picture(path, size, mode):
    """A picture as a float array: RGB in [-1, 1] or a mask in {0, 1}; resized to `size` (H, W) if given."""
    import numpy as np
    from PIL import Image

    from keras_sd3.tasks.task import from_uint8

    with Image.open(path) as picture:
        picture = picture.convert(mode)
        if size is not None and picture.size != (size[1], size[0]):
            picture = picture.resize((size[1], size[0]), Image.BICUBIC if mode == "RGB" else Image.NEAREST)
        array = np.asarray(picture, np.float32)
    return from_uint8(array) if mode == "RGB" else (array >= 128).astype(np.float32)


def run(args):
    import numpy as np

    from keras_sd3 import media
    from keras_sd3.models import StableDiffusion3ImageToImage, StableDiffusion3Inpaint, StableDiffusion3TextToImage

    size = args.size
    inputs = {"prompts": args.prompt, "negative_prompts": args.negative}
    if args.command != "generate":
        inputs["images"] = read_picture(args.image, size, "RGB")
        size = size or inputs["images"].shape[:2]
        if args.command == "inpaint":
            inputs["masks"] = read_picture(args.mask, size, "L")
    task_class = {"generate": StableDiffusion3TextToImage, "img2img": StableDiffusion3ImageToImage,
                  "inpaint": StableDiffusion3Inpaint}[args.command]
    task = task_class.from_preset(args.model, image_shape=None if size is None else (*size, 3), dtype=args.dtype)
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    num_steps, guidance, _ = task.settings(args.steps, args.guidance, None)
    options = dict(num_steps=num_steps, guidance_scale=guidance, seed=seed, num_images=args.num_images, progress=True)
    if args.command != "generate":
        options["strength"] = args.strength
    images = np.asarray(task.generate(inputs, **options))
    images = images.reshape((-1, *images.shape[-3:]))
    metadata = {"prompt": args.prompt, "negative_prompt": args.negative, "seed": seed, "steps": num_steps,
                "guidance": guidance, "model": args.model, "size": list(images.shape[1:3]), "task": args.command,
                "backend": os.environ["KERAS_BACKEND"]}
    if args.command != "generate":
        metadata["strength"] = args.strength
    stem, extension = os.path.splitext(args.output)
    paths = [args.output] if len(images) == 1 else [f"{stem}-{i + 1}{extension or '.png'}" for i in range(len(images))]
    for index, (path, image) in enumerate(zip(paths, images)):
        media.save_png(path, image, dict(metadata, image_index=index) if len(images) > 1 else metadata)
        print(path)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".png"):
        parser.error(f"the output must be a .png file, got {args.output!r}")
    for name in ("image", "mask"):
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{name} {path!r} does not exist")
    choose_backend(args.backend)
    try:
        run(args)
    except (ValueError, OSError) as error:  # CheckpointError and PresetError are ValueErrors
        print(f"keras-sd3: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
