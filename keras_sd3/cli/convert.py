"""`keras-sd3 convert`: a checkpoint's MMDiT as a GGUF file for ComfyUI-GGUF and diffusers.

    keras-sd3 convert path/to/stable-diffusion-3.5-large -o sd3.5_large-Q8_0.gguf
    keras-sd3 convert sd3.5_medium.safetensors -o sd3.5_medium-Q4_0.gguf --type Q4_0
"""

import sys

from keras_sd3.errors import UsageError

TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16")  # keras_sd3.quantization.convert.FILE_TYPES


def add_convert_parser(commands):
    command = commands.add_parser("convert", help="write the MMDiT as a GGUF file", description="Writes the "
                                  "MMDiT (diffusion transformer) of a checkpoint as a GGUF file in city96's layout, "
                                  "which ComfyUI-GGUF and diffusers load.")
    command.add_argument("source", help="preset, diffusers folder, .safetensors file or KerasHub preset")
    command.add_argument("-o", "--output", required=True, help="the .gguf file to write (its folder must exist)")
    command.add_argument("--type", type=str.upper, choices=TYPES, default="Q8_0", help="ggml type of the large "
                         "matrices; embedders, output layer and small tensors stay float (default: %(default)s)")
    command.add_argument("-v", "--verbose", action="store_true", help="show the backends' log messages")


def convert(args):
    """Writes `args.output` from `args.source` and prints its path; a progress line on a terminal."""
    try:
        from keras_sd3.quantization.convert import convert_to_gguf
    except ImportError as error:
        raise UsageError(f"convert needs gguf ({error}): pip install 'keras_sd3[gguf]'") from None
    shown = []

    def progress(done, total):
        shown.append(done)
        sys.stderr.write(f"\rtensor {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()

    try:
        convert_to_gguf(args.source, args.output, args.type, progress=progress if sys.stderr.isatty() else None)
    except Exception:
        if shown:
            sys.stderr.write("\n")  # the error's line after the progress line, not on it
        raise
    print(args.output)
