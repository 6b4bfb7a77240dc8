"""One CFG step of the MMDiT at the SD3-Medium shape with quantized or stored weights, against bfloat16.

The shape of `mmdit_step.py` (24 layers, hidden 1536, 512 x 512, 154 context tokens, batch 2). Each
mode runs in its own process on one backend: a bfloat16 MMDiT with random weights, a float32 copy of
the same weights (the reference for the error; dropped after one pass) and a copy with the mode's
weights on the layers `backbone.quantize` quantizes (the MMDiT's large matrix products):

- int8 / int4: `backbone.quantize(mode)` (Keras' weight-only modes);
- Q8_0 / Q4_0: each weight quantised by `gguf.quants.quantize` and kept in its GGUF blocks, as loading
  city96's files does (`keras_sd3.quantization.stored`);
- fp8: float8_e4m3fn with a per-layer scale max|W| / 448, as ComfyUI's `*_fp8_scaled` files.

Error: the CFG velocity `v_neg + 5 (v_pos - v_neg)` of both models against float32's, largest
difference over largest value (`rel max`) and root-mean-square difference over root-mean-square value
(`rel rms`), for the bfloat16 model and the mode's. Time: after a warm-up (and compilation) of each,
bfloat16 and the mode are timed alternately; the medians and the median of the per-pair ratios.

Usage:
    python benchmarks/quantized_step.py [--backends torch jax] [--modes int8 int4 Q8_0 Q4_0 fp8] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from mmdit_step import keras_step_function, seconds

MODES = ("int8", "int4", "Q8_0", "Q4_0", "fp8")
GUIDANCE = 5.0


def _backbone(dtype):
    from keras_sd3.models import SD3_MEDIUM, SD3_VAE, StableDiffusion3Backbone

    return StableDiffusion3Backbone(SD3_MEDIUM, SD3_VAE, image_shape=(512, 512, 3), dtype=dtype)


def _copy(source, dtype):
    target = _backbone(dtype)
    for ours, theirs in zip(target.diffuser.variables, source.diffuser.variables):
        ours.assign(np.asarray(theirs.numpy(), np.float32))
    return target


def _store(backbone, mode):
    """Keeps the MMDiT's large matrices in GGUF blocks (Q8_0, Q4_0) or scaled float8 (fp8)."""
    import gguf
    import ml_dtypes

    from keras_sd3 import quantization
    from keras_sd3.quantization.stored import store_linear
    from keras_sd3.weights.forms import Float8, GGUFBlocks

    for layer in quantization.selected_layers(backbone, "mmdit"):
        weight = np.asarray(layer._kernel.numpy(), np.float32).T  # (out, in)
        if mode == "fp8":
            scale = float(np.abs(weight).max()) / 448.0
            store_linear(layer, Float8("float8_e4m3fn", scale), (weight / scale).astype(ml_dtypes.float8_e4m3fn))
        else:
            qtype = gguf.GGMLQuantizationType[mode]
            store_linear(layer, GGUFBlocks(int(qtype)), gguf.quants.quantize(weight, qtype))


def _guided(output):
    import keras

    v = keras.ops.convert_to_numpy(keras.ops.cast(output, "float32"))
    return v[1] + GUIDANCE * (v[0] - v[1])


def _errors(value, reference):
    difference = value - reference
    return (float(np.abs(difference).max() / np.abs(reference).max()),
            float(np.sqrt(np.mean(difference**2) / np.mean(reference**2))))


def run_worker(mode, repeats):
    import keras

    keras.utils.set_random_seed(0)
    plain = _backbone("bfloat16")
    reference = _copy(plain, "float32")
    expected = _guided(keras_step_function(reference)())  # (compiled, or without autograd on torch)
    del reference
    quantized = _copy(plain, "bfloat16")
    if mode in ("int8", "int4"):
        quantized.quantize({"mmdit": mode})
    else:
        _store(quantized, mode)
    first, second = keras_step_function(plain), keras_step_function(quantized)
    errors = {"bfloat16": _errors(_guided(first()), expected), mode: _errors(_guided(second()), expected)}
    pairs = [(seconds(first), seconds(second)) for _ in range(repeats)]
    return {"errors": errors, "plain": [p[0] for p in pairs], "mode": [p[1] for p in pairs]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["torch", "jax"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.repeats)))
        return
    print("| backend | weights | s / CFG step | bfloat16 s / CFG step, same process | ratio | rel max error "
          "| rel rms error | bfloat16's rel max / rms |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in args.backends:
        for mode in args.modes:
            command = [sys.executable, __file__, "--worker", mode, "--repeats", str(args.repeats)]
            result = subprocess.run(command, env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True,
                                    text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            if result.returncode:
                error = (result.stderr.strip().splitlines() or ["killed"])[-1]
                print(f"| {backend} | {mode} | failed: {error} | | | | | |", flush=True)
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            ratio = statistics.median(a / b for a, b in zip(r["mode"], r["plain"]))
            (max_error, rms_error), (plain_max, plain_rms) = r["errors"][mode], r["errors"]["bfloat16"]
            print(f"| {backend} | {mode} | {statistics.median(r['mode']):.2f} | {statistics.median(r['plain']):.2f} "
                  f"| {ratio:.2f} | {max_error:.1e} | {rms_error:.1e} | {plain_max:.1e} / {plain_rms:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
