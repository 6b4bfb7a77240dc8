"""`keras-sd3`: text-to-image, image-to-image and inpainting from the command line.

    keras-sd3 generate "a red circle on a blue background" -o circle.png
    keras-sd3 img2img "a green square" --image in.png --strength 0.7 -o out.png
    keras-sd3 inpaint "a yellow triangle" --image in.png --mask mask.png -o out.png
    keras-sd3 walk "a red circle on a blue background" --frames 16 -o walk.gif
    keras-sd3 serve --port 7860
    keras-sd3 convert path/to/sd3-folder -o sd3-Q8_0.gguf --type Q8_0


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
import sys
import warnings

from keras_sd3 import __version__, keras_backend
from keras_sd3.cli.arguments import (
    MAX_SEED, SAMPLERS, add_mesh_argument, add_model_arguments, number, parse_size, path_and_scale,
)
from keras_sd3.cli.generate import check_arguments, check_size, generate, make_folders, use_mesh
from keras_sd3.errors import UsageError

TASKS = {"generate": "text to image", "img2img": "image to image", "inpaint": "inpainting",
         "control": "text to image guided by ControlNets"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `keras-sd3: error: --seed must be ...`, exit 2."""

    def error(self, message):
        message = re.sub(r"^argument (\S+): (must )?", lambda m: f"{m[1]} {m[2]}" if m[2] else f"{m[1]}: ", message)
        self.exit(2, f"keras-sd3: error: {message}\n")


def build_parser():
    parser = Parser(prog="keras-sd3", description="Stable Diffusion 3 with Keras 3.")
    parser.add_argument("--version", action="version", version=f"keras-sd3 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,img2img,inpaint,control,walk,serve,convert}")
    for name, help_text in TASKS.items():
        command = commands.add_parser(name, help=help_text, description=f"Stable Diffusion 3: {help_text}.")
        command.add_argument("prompt")
        add_model_arguments(command)
        command.add_argument("--steps", type=number(int, 1), help="denoising steps (default: the model's)")
        command.add_argument("--guidance", type=number(float, 0.0, what="a number >= 0"),
                             help="guidance scale, 0 to 1 disables CFG (default: the model's)")
        command.add_argument("--negative", default="", help="negative prompt (default: none)")
        command.add_argument("--seed", type=number(int, 0, MAX_SEED), help="noise seed; image k of --num-images "
                             "uses seed + k (default: random, written to the image)")
        command.add_argument("--size", type=parse_size, help="N or HxW pixels (default: the model's / the image's)")
        command.add_argument("--num-images", type=number(int, 1), default=1, help="(default: %(default)s)")
        command.add_argument("-o", "--output", default="image.png", help="output .png, .jpg or .webp; -1, -2, ... "
                             "are added for several images (default: %(default)s)")
        command.add_argument("--lora", type=path_and_scale, action="append", default=[], metavar="PATH[:SCALE]",
                             help="a LoRA .safetensors file (diffusers / PEFT or kohya), scale 1 by default; repeatable")
        add_mesh_argument(command)
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
    from keras_sd3.cli.convert import add_convert_parser
    from keras_sd3.cli.walk import add_walk_parser
    from keras_sd3.serve.command import add_serve_parser

    add_walk_parser(commands)
    add_serve_parser(commands)
    add_convert_parser(commands)
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
            if args.command == "convert":
                from keras_sd3.cli.convert import convert

                convert(args)
                return 0
            if args.command == "walk":
                from keras_sd3.cli.walk import check_walk, walk

                kind = check_walk(args)
                keras_backend.choose(args.backend)
                created = make_folders([args.output])
                walk(args, kind)
                return 0
            paths = check_arguments(args)
            keras_backend.choose(args.backend)
            size = check_size(args)
            use_mesh(args.mesh)
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


