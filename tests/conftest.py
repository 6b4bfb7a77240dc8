"""Tiny random diffusers checkpoints shared by the tests, written with `save_pretrained`.

Every test compares keras_sd3 against the reference (diffusers on PyTorch, float32) on these models.
Parameters are re-drawn at random (norm weights around 1, pos_embed included) so that a wrong mapping
of any tensor changes the output.
"""

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
# The compilation cache stays on (as for users) but in a folder of this run, not in the home folder.
os.environ.setdefault("KERAS_SD3_CACHE", tempfile.mkdtemp(prefix="keras_sd3_test_cache_"))

import numpy as np
import pytest
import torch

TINY_MMDIT = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=3,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=256,
    caption_projection_dim=128,
    pooled_projection_dim=192,
    pos_embed_max_size=12,
)
VARIANTS = {
    "sd3": dict(TINY_MMDIT),
    "sd35_medium": dict(TINY_MMDIT, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd35_large": dict(TINY_MMDIT, qk_norm="rms_norm"),
}
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# Non-square: 48 x 80 pixels -> 6 x 10 latents -> 3 x 5 tokens.
IMAGE_SHAPE = (48, 80, 3)
LATENT_SHAPE = (6, 10, 16)


def randomize(model, seed):
    """Redraws every parameter and buffer: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norms ~ 1 + N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim >= 2:
                tensor.copy_(noise / np.sqrt(np.prod(tensor.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)
    return model.eval()


def build_reference(folder, variant, seed=0):
    """Writes a tiny diffusers SD3 folder (transformer + vae) and returns the torch models."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = randomize(SD3Transformer2DModel(**VARIANTS[variant]), seed)
    vae = randomize(AutoencoderKL(**TINY_VAE), seed + 1)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    return transformer, vae


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def reference(request, tmp_path_factory):
    """(variant, folder, diffusers transformer, diffusers vae) for each tiny variant."""
    folder = str(tmp_path_factory.mktemp(request.param))
    transformer, vae = build_reference(folder, request.param)
    return request.param, folder, transformer, vae


@pytest.fixture(scope="session")
def sd3_reference(tmp_path_factory):
    """The plain SD3 tiny folder and its torch models."""
    folder = str(tmp_path_factory.mktemp("sd3_plain"))
    transformer, vae = build_reference(folder, "sd3")
    return folder, transformer, vae


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def to_nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def reference_velocity(transformer, latents, context, pooled, timestep, skip_layers=None):
    """diffusers' SD3Transformer2DModel output for channels-last numpy inputs, channels-last."""
    with torch.no_grad():
        out = transformer(
            hidden_states=to_nchw(latents),
            encoder_hidden_states=torch.from_numpy(context),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(timestep),
            skip_layers=skip_layers,
            return_dict=False,
        )[0]
    return to_nhwc(out)


def random_inputs(batch=2, seed=0, tokens=7):
    """Channels-last latents, context, pooled embeddings for the tiny MMDiT."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, *LATENT_SHAPE)).astype("float32")
    context = rng.standard_normal((batch, tokens, TINY_MMDIT["joint_attention_dim"])).astype("float32")
    pooled = rng.standard_normal((batch, TINY_MMDIT["pooled_projection_dim"])).astype("float32")
    return latents, context, pooled


def assert_close(actual, expected, rel=1e-4):
    """max |actual - expected| <= rel * max |expected| (the parity tolerance of the issues)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert scale > 0
    if os.environ.get("KERAS_SD3_TEST_ERRORS"):  # prints the measured errors quoted beside the tolerances
        print(f"measured relative error {error / scale:.2g} (tolerance {rel:g})")
    assert error <= rel * scale, f"max abs error {error:.3g} > {rel:g} x max |reference| {scale:.3g}"


def embedded_controlnet(folder, num_layers=2, seed=0):
    """A random diffusers `SD3ControlNetModel` shaped for the embedded `sd3_tiny_shapes`, saved to `folder`."""
    import json

    from diffusers import SD3ControlNetModel

    from keras_sd3.presets import EMBEDDED

    with open(os.path.join(EMBEDDED, "sd3_tiny_shapes", "transformer", "config.json")) as f:
        config = {k: v for k, v in json.load(f).items()
                  if not k.startswith("_") and k not in ("qk_norm", "dual_attention_layers")}
    torch.manual_seed(seed)
    net = SD3ControlNetModel(**dict(config, num_layers=num_layers))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.05)
    net.save_pretrained(folder)
    return folder


def embedded_lora(path, seed=0):
    """A random diffusers-format LoRA (rank 4) on two projections of the embedded `sd3_tiny_shapes`."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for module, width in (("transformer_blocks.0.attn.to_q", 128), ("transformer_blocks.1.ff.net.2", 512)):
        tensors[f"transformer.{module}.lora_A.weight"] = rng.normal(0, 0.3, (4, width)).astype(np.float32)
        tensors[f"transformer.{module}.lora_B.weight"] = rng.normal(0, 0.3, (128, 4)).astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, str(path))
    return path
