"""Finding the parts of an SD3 checkpoint: a diffusers folder or an original single file.

`open_checkpoint(source)` returns a `Checkpoint`: the configs of the parts it holds and, for each part,
a lazy `TensorSource` keyed with diffusers names.
"""

import dataclasses
import json
import os

from keras_sd3.models.config import MMDiTConfig, VAEConfig
from keras_sd3.weights import original_keys
from keras_sd3.weights.safetensors_file import CheckpointError, open_safetensors, open_weights

MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclasses.dataclass
class Checkpoint:
    """The parts of one checkpoint, each a config plus a `TensorSource` keyed with diffusers names."""

    path: str
    mmdit_config: MMDiTConfig
    mmdit: object
    vae_config: VAEConfig
    vae: object


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"Missing {path}: is this a diffusers SD3 folder?") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


def _open_folder(folder):
    transformer, vae = os.path.join(folder, "transformer"), os.path.join(folder, "vae")
    try:
        mmdit_config = MMDiTConfig.from_diffusers(_read_json(os.path.join(transformer, "config.json")))
        vae_config = VAEConfig.from_diffusers(_read_json(os.path.join(vae, "config.json")))
    except TypeError as e:
        raise CheckpointError(f"{folder}: a config.json has an unexpected field ({e}).") from None
    return Checkpoint(
        folder,
        mmdit_config,
        open_weights(transformer, "diffusion_pytorch_model"),
        vae_config,
        open_weights(vae, "diffusion_pytorch_model"),
    )


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
    what = f"MMDiT in {path}"
    mmdit = original_keys.rename(mmdit, original_keys.mmdit_rules(mmdit_config.num_layers - 1), what)
    vae = original_keys.rename(vae, original_keys.vae_rules(len(vae_config.block_out_channels)), f"VAE in {path}")
    return Checkpoint(path, mmdit_config, mmdit, vae_config, vae)


def open_checkpoint(source):
    """Opens a diffusers-format folder or an original single-file `.safetensors` checkpoint.

    Raises:
        CheckpointError: the source does not exist or is not an SD3 / SD3.5 checkpoint.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        return _open_folder(source)
    if os.path.isfile(source):
        return _open_single_file(source)
    raise CheckpointError(
        f"{source!r} is neither a diffusers folder nor a .safetensors file."
    )
