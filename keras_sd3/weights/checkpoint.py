"""Finding the parts of an SD3 checkpoint: a diffusers folder or an original single file.

`open_checkpoint(source)` returns a `Checkpoint`: for each part it holds (MMDiT, VAE, CLIP-L, CLIP-G,
T5), its config and a lazy `TensorSource` keyed with diffusers / transformers names, plus the
tokenizer folders of a diffusers folder.
"""

import dataclasses
import json
import os

import numpy as np

from keras_sd3 import presets
from keras_sd3.models.clip import CLIPConfig
from keras_sd3.models.config import MMDiTConfig, VAEConfig
from keras_sd3.models.t5 import T5Config
from keras_sd3.weights import original_keys
from keras_sd3.weights.safetensors_file import CheckpointError, TensorSource, open_safetensors, open_weights

MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
TEXT_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
TOKENIZER_FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
# Stored by some writers but derived (position ids) or tied to another tensor (T5's input embedding).
_REDUNDANT = ("text_model.embeddings.position_ids", "encoder.embed_tokens.weight")


@dataclasses.dataclass
class Part:
    """One model of a checkpoint: its config and its tensors."""

    config: object
    tensors: TensorSource


@dataclasses.dataclass
class Checkpoint:
    """The parts of one checkpoint; text parts are None where the checkpoint has none."""

    path: str
    mmdit: Part
    vae: Part
    clip_l: Part = None
    clip_g: Part = None
    t5: Part = None
    tokenizers: dict = dataclasses.field(default_factory=dict)
    t5_zero_tokens: int = None  # set by a folder's model_index.json "_keras_sd3" entry (tiny models)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"Missing {path}: is this a diffusers SD3 folder?") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


def _config(cls, factory, path):
    try:
        return factory(_read_json(path))
    except TypeError as e:
        raise CheckpointError(f"{path} has an unexpected field ({e}).") from None


def _open_text_folder(folder, name):
    subfolder = os.path.join(folder, TEXT_FOLDERS[name])
    if not os.path.isdir(subfolder):
        return None
    cls = T5Config if name == "t5" else CLIPConfig
    config = _config(cls, cls.from_transformers, os.path.join(subfolder, "config.json"))
    return Part(config, open_weights(subfolder, "model").without(_REDUNDANT))


def _open_folder(folder):
    transformer, vae = os.path.join(folder, "transformer"), os.path.join(folder, "vae")
    checkpoint = Checkpoint(
        folder,
        Part(
            _config(MMDiTConfig, MMDiTConfig.from_diffusers, os.path.join(transformer, "config.json")),
            open_weights(transformer, "diffusion_pytorch_model"),
        ),
        Part(
            _config(VAEConfig, VAEConfig.from_diffusers, os.path.join(vae, "config.json")),
            open_weights(vae, "diffusion_pytorch_model"),
        ),
    )
    checkpoint.t5_zero_tokens = presets.folder_settings(folder).get("t5_zero_tokens")
    for name in TEXT_FOLDERS:
        setattr(checkpoint, name, _open_text_folder(folder, name))
        tokenizer = os.path.join(folder, TOKENIZER_FOLDERS[name])
        if os.path.isdir(tokenizer):
            checkpoint.tokenizers[name] = tokenizer
    return checkpoint


def _single_file_text_parts(tensors, checkpoint):
    for name, prefix in TEXT_PREFIXES.items():
        part = tensors.subset(prefix).without(_REDUNDANT)
        if not part.shapes:
            continue
        what = f"{name} in {checkpoint.path} (prefix '{prefix}')"
        if name == "t5":
            setattr(checkpoint, name, Part(original_keys.infer_t5_config(part, what), part))
            continue
        config = original_keys.infer_clip_config(part, "gelu" if name == "clip_g" else "quick_gelu", what)
        if "text_projection.weight" not in part:  # SD3's CLIP-L projection is the identity
            part = part.with_tensor("text_projection.weight", np.eye(config.hidden_size, dtype=np.float32))
        setattr(checkpoint, name, Part(config, part))


def _open_single_file(path):
    tensors = open_safetensors(path)
    mmdit, vae = tensors.subset(MMDIT_PREFIX), tensors.subset(VAE_PREFIX)
    for part, prefix in ((mmdit, MMDIT_PREFIX), (vae, VAE_PREFIX)):
        if not part.shapes:
            example = next(iter(tensors.keys()), "nothing")
            raise CheckpointError(
                f"{path} is not an SD3 single-file checkpoint: it has no '{prefix}*' tensors "
                f"(its first tensor is '{example}')."
            )
    mmdit_config = original_keys.infer_mmdit_config(mmdit)
    vae_config = original_keys.infer_vae_config(vae)
    mmdit = original_keys.rename(mmdit, original_keys.mmdit_rules(mmdit_config.num_layers - 1), f"MMDiT in {path}")
    vae = original_keys.rename(vae, original_keys.vae_rules(len(vae_config.block_out_channels)), f"VAE in {path}")
    checkpoint = Checkpoint(path, Part(mmdit_config, mmdit), Part(vae_config, vae))
    _single_file_text_parts(tensors, checkpoint)
    return checkpoint


def _open_kerashub(folder):
    """A KerasHub preset folder: its tensors renamed to the single-file names, then as a single file."""
    from keras_sd3.weights import kerashub

    config = kerashub.read_config(folder)
    tensors = kerashub.open_tensors(folder, config)
    mmdit, vae = tensors.subset(MMDIT_PREFIX), tensors.subset(VAE_PREFIX)
    texts = {name: tensors.subset(TEXT_PREFIXES[name]) for name in ("clip_l", "clip_g", "t5")}
    if config.get("t5") is None:
        del texts["t5"]
    mmdit_config, vae_config, encoders = kerashub.configure(
        config, original_keys.infer_mmdit_config(mmdit), original_keys.infer_vae_config(vae),
        {name: original_keys.infer_clip_config(texts[name], "gelu", f"{name} in {folder}")
         for name in ("clip_l", "clip_g")},
        original_keys.infer_t5_config(texts["t5"], f"t5 in {folder}") if "t5" in texts else None)
    mmdit = original_keys.rename(mmdit, original_keys.mmdit_rules(mmdit_config.num_layers - 1), f"MMDiT in {folder}")
    vae = original_keys.rename(vae, original_keys.vae_rules(len(vae_config.block_out_channels)), f"VAE in {folder}")
    checkpoint = Checkpoint(folder, Part(mmdit_config, mmdit), Part(vae_config, vae))
    for name, encoder_config in encoders.items():
        setattr(checkpoint, name, Part(encoder_config, texts[name]))
    return checkpoint


def open_checkpoint(source, transformer=None, t5=None):
    """Opens a diffusers-format folder, an original single-file `.safetensors` checkpoint, a KerasHub
    preset folder (`config.json` + `model.weights.h5`) or a preset name.

    `transformer` / `t5`: a `.gguf` or `.safetensors` file holding that part alone, which replaces
    (or, for T5, adds) the source's (`keras_sd3.weights.part_files`); the MMDiT keeps the source's
    native `sample_size`.

    Raises:
        CheckpointError: the source does not exist or is not an SD3 / SD3.5 checkpoint
            (`presets.PresetError` for a preset that is not available).
    """
    source, _ = presets.resolve(source)
    if not os.path.isdir(source):
        checkpoint = _open_single_file(source)
    else:
        from keras_sd3.weights.kerashub import is_kerashub_folder

        checkpoint = _open_kerashub(source) if is_kerashub_folder(source) else _open_folder(source)
    from keras_sd3.weights import part_files

    if transformer is not None:
        config, tensors = part_files.open_transformer(transformer)
        config = dataclasses.replace(config, sample_size=checkpoint.mmdit.config.sample_size)
        checkpoint.mmdit = Part(config, tensors)
    if t5 is not None:
        checkpoint.t5 = Part(*part_files.open_t5(t5))
    return checkpoint
