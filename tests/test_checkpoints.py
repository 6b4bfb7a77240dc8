"""Checkpoint loading: original single files, sharded folders, and the errors for bad checkpoints."""

import dataclasses
import json
import os
import re

import keras
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, TINY_VAE, VARIANTS, random_inputs
from safetensors.numpy import load_file, save_file

from keras_sd3.models import StableDiffusion3Backbone
from keras_sd3.weights import CheckpointError

TIMESTEPS = np.array([800.0, 20.0], "float32")

# diffusers -> original names, written from SPEC §2.2 / §6 independently of keras_sd3's own key map.
MMDIT_RENAMES = [
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"pos_embed\.proj", "x_embedder.proj"),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0"),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2"),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0"),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_(q|k)", r"joint_blocks.\1.context_block.attn.ln_\2"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_(q|k)", r"joint_blocks.\1.x_block.attn.ln_\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_(q|k)", r"joint_blocks.\1.x_block.attn2.ln_\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"joint_blocks.\1.x_block.attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", r"joint_blocks.\1.x_block.attn2.proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"joint_blocks.\1.context_block.attn.proj"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"joint_blocks.\1.x_block.adaLN_modulation.1"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"joint_blocks.\1.context_block.adaLN_modulation.1"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"joint_blocks.\1.x_block.mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"joint_blocks.\1.x_block.mlp.fc2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"joint_blocks.\1.context_block.mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"joint_blocks.\1.context_block.mlp.fc2"),
    (r"context_embedder", "context_embedder"),
    (r"proj_out", "final_layer.linear"),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),
]
QKV = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)", r"joint_blocks.\1.x_block.attn.qkv.\3"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.(weight|bias)", r"joint_blocks.\1.context_block.attn.qkv.\3"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])\.(weight|bias)", r"joint_blocks.\1.x_block.attn2.qkv.\3"),
]


def swap_halves(a):
    return np.concatenate(np.split(a, 2)[::-1])


def to_original_mmdit(state, num_layers):
    out, fused = {}, {}
    for key, value in state.items():
        for pattern, target in QKV:
            m = re.fullmatch(pattern, key)
            if m:
                fused.setdefault(m.expand(target), {})[m.group(2)] = value
                break
        else:
            for pattern, target in MMDIT_RENAMES:
                m = re.match(pattern, key)
                if m:
                    name = m.expand(target) + key[m.end() :]
                    break
            else:
                raise AssertionError(f"no original name for {key}")
            last_context = f"joint_blocks.{num_layers - 1}.context_block.adaLN" in name
            out[name] = swap_halves(value) if last_context or name.startswith("final_layer.adaLN") else value
    for name, parts in fused.items():
        out[name] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def to_original_vae(state, levels=4):
    out = {}
    for key, value in state.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", name)
        up = lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.{m.group(2)}"
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets)", lambda m: up(m).replace("resnets", "block"), name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.(upsamplers\.0)", lambda m: up(m).replace("upsamplers.0", "upsample"), name)
        name = name.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        attn = "mid_block.attentions.0."
        for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            name = name.replace(attn + new + ".", "mid.attn_1." + old + ".")
        if "mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear -> 1x1 conv
        out["first_stage_model." + name] = value
    return out


def save_single_file(folder, path, variant):
    transformer = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    vae = load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    tensors = {**to_original_mmdit(transformer, VARIANTS[variant]["num_layers"]), **to_original_vae(vae)}
    save_file(tensors, path)
    return tensors


def outputs(backbone):
    latents, context, pooled = random_inputs()
    velocity = backbone.diffuser(latents, context, pooled, TIMESTEPS)
    images = np.random.default_rng(5).uniform(-1, 1, (1, *IMAGE_SHAPE)).astype("float32")
    encoded = backbone.encode_image_step(images)
    decoded = backbone.decode_step(encoded)
    return [keras.ops.convert_to_numpy(x) for x in (velocity, encoded, decoded)]


def test_single_file_loads_to_identical_outputs(reference, tmp_path):
    variant, folder, _, _ = reference
    path = str(tmp_path / "model.safetensors")
    save_single_file(folder, path, variant)
    from_folder = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE)
    from_file = StableDiffusion3Backbone.from_preset(path, image_shape=IMAGE_SHAPE)
    # A single file does not record the native sample size (it defaults to 128 latents, 1024 px).
    assert dataclasses.replace(from_file.mmdit_config, sample_size=16) == from_folder.mmdit_config
    assert from_file.vae_config == from_folder.vae_config
    for a, b in zip(outputs(from_file), outputs(from_folder)):
        np.testing.assert_array_equal(a, b)


def test_sharded_folder_loads_to_identical_outputs(sd3_reference, tmp_path):
    folder, transformer, _ = sd3_reference
    sharded = tmp_path / "sharded"
    transformer.save_pretrained(sharded / "transformer", max_shard_size="300KB")
    os.symlink(os.path.join(folder, "vae"), sharded / "vae")
    assert os.path.exists(sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    assert len(list((sharded / "transformer").glob("*.safetensors"))) > 2
    a = StableDiffusion3Backbone.from_preset(str(sharded), image_shape=IMAGE_SHAPE)
    b = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE)
    for x, y in zip(outputs(a), outputs(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def original_file(sd3_reference, tmp_path):
    folder, _, _ = sd3_reference
    path = str(tmp_path / "sd3.safetensors")
    return path, save_single_file(folder, path, "sd3")


def test_truncated_file_raises(original_file):
    path, _ = original_file
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt: tensor '"):
        StableDiffusion3Backbone.from_preset(path, image_shape=IMAGE_SHAPE)


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        StableDiffusion3Backbone.from_preset(str(path))


def test_wrong_architecture_file_raises(tmp_path):
    # An SD1.x-style single file: UNet keys under model.diffusion_model., a 4-channel VAE.
    path = str(tmp_path / "sd15.safetensors")
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), "float32"),
            "first_stage_model.encoder.conv_in.weight": np.zeros((128, 3, 3, 3), "float32"),
        },
        path,
    )
    with pytest.raises(CheckpointError, match="not an SD3 / SD3.5 checkpoint: tensor 'x_embedder.proj.weight'"):
        StableDiffusion3Backbone.from_preset(path)


def test_file_without_diffusion_model_raises(tmp_path):
    path = str(tmp_path / "clip.safetensors")
    save_file({"text_model.embeddings.token_embedding.weight": np.zeros((8, 4), "float32")}, path)
    with pytest.raises(CheckpointError, match="no 'model.diffusion_model.\\*' tensors"):
        StableDiffusion3Backbone.from_preset(path)


def test_missing_tensor_is_named(original_file):
    path, tensors = original_file
    del tensors["model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.bias"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*'transformer_blocks\.1\.ff\.net\.2\.bias'"):
        StableDiffusion3Backbone.from_preset(path, image_shape=IMAGE_SHAPE)


def _pending_variables():
    from keras.src.backend.common import global_state

    return list(global_state.get_global_attribute("uninitialized_variables", []))


def test_failed_load_leaves_no_deferred_variables(original_file):
    """from_preset builds the model with Keras' deferred initialisation; a load that fails must not leave
    its variables registered for Keras to initialise at the next stateless scope's exit."""
    path, tensors = original_file
    del tensors["model.diffusion_model.final_layer.linear.bias"]
    save_file(tensors, path)
    before = _pending_variables()
    with pytest.raises(CheckpointError, match="proj_out.bias"):
        StableDiffusion3Backbone.from_preset(path, image_shape=IMAGE_SHAPE)
    assert _pending_variables() == before
    with keras.StatelessScope():
        pass


def test_loaded_variables_hold_the_checkpoint_values(original_file):
    path, tensors = original_file
    backbone = StableDiffusion3Backbone.from_preset(path, image_shape=IMAGE_SHAPE)
    assert not {id(v) for v in backbone.variables} & {id(v) for v in _pending_variables()}
    bias = backbone.diffuser.proj_out.bias
    expected = tensors["model.diffusion_model.final_layer.linear.bias"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bias), expected)
    assert all(v.value is v.value for v in backbone.variables)  # real values, not a fresh placeholder per read
    if keras.backend.backend() == "torch":  # torch modules see every variable as a parameter
        assert len(list(backbone.parameters())) == len(backbone.variables)


def test_unexpected_tensor_is_named(original_file):
    path, tensors = original_file
    tensors["model.diffusion_model.joint_blocks.0.x_block.extra.weight"] = np.zeros((2,), "float32")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"'joint_blocks\.0\.x_block\.extra\.weight'"):
        StableDiffusion3Backbone.from_preset(path, image_shape=IMAGE_SHAPE)


def test_misshaped_tensor_names_key_and_both_shapes(sd3_reference, tmp_path):
    folder, _, _ = sd3_reference
    copy = tmp_path / "copy"
    os.makedirs(copy / "transformer")
    os.symlink(os.path.join(folder, "vae"), copy / "vae")
    with open(os.path.join(folder, "transformer", "config.json")) as f:
        (copy / "transformer" / "config.json").write_text(f.read())
    tensors = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    tensors["context_embedder.weight"] = np.zeros((128, 255), "float32")
    save_file(tensors, str(copy / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'context_embedder\.weight'.*\(128, 255\).*expects \(128, 256\)"):
        StableDiffusion3Backbone.from_preset(str(copy), image_shape=IMAGE_SHAPE)


def test_folder_without_vae_raises(sd3_reference, tmp_path):
    folder, _, _ = sd3_reference
    os.symlink(os.path.join(folder, "transformer"), tmp_path / "transformer")
    with pytest.raises(CheckpointError, match="vae/config.json"):
        StableDiffusion3Backbone.from_preset(str(tmp_path))


def test_unknown_source_raises():
    with pytest.raises(CheckpointError, match="neither a diffusers folder, a .safetensors file nor a preset"):
        StableDiffusion3Backbone.from_preset("/no/such/checkpoint")


def test_config_json_is_read(sd3_reference):
    folder, _, _ = sd3_reference
    with open(os.path.join(folder, "vae", "config.json")) as f:
        assert json.load(f)["block_out_channels"] == TINY_VAE["block_out_channels"]
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE)
    assert backbone.vae_config.block_out_channels == tuple(TINY_VAE["block_out_channels"])
    assert backbone.mmdit_config.num_layers == VARIANTS["sd3"]["num_layers"]
