"""`keras-sd3`: text-to-image, image-to-image and inpainting from the command line.

    keras-sd3 generate "a red circle on a blue background" -o circle.png
    keras-sd3 img2img "a green square" --image in.png --strength 0.7 -o out.png
    keras-sd3 inpaint "a yellow triangle" --image in.png --mask mask.png -o out.png
    keras-sd3 serve --port 7860


`--model` takes a preset name, a diffusers folder or a .safetensors file (default: the embedded
`sd3_tiny_shapes`). Images carry their generation parameters in their metadata (.png, .jpg, .webp).
The backend is `--backend`, else the rule of `keras_sd3.keras_backend` (the library's).

Everything that can be checked without the weights is checked first (arguments, files, output,
backend, then the size against the model's configuration); every error is one line on stderr and
exit code 2. Ctrl-C exits with 130 and leaves no partial file.
"""

import argparse
import contextlib
import logging
import os
import re
import secrets
import sys
import warnings

from keras_sd3 import __version__, keras_backend, media
from keras_sd3.errors import UsageError

DEFAULT_MODEL = "sd3_tiny_shapes"
MAX_SEED = 2**32 - 1
DTYPES = ("float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")
SAMPLERS = ("euler", "heun", "dpmpp_2m")  # keras_sd3.sampling.SAMPLERS (this module imports no Keras)
TASKS = {"generate": "text to image", "img2img": "image to image", "inpaint": "inpainting",
         "control": "text to image guided by ControlNets"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `keras-sd3: error: --seed must be ...`, exit 2."""

    def error(self, message):
        message = re.sub(r"^argument (\S+): (must )?", lambda m: f"{m[1]} {m[2]}" if m[2] else f"{m[1]}: ", message)
        self.exit(2, f"keras-sd3: error: {message}\n")


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


def build_parser():
    parser = Parser(prog="keras-sd3", description="Stable Diffusion 3 with Keras 3.")
    parser.add_argument("--version", action="version", version=f"keras-sd3 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,img2img,inpaint,control,serve}")
    for name, help_text in TASKS.items():
        command = commands.add_parser(name, help=help_text, description=f"Stable Diffusion 3: {help_text}.")
        command.add_argument("prompt")
        command.add_argument("--model", default=DEFAULT_MODEL, help="preset, diffusers folder or .safetensors file "
                             "(default: %(default)s)")
        command.add_argument("--steps", type=number(int, 1), help="denoising steps (default: the model's)")
        command.add_argument("--guidance", type=number(float, 0.0, what="a number >= 0"),
                             help="guidance scale, 0 to 1 disables CFG (default: the model's)")
        command.add_argument("--negative", default="", help="negative prompt (default: none)")
        command.add_argument("--seed", type=number(int, 0, MAX_SEED), help="noise seed; image k of --num-images "
                             "uses seed + k (default: random, written to the image)")
        command.add_argument("--size", type=parse_size, help="N or HxW pixels (default: the model's / the image's)")
        command.add_argument("--num-images", type=number(int, 1), default=1, help="(default: %(default)s)")
        command.add_argument("--backend", choices=keras_backend.BACKENDS,
                             help="Keras backend (default: KERAS_BACKEND, else the first installed)")
        command.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
        command.add_argument("-o", "--output", default="image.png", help="output .png, .jpg or .webp; -1, -2, ... "
                             "are added for several images (default: %(default)s)")
        command.add_argument("--lora", type=path_and_scale, action="append", default=[], metavar="PATH[:SCALE]",
                             help="a LoRA .safetensors file (diffusers / PEFT or kohya), scale 1 by default; repeatable")
        command.add_argument("-v", "--verbose", action="store_true", help="show the backends' log messages")
        if name == "control":
            add_control_arguments(command)
        else:
            command.add_argument("--sampler", choices=SAMPLERS, default="euler", help="(default: %(default)s; "
                                 "dpmpp_2m gives good images in fewer steps, heun costs 2 model calls a step)")
            command.add_argument("--shift", type=number(float, 1e-9, what="a number > 0"),
                                 help="the noise schedule's shift (default: 3.0, SD3's)")
            command.add_argument("--cache", nargs="?", const=True, metavar="THRESHOLD",
                                 type=number(float, 0.0, what="a number >= 0"),
                                 help="step caching: reuse most of the network between steps that change it "
                                 "little (faster; THRESHOLD default: keras_sd3.sampling.StepCache's)")
        if name not in ("control", "generate"):
            command.add_argument("--image", required=True, help="input picture")
            command.add_argument("--strength", type=number(float, 0.0, 1.0, "a number in [0, 1]"),
                                 default=0.8 if name == "img2img" else 0.6, help="(default: %(default)s)")
        if name == "inpaint":
            command.add_argument("--mask", required=True, help="mask picture, white = repaint")
            command.add_argument("--keep-unmasked", action=argparse.BooleanOptionalAction, default=True,
                                 help="paste the input back outside the mask (default: %(default)s)")
    add_serve_parser(commands)
    return parser


def add_control_arguments(command):
    """`keras-sd3 control`: one --control-image per --controlnet, in the same order."""
    command.add_argument("--controlnet", type=path_and_scale, action="append", required=True, metavar="PATH[:SCALE]",
                         help="an SD3 / SD3.5 ControlNet (diffusers folder or .safetensors), scale 1 by default")
    command.add_argument("--control-image", action="append", required=True, help="its control map (canny edges, "
                         "depth, ...), resized to the output size")
    command.add_argument("--control-start", type=number(float, 0.0, 1.0, "a number in [0, 1]"), default=0.0,
                         help="fraction of the steps before the ControlNets act (default: %(default)s)")
    command.add_argument("--control-end", type=number(float, 0.0, 1.0, "a number in [0, 1]"), default=1.0,
                         help="fraction of the steps after which they stop (default: %(default)s)")


def add_serve_parser(commands):
    """`keras-sd3 serve`: its own options (no prompt, no output file)."""
    command = commands.add_parser("serve", help="HTTP server and web page", description="Serves the model over "
                                  "HTTP (an API under /api/v1 and a web page at /) with a persistent job queue.")
    command.add_argument("--model", default=DEFAULT_MODEL, help="preset, diffusers folder or .safetensors file "
                         "(default: %(default)s)")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    command.add_argument("--port", type=number(int, 1, 65535), default=7860, help="(default: %(default)s)")
    command.add_argument("--outputs", default="outputs", help="folder of the job database and the images "
                         "(default: %(default)s)")
    command.add_argument("--max-batch", type=number(int, 1), default=4, help="at most this many images per "
                         "model call (default: %(default)s)")
    command.add_argument("--api-key", default=os.environ.get("KERAS_SD3_API_KEY") or None,
                         help="require this key on the API (default: $KERAS_SD3_API_KEY, else none)")
    command.add_argument("--backend", choices=keras_backend.BACKENDS,
                         help="Keras backend (default: KERAS_BACKEND, else the first installed)")
    command.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
    command.add_argument("-v", "--verbose", action="store_true", help="show the backends' log messages")


def picture_size(path, option):
    """(height, width) of a readable picture file, else a UsageError naming `option`."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            picture.load()
            return picture.height, picture.width
    except FileNotFoundError:
        raise UsageError(f"{option} {path!r} does not exist") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {path!r} is not a readable image ({error})") from None


def output_paths(output, count):
    """The files to write: `output`, or `stem-1.ext`, `stem-2.ext`, ... for several images."""
    extension = os.path.splitext(output)[1].lower()
    if extension not in media.IMAGE_EXTENSIONS:
        raise UsageError(f"-o/--output must end in {', '.join(media.IMAGE_EXTENSIONS)}, got {output!r}")
    if count == 1:
        return [output]
    stem = output[: -len(extension)]
    return [f"{stem}-{i + 1}{output[-len(extension):]}" for i in range(count)]


def make_folders(paths):
    """Creates the output folder if missing; returns the folders created (to remove after a failure)."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in paths:
        if os.path.isdir(path):
            raise UsageError(f"-o/--output {path!r} is a folder; give a file name")
    try:
        for created in reversed(missing):
            os.mkdir(created)
    except OSError as error:
        raise UsageError(f"cannot create the output folder {error.filename!r} ({error.strerror})") from None
    if not os.access(os.path.dirname(os.path.abspath(paths[0])), os.W_OK):
        raise UsageError(f"cannot write to the output folder of {paths[0]!r}")
    return missing


def check_arguments(args):
    """Checks files, output and seed (no model needed); returns the output paths."""
    if args.seed is not None and args.seed + args.num_images - 1 > MAX_SEED:
        raise UsageError(f"--seed + --num-images - 1 must be at most {MAX_SEED}, got {args.seed + args.num_images - 1}")
    for path, _ in args.lora:
        if not os.path.isfile(path) or not path.lower().endswith(".safetensors"):
            raise UsageError(f"--lora {path!r} is not a .safetensors file")
    for path, _ in getattr(args, "controlnet", []):
        if not os.path.exists(path):
            raise UsageError(f"--controlnet {path!r} does not exist")
    args.image_option, args.image_size = None, None
    if args.command == "control":
        if len(args.control_image) != len(args.controlnet):
            raise UsageError(f"got {len(args.controlnet)} --controlnet but {len(args.control_image)} --control-image; "
                             "give one control image per ControlNet")
        if args.control_start >= args.control_end:
            raise UsageError(f"--control-start {args.control_start} must be below --control-end {args.control_end}")
        sizes = [picture_size(path, "--control-image") for path in args.control_image]
        args.image_option, args.image_size = ("--control-image", args.control_image[0]), sizes[0]
    elif args.command != "generate":
        args.image_option, args.image_size = ("--image", args.image), picture_size(args.image, "--image")
    if args.command == "inpaint":
        mask_size = picture_size(args.mask, "--mask")
        target = args.size or args.image_size
        if mask_size != target:
            print(f"keras-sd3: note: the mask is {mask_size[1]} x {mask_size[0]} pixels; resized to the image's "
                  f"{target[1]} x {target[0]}", file=sys.stderr)
    return output_paths(args.output, args.num_images)


def check_size(args):
    """The image size (the argument, the input picture's or None for the model's), checked against
    the model's configuration before any weight is read."""
    from keras_sd3.models.backbone import image_size_rule
    from keras_sd3.weights.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(args.model)
    multiple, limit = image_size_rule(checkpoint.mmdit.config, checkpoint.vae.config)
    size = args.size or args.image_size
    if size is not None and any(side % multiple or side > limit for side in size):
        rule = f"{args.model} makes images whose height and width are multiples of {multiple} up to {limit}"
        if args.size:
            raise UsageError(f"--size {size[0]}x{size[1]}: {rule}")
        option, path = args.image_option
        raise UsageError(f"{option} {path!r} is {size[0]}x{size[1]} pixels and {rule}: pass --size")
    return size


def read_picture(path, size, mode):
    """A picture as a float array: RGB in [-1, 1] or a mask in {0, 1}, resized to `size` (H, W) if needed."""
    from PIL import Image

    from keras_sd3.tasks.task import picture_array

    with Image.open(path) as picture:
        picture = picture.convert(mode)
        if picture.size != (size[1], size[0]):
            picture = picture.resize((size[1], size[0]), Image.BICUBIC if mode == "RGB" else Image.NEAREST)
        return picture_array(picture, mode)


def load_task(args, size):
    """The command's task, with its LoRAs loaded."""
    from keras_sd3 import models

    image_shape = None if size is None else (*size, 3)
    if args.command == "control":
        nets = [path for path, _ in args.controlnet]
        task = models.StableDiffusion3ControlNet.from_preset(args.model, nets, image_shape=image_shape, dtype=args.dtype)
    else:
        task_class = {"generate": models.StableDiffusion3TextToImage, "img2img": models.StableDiffusion3ImageToImage,
                      "inpaint": models.StableDiffusion3Inpaint}[args.command]
        task = task_class.from_preset(args.model, image_shape=image_shape, dtype=args.dtype)
    for index, (path, scale) in enumerate(args.lora):
        task.backbone.load_lora(path, scale=scale, name=f"{index + 1}-{os.path.basename(path)}")
    return task


def generate(args, size, paths):
    """Loads the model, generates `--num-images` images (seeds seed, seed + 1, ...) and writes them."""
    import numpy as np

    from keras_sd3 import backend_name
    task = load_task(args, size)
    unknown = task.preprocessor.unknown_words(args.prompt) if task.preprocessor else []
    if unknown:
        warnings.warn(f"{args.model} was trained on captions made of {len(task.preprocessor.vocabulary)} words "
                      f"only; it does not know {', '.join(map(repr, unknown))} (see the README)")
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    noise = np.concatenate([task.noise(1, seed + i) for i in range(args.num_images)])
    num_steps, guidance, _ = task.settings(args.steps, args.guidance, None)
    options = dict(num_steps=num_steps, guidance_scale=guidance, progress=True, num_images=args.num_images)
    inputs = {"prompts": args.prompt, "negative_prompts": args.negative}
    metadata = {"prompt": args.prompt, "negative_prompt": args.negative, "steps": num_steps, "guidance": guidance,
                "model": args.model, "task": args.command, "backend": backend_name()}
    if args.lora:
        metadata["loras"] = [list(lora) for lora in args.lora]
    if args.command != "control":
        from keras_sd3.sampling import StepCache

        step_cache = StepCache() if args.cache is True else args.cache
        options.update(sampler=args.sampler, shift=args.shift, step_cache=step_cache)
        metadata["sampler"] = args.sampler
        if step_cache is not None:
            metadata["step_cache"] = getattr(step_cache, "threshold", step_cache)
        if args.shift is not None:
            metadata["shift"] = args.shift
    if args.command in ("generate", "control"):
        options["latents"] = noise
    if args.command == "control":
        size = task.backbone.image_shape[:2]
        inputs["control_images"] = [read_picture(path, size, "RGB") for path in args.control_image]
        options.update(controlnet_conditioning_scale=[scale for _, scale in args.controlnet],
                       control_guidance_start=args.control_start, control_guidance_end=args.control_end)
        metadata.update(controlnets=[list(net) for net in args.controlnet], control_images=args.control_image,
                        control_start=args.control_start, control_end=args.control_end)
    elif args.command != "generate":
        size = task.backbone.image_shape[:2]
        inputs["images"] = read_picture(args.image, size, "RGB")
        options.update(noise=noise, strength=args.strength)
        metadata["strength"] = args.strength
    if args.command == "inpaint":
        inputs["masks"] = read_picture(args.mask, size, "L")
        options["keep_unmasked"] = metadata["keep_unmasked"] = args.keep_unmasked
    images = np.asarray(task.generate(inputs, **options)).reshape((-1, *task.backbone.image_shape))
    metadata["size"] = list(images.shape[1:3])
    for index, (path, image) in enumerate(zip(paths, images)):
        extra = {"seed": seed + index, **({"image_index": index} if len(paths) > 1 else {})}
        media.save_image(path, image, {**metadata, **extra})
        print(path)


@contextlib.contextmanager
def quiet_backends():
    """Sends what native code writes to stderr (tensorflow's and XLA's C++ log, which ignores
    TF_CPP_MIN_LOG_LEVEL set once Python runs) to /dev/null, while Python's `sys.stderr` keeps the real
    stream; silences absl, jax's platform messages and the libraries' deprecation warnings."""
    for name in ("absl", "jax._src.xla_bridge", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if sys.stderr is not sys.__stderr__:  # already redirected (e.g. captured by a test)
        yield
        return
    sys.stderr.flush()
    saved, devnull, stderr = os.dup(2), os.open(os.devnull, os.O_WRONLY), sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = stderr
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"keras-sd3: warning: {message}", file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    created = []
    with warnings.catch_warnings(), contextlib.nullcontext() if args.verbose else quiet_backends():
        warnings.showwarning = one_line_warning
        try:
            if args.command == "serve":
                from keras_sd3.serve.command import serve

                keras_backend.choose(args.backend)
                serve(args)
                return 0
            paths = check_arguments(args)
            keras_backend.choose(args.backend)
            size = check_size(args)
            created = make_folders(paths)
            generate(args, size, paths)
            return 0
        except KeyboardInterrupt:
            message, code = "interrupted", 130
        except (UsageError, keras_backend.BackendError, ValueError, OSError) as error:
            message, code = f"error: {error}", 2  # CheckpointError and PresetError are ValueErrors
        except FloatingPointError as error:
            message, code = f"error: {error}", 1
    for folder in created:  # the deepest first
        if not os.listdir(folder):
            os.rmdir(folder)
    print(f"\nkeras-sd3: {message}" if code == 130 else f"keras-sd3: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
