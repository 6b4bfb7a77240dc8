"""LoRA cost: time to load a LoRA file, and one MMDiT step with the LoRA unfused (adapters) vs fused.

Random MMDiTs at two shapes (batch 2 = a CFG step): "tiny" (the embedded model's: 4 blocks, hidden 128,
64 x 64 image) and "mid" (12 blocks, hidden 768, 256 x 256 image, 154 context tokens). The LoRA has rank
16 on every attention projection and feed-forward layer of every block (diffusers names), written with
`keras_sd3.lora.write_lora`. Load time is the median of --repeats `load_lora` + `unload_lora` cycles;
the unfused and fused steps run on two backbones with the same weights, compiled the way the tasks
compile them (`backend.compile_function`), timed alternately after a warm-up; ratio = median of the
per-pair ratios unfused / fused.

Usage:
    KERAS_BACKEND=torch python benchmarks/lora.py [--shapes tiny mid] [--rank 16] [--repeats 10]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from mmdit_step import seconds, timed_pairs  # noqa: E402

from keras_sd3.backend import compile_function  # noqa: E402
from keras_sd3.lora import LoraWeights, write_lora  # noqa: E402
from keras_sd3.lora.adapters import dense_layers  # noqa: E402
from keras_sd3.models import MMDiTConfig, StableDiffusion3Backbone, VAEConfig  # noqa: E402

SHAPES = {
    "tiny": (dict(num_layers=4, num_attention_heads=2, joint_attention_dim=256, caption_projection_dim=128,
                  pooled_projection_dim=192, pos_embed_max_size=16, sample_size=8), 64, 77),
    "mid": (dict(num_layers=12, num_attention_heads=12, joint_attention_dim=4096, caption_projection_dim=768,
                 pooled_projection_dim=2048, pos_embed_max_size=64, sample_size=32), 256, 154),
}
TINY_VAE = VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def build(config, image):
    keras.utils.set_random_seed(0)
    return StableDiffusion3Backbone(MMDiTConfig(**config), TINY_VAE, image_shape=(image, image, 3))


def write_random_lora(backbone, path, rank):
    rng, weights = np.random.default_rng(0), []
    for module, layer in dense_layers(backbone.diffuser).items():
        if module.startswith("transformer_blocks.") and module.split(".", 2)[2] in TARGETS:
            fan_in, fan_out = layer._kernel.shape
            down = rng.standard_normal((rank, fan_in)).astype(np.float32) / np.sqrt(fan_in)
            up = 0.1 * rng.standard_normal((fan_out, rank)).astype(np.float32) / np.sqrt(rank)
            weights.append(LoraWeights("transformer", module, down, up, float(rank), module))
    write_lora(path, weights)
    return len(weights)


def step_function(backbone, tokens):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, *backbone.latent_shape)).astype(np.float32)
    context = rng.standard_normal((2, tokens, backbone.mmdit_config.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, backbone.mmdit_config.pooled_projection_dim)).astype(np.float32)
    program = compile_function(backbone, lambda *a: backbone.predict_velocity(*a, 0.5))
    return lambda: keras.ops.convert_to_numpy(program(latents, context, pooled))


def measure(shape, rank, repeats, folder):
    config, image, tokens = SHAPES[shape]
    unfused, fused = build(config, image), build(config, image)
    fused.set_weights(unfused.get_weights())
    path = os.path.join(folder, f"{shape}.safetensors")
    layers = write_random_lora(unfused, path, rank)
    loads = []
    for _ in range(repeats):
        loads.append(seconds(lambda: unfused.load_lora(path, name="bench")))
        unfused.unload_lora("bench")
    unfused.load_lora(path, name="bench")
    fused.load_lora(path, name="bench")
    fuse_seconds = seconds(fused.fuse_loras)
    with_adapters, merged = timed_pairs(step_function(unfused, tokens), step_function(fused, tokens), repeats)
    ratio = statistics.median(a / b for a, b in zip(with_adapters, merged))
    return dict(shape=shape, layers=layers, mb=os.path.getsize(path) / 2**20, load=statistics.median(loads),
                fuse=fuse_seconds, unfused=statistics.median(with_adapters), fused=statistics.median(merged), ratio=ratio)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["tiny", "mid"], choices=sorted(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"backend {keras.config.backend()}, rank {args.rank}, batch 2, medians of {args.repeats}")
    print("| shape | adapted layers | file MB | load_lora s | fuse_loras s | step unfused s | step fused s | unfused / fused |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            r = measure(shape, args.rank, args.repeats, folder)
            print(f"| {r['shape']} | {r['layers']} | {r['mb']:.1f} | {r['load']:.3f} | {r['fuse']:.3f} | "
                  f"{r['unfused']:.4f} | {r['fused']:.4f} | {r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
