"""Presets: real model names resolved through a (fake) Hugging Face cache with the network disabled,
the documented errors when a model is not available, and the embedded tiny model."""

import socket

import keras
import numpy as np
import pytest
from conftest import IMAGE_SHAPE
from tiny_text import build_pipeline

from keras_sd3 import presets
from keras_sd3.models import StableDiffusion3Backbone, StableDiffusion3TextToImage
from keras_sd3.presets import PresetError

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A hub cache holding a tiny checkpoint under SD3.5 Large Turbo's repository name (huggingface_hub's layout)."""
    hub = tmp_path_factory.mktemp("hub")
    repo = hub / "models--stabilityai--stable-diffusion-3.5-large-turbo"
    build_pipeline(str(repo / "snapshots" / SNAPSHOT), with_t5=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return hub


def test_real_preset_loads_from_the_cache_without_network(fake_hub, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub))
    task = StableDiffusion3TextToImage.from_preset("stable_diffusion_3.5_large_turbo", image_shape=IMAGE_SHAPE)
    assert task.defaults == {"num_steps": 4, "guidance_scale": 0.0, "skip_layer_guidance": None}
    folder = fake_hub / "models--stabilityai--stable-diffusion-3.5-large-turbo" / "snapshots" / SNAPSHOT
    direct = StableDiffusion3Backbone.from_preset(str(folder), image_shape=IMAGE_SHAPE)
    for ours, theirs in zip(task.backbone.weights, direct.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))
    # The preset's defaults (4 steps, no CFG) are what generate() uses when given nothing.
    implicit = task.generate("a red circle", seed=1)
    explicit = task.generate("a red circle", seed=1, num_steps=4, guidance_scale=0.0)
    np.testing.assert_array_equal(implicit, explicit)
    assert np.abs(implicit.astype(int) - task.generate("a red circle", seed=1, num_steps=4, guidance_scale=7.0)).max() > 2


def test_offline_and_not_cached_says_how_to_get_the_weights(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PresetError, match="not in the Hugging Face cache") as error:
        StableDiffusion3Backbone.from_preset("stable_diffusion_3_medium")
    message = str(error.value)
    assert "huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers" in message and "HF_TOKEN" in message


def test_failed_download_says_how_to_get_the_weights(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    def gated(repo_id, **kwargs):
        assert "*/*.safetensors" in kwargs["allow_patterns"]
        raise RuntimeError(f"401 Client Error: access to {repo_id} is restricted")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PresetError, match=r"Could not download stabilityai/stable-diffusion-3.5-medium .*401.*licence"):
        StableDiffusion3Backbone.from_preset("stable_diffusion_3.5_medium")


def test_unknown_name_lists_the_presets():
    with pytest.raises(PresetError, match=r"neither a diffusers folder.*sd3_tiny_shapes.*stable_diffusion_3_medium"):
        StableDiffusion3Backbone.from_preset("stable_diffusion_4")


def test_preset_defaults_follow_the_model_cards():
    medium = presets.PRESETS["stable_diffusion_3.5_medium"]
    assert (medium.num_steps, medium.guidance_scale, medium.skip_layer_guidance) == (40, 4.5, True)
    assert presets.PRESETS["stable_diffusion_3.5_large"].guidance_scale == 3.5
    assert presets.PRESETS["stable_diffusion_3_medium"].repo_id == "stabilityai/stable-diffusion-3-medium-diffusers"


def test_embedded_preset_loads_offline_and_is_small(no_network):
    import os

    folder = presets.preset_folder("sd3_tiny_shapes")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert size <= 20 * 2**20, f"the embedded preset is {size / 2**20:.1f} MiB"
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    assert task.backbone.image_shape == (64, 64, 3) and task.backbone.t5 is None
    assert task.defaults["num_steps"] == presets.PRESETS["sd3_tiny_shapes"].num_steps


def test_embedded_model_draws_the_prompted_colours_and_shapes():
    """A subset of benchmarks/evaluate_shapes.py (48 prompts there; numbers in BENCHMARKS.md)."""
    from keras_sd3.training import evaluate

    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    _, result = evaluate.evaluate(task, count=12)
    # Lower bounds well under the measured 48-prompt accuracies, far above chance (1/56 and 1/3).
    assert result["color_accuracy"] >= 0.8, result
    assert result["shape_accuracy"] >= 0.6, result


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "sd3_tiny_shapes").mkdir()
    monkeypatch.chdir(tmp_path)
    assert presets.resolve("sd3_tiny_shapes") == (presets.preset_folder("sd3_tiny_shapes"), presets.PRESETS["sd3_tiny_shapes"])
    assert presets.resolve("./sd3_tiny_shapes") == ("./sd3_tiny_shapes", None)
