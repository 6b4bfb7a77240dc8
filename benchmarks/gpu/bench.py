"""The GPU kit: SD3-Medium shape, bfloat16, 28 steps with CFG, random weights and embeddings.

Times, in seconds: one whole image (embeddings in, 28 CFG steps, VAE decode, uint8 / float pixels on the
host), one CFG step of the MMDiT alone (batch 2) and the VAE decode alone, for keras_sd3 on jax, keras_sd3
on torch, and diffusers' `StableDiffusion3Pipeline` eager and with `torch.compile` on its transformer.
Each implementation runs in its own process (the Keras backend is fixed per process) which also holds
diffusers eager with the same weights: after a warm-up (compilation) the two alternate, and the table
gives the medians and the median per-pair ratio to diffusers eager. The `torch.compile` row is timed the
same way against eager in its own process.

Usage (on the GPU machine, see README.md in this folder for the wheels to bring):
    sh benchmarks/gpu/run.sh [--size 1024] [--steps 28] [--repeats 5] [--json results.json]
    python benchmarks/gpu/bench.py --shape tiny --size 64 --steps 2   # a CPU smoke test
    python benchmarks/gpu/bench.py --shape tiny-text --size 64 --steps 8 --dtype float32

`--shape tiny-text` is issue 17's first target where it matters, the regime in which the network is cheap
and everything around it is not: the tests' tiny random SD3 with CLIP-L / CLIP-G / T5 (tokenizers trained on
the spot), prompts in (a different one at every call), uint8 images out.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from mmdit_step import SD3_MEDIUM_DIFFUSERS, SD3_VAE_DIFFUSERS  # noqa: E402

# keras_sd3-jax-mesh1x1: the keras.distribution code path (ModelParallel on a 1 x 1 mesh), to show it costs nothing.
# -int8: the same backbone after `backbone.quantize("int8")` (weight-only; issue 26's goal: faster than bfloat16).
IMPLEMENTATIONS = {"keras_sd3-jax": "jax", "keras_sd3-jax-mesh1x1": "jax", "keras_sd3-torch": "torch",
                   "diffusers-compile": "torch", "keras_sd3-jax-int8": "jax", "keras_sd3-torch-int8": "torch",
                   "keras_sd3-jax-text-on-cpu": "jax", "keras_sd3-torch-text-on-cpu": "torch"}
# -text-on-cpu: `from_preset(text_encoders_device="cpu")` (issue 27); only shapes with text encoders have them.
TEXT_ONLY = ("keras_sd3-jax-text-on-cpu", "keras_sd3-torch-text-on-cpu")
TINY_DIFFUSERS = dict(sample_size=32, num_layers=2, num_attention_heads=2, attention_head_dim=32,
                      caption_projection_dim=64, joint_attention_dim=64, pooled_projection_dim=32,
                      pos_embed_max_size=32)
TINY_VAE_DIFFUSERS = dict(SD3_VAE_DIFFUSERS, block_out_channels=[32, 32, 32, 32], layers_per_block=1)
GUIDANCE = 7.0


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(x):
    """Waits for a torch / jax / tensorflow result by bringing it to the host."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    import keras

    return keras.ops.convert_to_numpy(x)


def diffusers_pipeline(shape, dtype, folder=None):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    if shape == "tiny-text":  # the tests' tiny pipeline with text encoders, saved in `folder`
        sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
        from tiny_text import build_pipeline

        pipe = build_pipeline(folder, with_t5=True).to(_device(), getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    torch.manual_seed(0)
    mmdit, vae = (SD3_MEDIUM_DIFFUSERS, SD3_VAE_DIFFUSERS) if shape == "sd3m" else (TINY_DIFFUSERS, TINY_VAE_DIFFUSERS)
    transformer = SD3Transformer2DModel(**mmdit).to(_device(), getattr(torch, dtype)).eval()
    vae = AutoencoderKL(**vae).to(_device(), getattr(torch, dtype)).eval()
    no_text = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, **no_text)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def keras_backbone(pipe, size, dtype):
    """keras_sd3's backbone with the pipeline's weights (read through the diffusers key map)."""
    from keras_sd3.models import MMDiTConfig, StableDiffusion3Backbone, VAEConfig
    from keras_sd3.weights import load_layer_weights
    from keras_sd3.weights.safetensors_file import TensorSource

    mmdit = MMDiTConfig.from_diffusers(dict(pipe.transformer.config))
    vae = VAEConfig.from_diffusers(dict(pipe.vae.config))
    backbone = StableDiffusion3Backbone(mmdit, vae, image_shape=(size, size, 3), dtype=dtype)
    for layer, model in ((backbone.diffuser, pipe.transformer), (backbone.vae, pipe.vae)):
        state = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
        load_layer_weights(layer, TensorSource({k: v.shape for k, v in state.items()},
                                               {k: (lambda v=v: v) for k, v in state.items()}))
    return backbone


def inputs(pipe, size, tokens=154):
    """Embeddings (CFG: positive and negative) of `tokens` tokens and initial noise, seeded."""
    rng = np.random.default_rng(0)
    width, pooled = pipe.transformer.config.joint_attention_dim, pipe.transformer.config.pooled_projection_dim
    embeddings = tuple(rng.standard_normal(s).astype("float32")
                       for s in ((1, tokens, width), (1, tokens, width), (1, pooled), (1, pooled)))
    noise = rng.standard_normal((1, size // 8, size // 8, 16)).astype("float32")
    return embeddings, noise


def prompts():
    """A different prompt at every call (the same sequence for each implementation)."""
    while True:
        yield from (f"a {size} {color} {shape} on a {background} background" for size in ("small", "large")
                    for color in ("red", "green", "blue") for shape in ("circle", "square", "triangle")
                    for background in ("white", "black"))


def diffusers_functions(pipe, embeddings, noise, size, steps, with_prompts=False):
    import torch

    dtype, device = pipe.transformer.dtype, pipe.transformer.device
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    feed = {n: torch.from_numpy(e).to(device, dtype) for n, e in zip(names, embeddings)}
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()).to(device, dtype)
    batch = torch.cat([latents, latents])
    context = torch.cat([feed["negative_prompt_embeds"], feed["prompt_embeds"]])
    pooled = torch.cat([feed["negative_pooled_prompt_embeds"], feed["pooled_prompt_embeds"]])
    timestep = torch.full((2,), 500.0, device=device)

    prompt = prompts()

    @torch.no_grad()
    def image():
        text = {"prompt": next(prompt)} if with_prompts else feed
        return _sync(pipe(**text, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                          latents=latents, output_type="pt").images)

    @torch.no_grad()
    def step():
        return _sync(pipe.transformer(hidden_states=batch, encoder_hidden_states=context,
                                      pooled_projections=pooled, timestep=timestep).sample)

    @torch.no_grad()
    def decode():
        return _sync(pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample)

    return {"image": image, "step": step, "decode": decode}


def keras_functions(task, embeddings, noise, steps, with_prompts=False):
    from keras_sd3.backend import compile_function

    backbone, prompt = task.backbone, prompts()
    batch = np.concatenate([noise, noise])
    context, pooled = (np.concatenate(pair) for pair in (embeddings[1::-1], embeddings[3:1:-1]))
    step = compile_function(backbone, lambda *a: backbone.predict_velocity(*a, 0.5))
    decode = compile_function(backbone, backbone.decode_step)
    return {
        "image": lambda: task.generate(next(prompt) if with_prompts else None, num_steps=steps,
                                       guidance_scale=GUIDANCE, latents=noise,
                                       embeddings=None if with_prompts else embeddings),
        "step": lambda: _sync(step(batch, context, pooled)),
        "decode": lambda: _sync(decode(noise)),
    }


def timed_pairs(reference, ours, repeats):
    """Warm-up (compilation) of each, then `repeats` alternating timings: (reference list, ours list)."""
    reference(), ours()
    pairs = []
    for _ in range(repeats):
        times = []
        for function in (reference, ours):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        pairs.append(times)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def worker(implementation, shape, size, steps, repeats, dtype):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return _timings(implementation, shape, size, steps, repeats, dtype, folder)


def _timings(implementation, shape, size, steps, repeats, dtype, folder):
    text = shape == "tiny-text"
    pipe = diffusers_pipeline(shape, dtype, os.path.join(folder, "reference"))
    embeddings, noise = inputs(pipe, size, tokens=333 if text else 154)
    reference = diffusers_functions(pipe, embeddings, noise, size, steps, text)
    if implementation == "diffusers-compile":
        import torch

        compiled = diffusers_pipeline(shape, dtype, os.path.join(folder, "compiled"))
        compiled.transformer.load_state_dict(pipe.transformer.state_dict())
        compiled.transformer = torch.compile(compiled.transformer)
        compiled.vae.decode = torch.compile(compiled.vae.decode)
        ours = diffusers_functions(compiled, embeddings, noise, size, steps, text)
    else:
        if implementation == "keras_sd3-jax-mesh1x1":
            import keras

            from keras_sd3.distribution import mesh_distribution

            keras.distribution.set_distribution(mesh_distribution(1, 1))
        from keras_sd3.models import StableDiffusion3TextToImage

        quantize = "int8" if implementation.endswith("-int8") else None
        placement = {"text_encoders_device": "cpu"} if implementation in TEXT_ONLY else {}
        task = (StableDiffusion3TextToImage.from_preset(os.path.join(folder, "reference"), (size, size, 3), dtype,
                                                        quantize=quantize, **placement)
                if text else StableDiffusion3TextToImage(keras_backbone(pipe, size, dtype)))
        if quantize and not text:
            task.backbone.quantize(quantize)
        ours = keras_functions(task, embeddings, noise, steps, text)
    times = {part: dict(zip(("reference", "ours"), timed_pairs(reference[part], ours[part], repeats)))
             for part in ("image", "step", "decode")}
    return {**times, "attention": attention_path(implementation, dtype), "peak_gib": device_peak_gib()}


def device_peak_gib():
    """The accelerator's peak bytes in use in this process (on torch diffusers' reference included), GiB;
    None without one."""
    from memory import peak_bytes

    found, kind = peak_bytes()
    return found / 2**30 if kind == "device" else None


def attention_path(implementation, dtype):
    """Which attention kernel the implementation's half-precision path can use here."""
    if not implementation.startswith("keras_sd3-jax"):
        import torch

        return f"torch SDPA, flash available: {torch.backends.cuda.flash_sdp_enabled() and torch.cuda.is_available()}"
    import jax
    import jax.numpy as jnp

    q = jnp.zeros((1, 1024, 24, 64), dtype)
    try:
        jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn"))(q).block_until_ready()
        return "jax cuDNN flash attention"
    except Exception as e:
        return f"jax XLA attention (cuDNN: {type(e).__name__}: {str(e).splitlines()[0][:120]})"


def environment():
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    for name in ("jax", "keras", "diffusers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "missing"
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementations", nargs="+", default=None, choices=list(IMPLEMENTATIONS),
                        help="default: all (the -text-on-cpu ones with --shape tiny-text only)")
    parser.add_argument("--shape", default="sd3m", choices=["sd3m", "tiny", "tiny-text"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", help="also write the raw timings here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.implementations is None:
        args.implementations = [i for i in IMPLEMENTATIONS if args.shape == "tiny-text" or i not in TEXT_ONLY]
    elif args.shape != "tiny-text" and set(args.implementations) & set(TEXT_ONLY):
        parser.error(f"{', '.join(TEXT_ONLY)} need text encoders: use --shape tiny-text")
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.size, args.steps, args.repeats, args.dtype)))
        return
    results = {"environment": environment(), "arguments": vars(args)}
    print(f"{results['environment']}\n{args.shape} shape, {args.dtype}, {args.size}x{args.size}, {args.steps} steps, "
          f"CFG {GUIDANCE}; medians of {args.repeats}, alternating with diffusers eager in the same process\n")
    print("| implementation | s / image | diffusers eager s / image | ratio | step s | ratio | decode s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for implementation in args.implementations:
        command = [sys.executable, __file__, "--worker", implementation, "--shape", args.shape, "--size",
                   str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats), "--dtype", args.dtype]
        env = dict(os.environ, KERAS_BACKEND=IMPLEMENTATIONS[implementation], XLA_PYTHON_CLIENT_PREALLOCATE="false")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            results[implementation] = {"error": done.stderr[-4000:]}
            print(f"| {implementation} | failed: {error} | | | | | | |", flush=True)
            continue
        times = results[implementation] = json.loads(done.stdout.strip().splitlines()[-1])
        cells = []
        for part in ("image", "step", "decode"):
            ours, reference = times[part]["ours"], times[part]["reference"]
            ratio = statistics.median(a / b for a, b in zip(ours, reference))
            cells += [f"{statistics.median(ours):.3f}"] + ([f"{statistics.median(reference):.3f}"] if part == "image" else [])
            cells.append(f"{ratio:.2f}")
        print(f"| {implementation} | " + " | ".join(cells) + " |", flush=True)
    for implementation in args.implementations:
        found = results.get(implementation, {})
        print(f"{implementation}: {found.get('attention', 'failed')}; device peak GiB: {found.get('peak_gib')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
