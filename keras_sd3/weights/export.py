"""Writing a backbone as a diffusers-format folder (the inverse of loading), e.g. a trained tiny model.

The folder is what `StableDiffusion3Backbone.from_preset` reads, and also what diffusers'
`StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
image_encoder=None, feature_extractor=None)` reads: configs in diffusers / transformers names,
tensors in PyTorch layout, safetensors only.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
from keras import ops
from safetensors.numpy import save_file

from keras_sd3.weights.assign import _torch_conv, _torch_linear, named_variables
from keras_sd3.weights.checkpoint import TEXT_FOLDERS, TOKENIZER_FOLDERS


def _torch_layout(value, transform):
    if transform is _torch_linear:
        return value.T
    if transform is _torch_conv:
        return value.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    return value


def _float_kernels(layer):
    """{id(variable): (in, out) float32 kernel} of the quantized / stored `Linear` layers in `layer`."""
    from keras_sd3.models.layers import Linear
    from keras_sd3.quantization import float_kernel

    return {id(sub._kernel): float_kernel(sub) for sub in layer._flatten_layers(include_self=True, recursive=True)
            if isinstance(sub, Linear) and sub.compressed}


def layer_state_dict(layer, dtype="float32"):
    """`{diffusers key: numpy array in PyTorch layout}` for every variable of `layer`; quantized and
    stored (GGUF, float8) kernels are written as the float weights they stand for."""
    floats, state = _float_kernels(layer), {}
    for key, var, transform in named_variables(layer):
        if id(var) in floats:
            value, transform = floats[id(var)], _torch_linear
        else:
            value = ops.cast(var, "float32")
        state[key] = np.ascontiguousarray(_torch_layout(ops.convert_to_numpy(value), transform)).astype(dtype)
    return state


def mmdit_diffusers_config(config):
    values = dataclasses.asdict(config)
    values.update(qk_norm="rms_norm" if config.qk_norm else None, dual_attention_layers=list(config.dual_attention_layers))
    return {"_class_name": "SD3Transformer2DModel", **values}


def vae_diffusers_config(config, sample_size):
    blocks = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", **dataclasses.asdict(config),
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "act_fn": "silu", "sample_size": sample_size, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": True, "force_upcast": True,
    }


def clip_transformers_config(config):
    return {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", **dataclasses.asdict(config),
        "bos_token_id": config.vocab_size - 2, "pad_token_id": config.eos_token_id, "initializer_range": 0.02,
        "initializer_factor": 1.0, "attention_dropout": 0.0, "dropout": 0.0,
    }


def _write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def _write(folder, config, tensors, weights_name):
    _write_json(os.path.join(folder, "config.json"), config)
    save_file(tensors, os.path.join(folder, weights_name))


def save_diffusers_folder(backbone, folder, tokenizer_folders, dtype="float32", settings=None):
    """Writes `backbone` (MMDiT, VAE, CLIP-L / CLIP-G; no T5) and its tokenizers as a diffusers folder.

    Args:
        backbone: a `StableDiffusion3Backbone` with CLIP encoders and without T5.
        folder: the output folder (created).
        tokenizer_folders: `{"clip_l": path, "clip_g": path}` of CLIP-format tokenizer folders to copy.
        dtype: the stored tensor dtype ("float32" or "float16").
        settings: more entries for model_index.json's "_keras_sd3" block (`presets.folder_settings`),
            e.g. the recommended `num_steps` / `guidance_scale` and a closed caption `vocabulary`.
    """
    if backbone.clip_l is None or backbone.t5 is not None:
        raise ValueError("save_diffusers_folder writes backbones with CLIP-L / CLIP-G and without T5.")
    image_size = backbone.mmdit_config.sample_size * backbone.vae_config.downsample_factor
    _write(os.path.join(folder, "transformer"), mmdit_diffusers_config(backbone.mmdit_config),
           layer_state_dict(backbone.diffuser, dtype), "diffusion_pytorch_model.safetensors")
    _write(os.path.join(folder, "vae"), vae_diffusers_config(backbone.vae_config, image_size),
           layer_state_dict(backbone.vae, dtype), "diffusion_pytorch_model.safetensors")
    for name in ("clip_l", "clip_g"):
        _write(os.path.join(folder, TEXT_FOLDERS[name]), clip_transformers_config(backbone.text_configs[name]),
               layer_state_dict(getattr(backbone, name), dtype), "model.safetensors")
        shutil.copytree(tokenizer_folders[name], os.path.join(folder, TOKENIZER_FOLDERS[name]), dirs_exist_ok=True)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler)
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None], "image_encoder": [None, None],
             "feature_extractor": [None, None],
             "_keras_sd3": {"t5_zero_tokens": backbone.t5_zero_tokens, **(settings or {})}}
    _write_json(os.path.join(folder, "model_index.json"), index)
