"""ComfyUI's float8 files: `*_fp8_scaled` MMDiTs (float8_e4m3fn weights, a float32 `scale_weight` per layer, a
`scaled_fp8` marker) and unscaled `t5xxl_fp8_e4m3fn` encoders, against diffusers / transformers fed the
dequantised weights (float8 value times scale, computed here in float64)."""

import os

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, VARIANTS, assert_close, build_reference, random_inputs, reference_velocity, to_nchw
from safetensors.numpy import load_file
from safetensors.torch import save_file
from test_checkpoints import TIMESTEPS
from test_checkpoints import to_original_mmdit as independent_map
from test_tasks import assert_images_close, noise, reference
from tiny_text import build_pipeline

from keras_sd3.models import StableDiffusion3Backbone, StableDiffusion3TextToImage
from keras_sd3.models.layers import Linear

PREFIX = "model.diffusion_model."
FP8_MAX = 448.0  # the largest float8_e4m3fn


def scaled_fp8(value, rng):
    """(float8 tensor, its float32 scale): ComfyUI's per-tensor scaling, max |w| / 448 times a random factor."""
    scale = np.float32(np.abs(value).max() / FP8_MAX * rng.uniform(1.0, 1.5))
    return torch.from_numpy(value / scale).to(torch.float8_e4m3fn), scale


def dequantized(fp8, scale):
    return (fp8.to(torch.float64) * float(scale)).to(torch.float32)


def write_fp8_mmdit(folder, path, num_layers, prefix=PREFIX):
    """The folder's transformer as an fp8_scaled single file of the MMDiT alone; returns the dequantised
    original-named tensors."""
    state = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    original = {k[len(PREFIX):]: v.astype(np.float32) for k, v in independent_map(state, num_layers).items()}
    rng, tensors, values = np.random.default_rng(0), {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for name, value in original.items():
        if value.ndim == 2 and name.endswith(".weight"):
            fp8, scale = scaled_fp8(value, rng)
            stem = name[: -len("weight")]
            tensors.update({prefix + name: fp8, prefix + stem + "scale_weight": torch.tensor(scale),
                            prefix + stem + "scale_input": torch.tensor(1.0)})
            values[name] = dequantized(fp8, scale)
        else:
            tensors[prefix + name] = values[name] = torch.from_numpy(value).to(torch.bfloat16)
            values[name] = values[name].float()
    save_file(tensors, path)
    return values


def diffusers_state(original, model, num_layers):
    """Original-named tensors -> `model`'s state dict, through the test map applied to index arrays."""
    ids, start = {}, 0
    for key, tensor in model.state_dict().items():
        ids[key] = np.arange(start, start + tensor.numel()).reshape(tuple(tensor.shape))
        start += tensor.numel()
    flat = np.empty(start, np.float32)
    for name, index in independent_map(ids, num_layers).items():
        flat[index.ravel()] = original[name[len(PREFIX):]].numpy().ravel()
    return {key: torch.from_numpy(flat[index]) for key, index in ids.items()}


def dequantized_diffusers(folder, values, num_layers):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    model.load_state_dict(diffusers_state(values, model, num_layers))
    return model


@pytest.mark.parametrize("variant, prefix", [("sd3", PREFIX), ("sd35_medium", "")])
def test_fp8_scaled_transformer_matches_diffusers_of_the_dequantised_weights(variant, prefix, tmp_path):
    folder, path = str(tmp_path), str(tmp_path / "mmdit_fp8_scaled.safetensors")
    build_reference(folder, variant)
    num_layers = VARIANTS[variant]["num_layers"]
    values = write_fp8_mmdit(folder, path, num_layers, prefix)
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE, transformer=path)
    stored = [layer for layer in backbone.diffuser._flatten_layers() if isinstance(layer, Linear)
              and layer.weight_format is not None]
    linears = [layer for layer in backbone.diffuser._flatten_layers() if isinstance(layer, Linear)]
    assert len(stored) == len(linears)  # every Linear weight of the file is float8: each stays so
    for layer in stored:
        assert layer._kernel.dtype == "uint8" and layer._kernel.shape == tuple(reversed(layer.features))
        assert layer.weight_format.dtype == "float8_e4m3fn" and layer.weight_format.scale != 1.0
    inputs = (*random_inputs(), TIMESTEPS)
    ours = keras.ops.convert_to_numpy(backbone.diffuser(*inputs))
    expected = reference_velocity(dequantized_diffusers(folder, values, num_layers), *inputs)
    assert_close(ours, expected, rel=1e-4)  # measured: jax 2.3e-6, torch 0, tensorflow 3.9e-6


def write_fp8_t5(folder, path):
    """The pipeline's T5 as an unscaled float8_e4m3fn file (matrices in float8, norms and the bias table in
    float32); returns the transformers state dict of its values."""
    state = load_file(os.path.join(folder, "text_encoder_3", "model.safetensors"))
    tensors, values = {}, {}
    for name, value in state.items():
        tensor = torch.from_numpy(value.astype(np.float32))
        if value.ndim == 2 and "relative_attention_bias" not in name:
            tensor = tensor.to(torch.float8_e4m3fn)
        tensors[name], values[name] = tensor, tensor.float()
    save_file(tensors, path)
    return values


def test_pipeline_with_fp8_transformer_and_t5_matches_diffusers(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    folder = str(tmp_path)
    pipe = build_pipeline(folder, with_t5=True)
    transformer_path, t5_path = str(tmp_path / "mmdit_fp8_scaled.safetensors"), str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    values = write_fp8_mmdit(os.path.join(folder), transformer_path, VARIANTS["sd3"]["num_layers"])
    t5_values = write_fp8_t5(folder, t5_path)
    task = StableDiffusion3TextToImage.from_preset(folder, image_shape=IMAGE_SHAPE, transformer=transformer_path,
                                                   t5=t5_path)
    t5_forms = [layer.weight_format for layer in task.backbone.t5._flatten_layers() if isinstance(layer, Linear)]
    assert len(t5_forms) == 14 and {form.name for form in t5_forms} == {"float8_e4m3fn"}  # 2 blocks of 7 matrices
    latents = noise(1)
    ours = task.generate("a small green triangle in the top left", num_steps=2, guidance_scale=5.0, latents=latents)
    t5 = T5EncoderModel(pipe.text_encoder_3.config).eval()
    t5.load_state_dict({**t5_values, "encoder.embed_tokens.weight": t5_values["shared.weight"]})
    transformer = dequantized_diffusers(folder, values, VARIANTS["sd3"]["num_layers"])
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer, "text_encoder_3": t5})
    expected = reference(pipe, StableDiffusion3Pipeline, "pipeline_stable_diffusion_3", latents,
                         prompt="a small green triangle in the top left", num_inference_steps=2, guidance_scale=5.0,
                         height=IMAGE_SHAPE[0], width=IMAGE_SHAPE[1], latents=to_nchw(latents))
    assert_images_close(ours, expected[0])
