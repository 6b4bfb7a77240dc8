"""SD3.5 Large with T5-XXL in small memory: peak RSS while loading and while generating, per weight format.

Writes once a diffusers folder of random SD3.5 Large weights of the real shapes in bfloat16 (MMDiT 8.1B,
T5-XXL 4.8B, CLIG-G, CLIP-L, VAE: 27.6 GB, in shards of at most 2 GB; tokenizers trained on a few
sentences, ids within the real vocabularies) and, for the GGUF rows, its MMDiT as a Q4_0 GGUF
(`keras-sd3 convert`). Each row then runs in a fresh process: `StableDiffusion3TextToImage.from_preset`
(dtype bfloat16) with the row's options, and one 256 x 256 image, 2 steps with CFG. Peak RSS (VmHWM) is
read after loading, reset (/proc/self/clear_refs), and read again after generating; the process's RSS
before loading (Python, Keras and the backend) is printed too.

Usage:
    python benchmarks/large_memory.py [--folder /tmp/sd35_large_random] [--backend torch] [--runs int8 q4_0]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

GIB = 2**30
SHARD_BYTES = 2 * 10**9
RUNS = {  # row -> from_preset options (the GGUF path is filled in)
    "int8": dict(quantize="int8"),
    "int4": dict(quantize="int4"),
    "q4_0": dict(quantize="int8", transformer="Q4_0"),
    "q4_0+t5_int4": dict(quantize={"clip_l": "int8", "clip_g": "int8", "t5": "int4"}, transformer="Q4_0"),
}
CORPUS = ["a photo of a cat", "an astronaut riding a horse on the moon", "a red circle on a blue background",
          "a watercolor painting of a lighthouse at dusk"] * 50


def memory(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def _shards(folder, stem, tensors):
    """Writes {name: (torch shape, fan_in)} as random bfloat16 shards and their index."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng, shard, size, weight_map, count = np.random.default_rng(0), {}, 0, {}, 0
    names = list(tensors)

    def flush():
        nonlocal shard, size, count
        count += 1
        name = f"{stem}-{count:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name in names:
        shape, fan_in = tensors[name]
        value = rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in ** -0.5 if len(shape) > 1 else 0.1)
        if len(shape) == 1 and name.endswith("weight"):
            value += 1.0  # norms around 1
        shard[name] = value.astype(ml_dtypes.bfloat16)
        size += shard[name].nbytes
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_folder(folder, mmdit=None, share=None):
    """A random folder of the real shapes, SD3.5 Large's MMDiT unless `mmdit` says (skipped if it is there).

    With `share` (another such folder), only the MMDiT is written; the text encoders, tokenizers and VAE,
    the same in every SD3 variant, are links to `share`'s.
    """
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return
    import keras
    import sentencepiece

    from keras_sd3.models import SD3_VAE, SD35_LARGE, CLIPConfig, StableDiffusion3Backbone, T5Config
    from keras_sd3.training.clip_tokenizer import train_clip_tokenizer
    from keras_sd3.weights import export
    from keras_sd3.weights.assign import _torch_shape, named_variables
    from keras_sd3.weights.checkpoint import TEXT_FOLDERS, TOKENIZER_FOLDERS

    clip_l = CLIPConfig(eos_token_id=699)  # (the trained tokenizer's end token; the tables keep the real size)
    clip_g = CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280, eos_token_id=699)
    mmdit = mmdit or SD35_LARGE
    with keras.StatelessScope(initialize_variables=False):  # shapes only
        backbone = StableDiffusion3Backbone(mmdit, SD3_VAE, clip_l, clip_g, T5Config(), dtype="bfloat16")
    parts = {"diffuser": ("transformer", "diffusion_pytorch_model", export.mmdit_diffusers_config(mmdit)),
             "vae": ("vae", "diffusion_pytorch_model", export.vae_diffusers_config(SD3_VAE, 1024)),
             "clip_l": (TEXT_FOLDERS["clip_l"], "model", export.clip_transformers_config(clip_l)),
             "clip_g": (TEXT_FOLDERS["clip_g"], "model", export.clip_transformers_config(clip_g)),
             "t5": (TEXT_FOLDERS["t5"], "model", {"model_type": "t5", **vars(T5Config())})}
    if share:
        os.makedirs(folder, exist_ok=True)
        for subfolder in [*(p[0] for name, p in parts.items() if name != "diffuser"), *TOKENIZER_FOLDERS.values()]:
            os.symlink(os.path.abspath(os.path.join(share, subfolder)), os.path.join(folder, subfolder))
        parts = {"diffuser": parts["diffuser"]}
    for attribute, (subfolder, stem, config) in parts.items():
        path = os.path.join(folder, subfolder)
        os.makedirs(path, exist_ok=True)
        tensors = {key: (_torch_shape(tuple(var.shape), transform), int(np.prod(var.shape[:-1])) or 1)
                   for key, var, transform in named_variables(getattr(backbone, attribute))}
        _shards(path, stem, tensors)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    for name in () if share else ("clip_l", "clip_g"):
        train_clip_tokenizer(os.path.join(folder, TOKENIZER_FOLDERS[name]), CORPUS,
                             "<|endoftext|>" if name == "clip_l" else "!")
    if not share:
        t5_folder = os.path.join(folder, TOKENIZER_FOLDERS["t5"])
        os.makedirs(t5_folder, exist_ok=True)
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS), model_prefix=os.path.join(t5_folder, "spiece"), vocab_size=40,
            model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)


def worker(folder, run, gguf_path):
    from keras_sd3.models import StableDiffusion3TextToImage

    options = dict(RUNS[run])
    if options.get("transformer"):
        options["transformer"] = gguf_path
    before, start = memory("VmRSS"), time.perf_counter()
    task = StableDiffusion3TextToImage.from_preset(folder, image_shape=(256, 256, 3), dtype="bfloat16", **options)
    loading, load_seconds = memory("VmHWM"), time.perf_counter() - start
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    task.generate("a photo of a cat", num_steps=2, guidance_scale=5.0, seed=0)
    print(json.dumps(dict(before=before, loading=loading, load_seconds=load_seconds, generating=memory("VmHWM"),
                          generate_seconds=time.perf_counter() - start)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/sd35_large_random")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--runs", nargs="+", default=["int8", "q4_0"], choices=sorted(RUNS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gguf_path = os.path.join(args.folder, "transformer_Q4_0.gguf")
    if args.worker:
        worker(args.folder, args.worker, gguf_path)
        return
    write_folder(args.folder)
    if any(RUNS[run].get("transformer") for run in args.runs) and not os.path.isfile(gguf_path):
        from keras_sd3.quantization.convert import convert_to_gguf

        convert_to_gguf(args.folder, gguf_path, "Q4_0")
    print(f"backend {args.backend}; 256 x 256, 2 steps with CFG, dtype bfloat16")
    print("| weights | RSS before loading GiB | peak while loading GiB | peak while generating GiB | load s | generate s |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        env = dict(os.environ, KERAS_BACKEND=args.backend)
        result = subprocess.run([sys.executable, __file__, "--worker", run, "--folder", args.folder], env=env,
                                capture_output=True, text=True)
        if result.returncode:
            print(f"| {run} | failed: {(result.stderr.strip().splitlines() or ['killed'])[-1]} | | | | |", flush=True)
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"| {run} | {r['before'] / GIB:.2f} | {r['loading'] / GIB:.2f} | {r['generating'] / GIB:.2f} | "
              f"{r['load_seconds']:.0f} | {r['generate_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
