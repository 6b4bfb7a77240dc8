"""Peak memory of one generation per model and weight format: the table behind the README's "Which card runs what".

`python benchmarks/memory.py [--size 512] [--models ...] [--weights ...]`: SD3 Medium, SD3.5 Medium and
SD3.5 Large with CLIP-L, CLIP-G and T5-XXL, random weights of the real shapes in bfloat16 (folders written
once by `large_memory.write_folder` under `--root`; the medium ones link to the large one's text encoders,
tokenizers and VAE). Each (model, weights) row runs in its own process: `from_preset(folder,
dtype="bfloat16", ...)` with

- bfloat16: nothing else;
- int8: `quantize="int8"` (MMDiT and the three text encoders, weight-only);
- Q4_0: `transformer=` the MMDiT written as a Q4_0 GGUF by `keras-sd3 convert` (kept in its blocks), the
  text encoders in bfloat16, as a user of city96's file has them;

then one SIZE² image with 1 CFG step decoded whole, then the same image with the VAE tiled (512 px tiles,
SIZE / 2 when SIZE <= 512 so that there are tiles). Peak: on a GPU the device's
(`torch.cuda.max_memory_allocated`, jax's `peak_bytes_in_use`), measured again in a second process with
`text_encoders_device="cpu"`; on a CPU the process's peak RSS (VmHWM), reset after loading and between the
two images once freed heap pages are handed back. On a CPU the host is the accelerator: the "text encoders
on the host" columns are then the peak less the text encoders' parameter bytes, what would stay on an
accelerator (marked ≈). A row whose parameters exceed the memory is printed as not fitting, not run.

`--vae 2048 4096`: the SD3 VAE alone (random weights) decoding SIZE² latents whole and in 512 px tiles,
peak RSS (or device peak) per case, each in its own process; a case killed for memory says so.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from large_memory import memory, write_folder

GIB = 2**30
WEIGHTS = ("bfloat16", "int8", "Q4_0")
MODELS = {"sd3_medium": "SD3 Medium", "sd35_medium": "SD3.5 Medium", "sd35_large": "SD3.5 Large"}
TEXT = ("t5", "clip_g", "clip_l")


def _config(model):
    from keras_sd3.models import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM

    return {"sd3_medium": SD3_MEDIUM, "sd35_medium": SD35_MEDIUM, "sd35_large": SD35_LARGE}[model]


def parameter_gib(model, weights):
    """GiB of parameters by part (`quantized_size.sizes`), T5 in bfloat16 for the Q4_0 row."""
    from quantized_size import sizes

    parts = sizes(_config(model), weights)
    if weights == "Q4_0":
        parts["t5"] = sizes(_config(model), "bfloat16")["t5"]
    return parts


def _reset_peak():
    import keras

    from keras_sd3.weights.assign import release_freed_memory

    release_freed_memory()
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def peak_bytes():
    """(bytes, kind): the accelerator's peak where there is one, else the process's peak RSS."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated(), "device"
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return device.memory_stats()["peak_bytes_in_use"], "device"  # (not resettable: since start)
    return memory("VmHWM"), "RSS"


def generation_worker(folder, weights, size, text_on_host):
    from keras_sd3.models import StableDiffusion3TextToImage

    options = {"int8": dict(quantize="int8"), "Q4_0": dict(transformer=os.path.join(folder, "transformer_Q4_0.gguf"))}
    if text_on_host:
        options.setdefault(weights, {})["text_encoders_device"] = "cpu"
    start = time.perf_counter()
    task = StableDiffusion3TextToImage.from_preset(folder, image_shape=(size, size, 3), dtype="bfloat16",
                                                   **options.get(weights, {}))
    result = dict(load_seconds=time.perf_counter() - start, loading=peak_bytes()[0])
    for case, tile in (("whole", None), ("tiled", 512 if size > 512 else size // 2)):
        if tile:
            task.backbone.enable_vae_tiling(tile)
        _reset_peak()
        start = time.perf_counter()
        task.generate("a photo of a cat", num_steps=1, guidance_scale=5.0, seed=0)
        result[case], result[case + "_seconds"] = peak_bytes()[0], time.perf_counter() - start
    result["kind"] = peak_bytes()[1]
    return result


def vae_worker(size, tile):
    import keras

    from keras_sd3.models import SD3_VAE, MMDiTConfig, StableDiffusion3Backbone

    keras.utils.set_random_seed(0)
    tiny = MMDiTConfig(num_layers=1, num_attention_heads=1, caption_projection_dim=64, joint_attention_dim=64,
                       pooled_projection_dim=64, pos_embed_max_size=size // 16)  # (the backbone's, a few MB)
    backbone = StableDiffusion3Backbone(tiny, SD3_VAE, image_shape=(size, size, 3), dtype="bfloat16")
    if tile:
        backbone.enable_vae_tiling(tile)
    latents = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 16)).astype(np.float32)
    _reset_peak()
    before = peak_bytes()[0]
    start = time.perf_counter()
    np.asarray(backbone.decode_step(latents))
    return dict(peak=peak_bytes()[0], before=before, kind=peak_bytes()[1], seconds=time.perf_counter() - start)


def _run(arguments):
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    if result.returncode:
        last = (result.stderr.strip().splitlines() or [""])[-1]
        return {"error": "killed (out of memory)" if result.returncode in (-9, 137) else f"failed: {last}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _gib(value, derived=False):
    return ("≈" if derived else "") + f"{value / GIB:.2f}"


def generation_table(args):
    import keras

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"backend {keras.backend.backend()}; {args.size} x {args.size}, 1 CFG step; memory {total / GIB:.1f} GiB")
    print("| model | weights | parameters GiB | load s | peak, VAE whole GiB | peak, VAE tiled GiB "
          "| text encoders on the host: whole GiB | text encoders on the host: tiled GiB | generate s |")
    print("|---|---|---|---|---|---|---|---|---|")
    large = os.path.join(args.root, "sd35_large")
    for model in args.models:
        folder = os.path.join(args.root, model)
        for weights in args.weights:
            parts = parameter_gib(model, weights)
            head = f"| {MODELS[model]} | {weights} | {sum(parts.values()):.2f} |"
            if sum(parts.values()) * GIB > total:
                print(f"{head} does not fit: {sum(parts.values()):.2f} GiB of parameters, "
                      f"{total / GIB:.1f} GiB of memory | | | | | |", flush=True)
                continue
            write_folder(folder, _config(model), None if model == "sd35_large" else large)
            gguf_path = os.path.join(folder, "transformer_Q4_0.gguf")
            if weights == "Q4_0" and not os.path.isfile(gguf_path):
                from keras_sd3.quantization.convert import convert_to_gguf

                convert_to_gguf(folder, gguf_path, "Q4_0")
            base = ["--worker", weights, "--folder", folder, "--size", str(args.size)]
            r = _run(base)
            if "error" in r:
                print(f"{head} {r['error']} | | | | | |", flush=True)
                continue
            if r["kind"] == "device":
                host = _run(base + ["--text-on-host"])
                on_host = [_gib(host[c]) if "error" not in host else host["error"] for c in ("whole", "tiled")]
            else:
                text = sum(parts[p] for p in TEXT) * GIB
                on_host = [_gib(r[c] - text, derived=True) for c in ("whole", "tiled")]
            print(f"{head} {r['load_seconds']:.0f} | {_gib(r['whole'])} | {_gib(r['tiled'])} | {on_host[0]} "
                  f"| {on_host[1]} | {r['whole_seconds']:.0f} |", flush=True)


def vae_table(sizes):
    print("SD3 VAE decode, bfloat16 (peak: RSS on a CPU, device peak on a GPU)")
    print("| picture | VAE whole: peak GiB | added by decoding GiB | s | 512 px tiles: peak GiB "
          "| added by decoding GiB | s |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        cells = []
        for tile in (0, 512):
            r = _run(["--vae-worker", str(size), "--tile", str(tile)])
            cells += [r["error"], "", ""] if "error" in r else [
                _gib(r["peak"]), _gib(r["peak"] - r["before"]), f"{r['seconds']:.0f}"]
        print(f"| {size} x {size} | " + " | ".join(cells) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/sd3_random", help="where the random folders are (written once)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS)
    parser.add_argument("--vae", nargs="*", type=int, help="decode-only table at these sizes instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--text-on-host", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vae-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(generation_worker(args.folder, args.worker, args.size, args.text_on_host)))
    elif args.vae_worker:
        print(json.dumps(vae_worker(args.vae_worker, args.tile)))
    elif args.vae:
        vae_table(args.vae)
    else:
        generation_table(args)


if __name__ == "__main__":
    main()
