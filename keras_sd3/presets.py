"""Preset names -> checkpoint folders: the embedded tiny model, and the real SD3 / SD3.5 models.

The real models resolve through the local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`,
else `~/.cache/huggingface/hub`, the layout `huggingface_hub` writes) and are downloaded with
`huggingface_hub` only when they are not cached and the machine is online (`HF_HUB_OFFLINE` unset).
Each preset carries its recommended generation defaults, which the tasks' `from_preset` applies;
a checkpoint folder's own `model_index.json` may carry them too (`folder_settings`), and those win.
"""

import dataclasses
import json
import os

from keras_sd3.errors import PresetError

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
# Only the diffusers parts: the repositories also hold multi-GB single files that are not needed.
DOWNLOAD_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model and its recommended generation settings.

    Attributes:
        repo_id: the Hugging Face repository (diffusers format), or None for an embedded preset.
        num_steps, guidance_scale: recommended steps and CFG scale (<= 1: no CFG).
        skip_layer_guidance: use skip-layer guidance (diffusers' SD3.5 Medium recommendation).
    """

    name: str
    description: str
    repo_id: str = None
    num_steps: int = 28
    guidance_scale: float = 7.0
    skip_layer_guidance: bool = False

    @property
    def defaults(self):
        return {"num_steps": self.num_steps, "guidance_scale": self.guidance_scale,
                "skip_layer_guidance": self.skip_layer_guidance or None}


PRESETS = {
    preset.name: preset
    for preset in (
        Preset("sd3_tiny_shapes", "Embedded 64 x 64 toy SD3 trained by keras_sd3 on coloured shapes (no T5).",
               num_steps=20, guidance_scale=4.0),
        Preset("stable_diffusion_3_medium", "SD3 Medium (2B).", "stabilityai/stable-diffusion-3-medium-diffusers",
               28, 7.0),
        Preset("stable_diffusion_3.5_medium", "SD3.5 Medium (2.5B, MMDiT-X).", "stabilityai/stable-diffusion-3.5-medium",
               40, 4.5, skip_layer_guidance=True),
        Preset("stable_diffusion_3.5_large", "SD3.5 Large (8B).", "stabilityai/stable-diffusion-3.5-large", 28, 3.5),
        Preset("stable_diffusion_3.5_large_turbo", "SD3.5 Large Turbo (8B, 4 steps, no CFG).",
               "stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0),
    )
}


# The entries keras_sd3 reads from the "_keras_sd3" block of a folder's model_index.json.
GENERATION_SETTINGS = ("num_steps", "guidance_scale", "skip_layer_guidance")


def folder_settings(path):
    """The "_keras_sd3" block of `path`'s `model_index.json` ({} for a file or a folder without one).

    It holds what a checkpoint says about itself beyond diffusers' configs: `t5_zero_tokens`, the
    recommended `num_steps` / `guidance_scale` / `skip_layer_guidance`, and for a model trained on a
    closed set of caption words, that `vocabulary`.
    """
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    try:
        with open(index) as f:
            block = json.load(f).get("_keras_sd3", {})
    except (OSError, ValueError, AttributeError) as error:
        raise PresetError(f"{index} is not a readable JSON object ({error}).") from None
    return block if isinstance(block, dict) else {}


def generation_defaults(path, preset=None):
    """Recommended `{"num_steps", "guidance_scale", "skip_layer_guidance"}` for a checkpoint: the folder's
    own (`folder_settings`), else its preset's, else {} (the tasks then use KerasHub's)."""
    defaults = dict(preset.defaults) if preset is not None else {}
    defaults.update({k: v for k, v in folder_settings(path).items() if k in GENERATION_SETTINGS})
    return defaults


def hub_cache():
    """The Hugging Face hub cache folder, as `huggingface_hub` computes it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_snapshot(repo_id, cache=None):
    """The cached snapshot folder of `repo_id` (the `main` revision if recorded), or None."""
    repo = os.path.join(cache or hub_cache(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo, "snapshots")
    if not os.path.isdir(snapshots):
        return None
    main = os.path.join(repo, "refs", "main")
    if os.path.isfile(main):
        with open(main) as f:
            folder = os.path.join(snapshots, f.read().strip())
        candidates = [folder]
    else:
        candidates = sorted((os.path.join(snapshots, d) for d in os.listdir(snapshots)), key=os.path.getmtime)[::-1]
    return next((c for c in candidates if os.path.isdir(os.path.join(c, "transformer"))), None)


# KerasHub's preset name -> Kaggle model handle (keras_hub's stable_diffusion_3_presets.py).
KAGGLE_HANDLES = {
    "stable_diffusion_3_medium": "keras/stablediffusion3/keras/stable_diffusion_3_medium/5",
    "stable_diffusion_3.5_medium": "keras/stablediffusion-3.5/keras/stable_diffusion_3.5_medium/1",
    "stable_diffusion_3.5_large": "keras/stablediffusion-3.5/keras/stable_diffusion_3.5_large/3",
    "stable_diffusion_3.5_large_turbo": "keras/stablediffusion-3.5/keras/stable_diffusion_3.5_large_turbo/3",
}


def kaggle_cache():
    """The kagglehub cache folder, as `kagglehub` computes it (`KAGGLEHUB_CACHE`, else ~/.cache/kagglehub)."""
    return os.environ.get("KAGGLEHUB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kagglehub")


def cached_kaggle_preset(name, cache=None):
    """The KerasHub preset folder of `name` in the kagglehub cache, or None.

    kagglehub stores model `owner/model/framework/variation/version` in
    `{cache}/models/owner/model/framework/variation/version/`; KerasHub's own version is looked at
    first, then the newest other cached version. A folder counts once its `config.json` and weights are there.
    """
    owner, model, framework, variation, version = KAGGLE_HANDLES[name].split("/")
    variation_folder = os.path.join(cache or kaggle_cache(), "models", owner, model, framework, variation)
    if not os.path.isdir(variation_folder):
        return None
    others = sorted((v for v in os.listdir(variation_folder) if v.isdigit() and v != version), key=int, reverse=True)
    for candidate in (os.path.join(variation_folder, v) for v in (version, *others)):
        weights = ("model.weights.h5", "model.weights.json")
        if os.path.isfile(os.path.join(candidate, "config.json")) and any(
                os.path.isfile(os.path.join(candidate, w)) for w in weights):
            return candidate
    return None


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _how_to_get(preset):
    return (f"Download it once while online (gated: accept the licence at https://huggingface.co/{preset.repo_id} "
            "and log in with `hf auth login` or set HF_TOKEN), e.g. `keras_sd3.presets.download"
            f"(\"{preset.name}\")`, or pass the path of a local diffusers folder or .safetensors file instead.")


def download(name):
    """Downloads a real preset's diffusers files into the Hugging Face cache; returns the folder."""
    preset = PRESETS[name]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PresetError(f"Downloading {name} needs huggingface_hub: pip install huggingface_hub. "
                          + _how_to_get(preset)) from None
    try:
        return snapshot_download(preset.repo_id, allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as error:  # network, authentication (gated repository), disk
        raise PresetError(f"Could not download {preset.repo_id} for preset {name!r}: "
                          f"{type(error).__name__}: {error}. " + _how_to_get(preset)) from None


def preset_folder(name):
    """A preset name -> its local folder: embedded; else the Hugging Face cache's diffusers folder; else
    the KerasHub preset folder that keras-hub downloaded into the kagglehub cache; else downloaded from
    Hugging Face when online.

    Raises:
        PresetError: unknown name, or a real model that is not cached while offline (or whose
            download fails); the message says how to get the weights.
    """
    if name not in PRESETS:
        raise PresetError(f"Unknown preset {name!r}; the presets are {sorted(PRESETS)}.")
    preset = PRESETS[name]
    if preset.repo_id is None:
        return os.path.join(EMBEDDED, name)
    folder = cached_snapshot(preset.repo_id)
    if folder is None and name in KAGGLE_HANDLES:
        folder = cached_kaggle_preset(name)
    if folder is not None:
        return folder
    if _offline():
        raise PresetError(f"Preset {name!r} ({preset.repo_id}) is not in the Hugging Face cache ({hub_cache()}) nor "
                          f"KerasHub's Kaggle cache ({kaggle_cache()}) and HF_HUB_OFFLINE is set. " + _how_to_get(preset))
    return download(name)


def resolve(source):
    """A preset name, a folder or a file -> `(local path, Preset or None)`.

    A preset name wins over a folder of the same name in the working directory (write
    `./sd3_tiny_shapes` for the folder).
    """
    source = os.fspath(source)
    if source in PRESETS:
        return preset_folder(source), PRESETS[source]
    if os.path.exists(source):
        return source, None
    raise PresetError(f"{source!r} is neither a diffusers folder, a .safetensors file nor a preset "
                      f"({', '.join(sorted(PRESETS))}).")
