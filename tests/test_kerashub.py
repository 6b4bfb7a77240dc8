"""KerasHub preset folders: keras-hub saves a tiny random SD3 with `save_to_preset`; keras_sd3 loads it.

keras-hub runs on the same Keras backend as the test run. Its presets have no T5 (KerasHub ships none).
"""

import json
import os
import shutil
import socket

import keras_hub  # the README's test command installs it (--no-deps, with tensorflow-text, which its CLIP needs)
import numpy as np
import pytest
import tensorflow_text  # noqa: F401
from conftest import assert_close
from tiny_text import train_clip_tokenizer

from keras_sd3 import presets
from keras_sd3.errors import CheckpointError  # noqa: E402
from keras_sd3.models import StableDiffusion3Backbone  # noqa: E402
from keras_sd3.text import StableDiffusion3TextToImagePreprocessor  # noqa: E402

PROMPTS = ["a red circle on a blue background", "Astronaut in a jungle, cold color palette"]


def _vocab_merges(folder):
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [m for m in f.read().splitlines() if m and not m.startswith("#version")]
    return vocab, merges


def _kerashub_clip_preprocessor(folder, name, pad_with_end_token):
    from keras_hub.models import CLIPPreprocessor, CLIPTokenizer

    tokenizer = CLIPTokenizer(*_vocab_merges(folder), pad_with_end_token=pad_with_end_token,
                              config_file=f"{name}_tokenizer.json", name=f"{name}_tokenizer")
    return CLIPPreprocessor(tokenizer, config_file=f"{name}_preprocessor.json", name=f"{name}_preprocessor")


@pytest.fixture(scope="module")
def kerashub_preset(tmp_path_factory):
    """(folder, keras-hub backbone, keras-hub preprocessor): an SD3.5-Medium-like tiny model (qk norm, one dual block)."""
    import keras
    from keras_hub.models import CLIPTextEncoder
    from keras_hub.models import StableDiffusion3Backbone as HubBackbone
    from keras_hub.models import StableDiffusion3TextToImagePreprocessor as HubPreprocessor
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    root = tmp_path_factory.mktemp("kerashub")
    l_size = train_clip_tokenizer(str(root / "tok_l"), "<|endoftext|>")
    g_size = train_clip_tokenizer(str(root / "tok_g"), "!")
    keras.utils.set_random_seed(0)
    vae = VAEBackbone([32, 32, 64, 64], [1, 1, 1, 1], [64, 64, 32, 32], [2, 2, 2, 2], sampler_method="mode", name="vae")
    clip_l = CLIPTextEncoder(l_size, 64, 64, 2, 1, 96, "quick_gelu", -2, name="clip_l")
    clip_g = CLIPTextEncoder(g_size, 128, 128, 2, 2, 96, "gelu", -2, name="clip_g")
    backbone = HubBackbone(2, 128, 2, 2, 12, "rms_norm", (0,), vae, clip_l, clip_g, image_shape=(64, 64, 3))
    # Re-draw every weight (keras-hub zero-initialises biases and adaLN) so a wrong mapping shows.
    rng = np.random.default_rng(1)
    for var in backbone.weights:
        shape = tuple(var.shape)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) >= 2 else 0.1
        var.assign((rng.standard_normal(shape) * scale + (1.0 if "gamma" in var.path else 0.0)).astype("float32"))
    preprocessor = HubPreprocessor(_kerashub_clip_preprocessor(str(root / "tok_l"), "clip_l", True),
                                   _kerashub_clip_preprocessor(str(root / "tok_g"), "clip_g", False))
    folder = str(root / "preset")
    preprocessor.save_to_preset(folder)
    backbone.save_to_preset(folder)
    return folder, backbone, preprocessor


def _np(x):
    import keras

    return keras.ops.convert_to_numpy(x)


def _ids(preprocessor, prompts):
    return {k: _np(v) for k, v in preprocessor.generate_preprocess(prompts).items()}


def test_tokenizers_match_kerashub(kerashub_preset):
    folder, _, hub_preprocessor = kerashub_preset
    preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(folder)
    for prompt in PROMPTS + [""]:
        expected, actual = _ids(hub_preprocessor, [prompt]), preprocessor.generate_preprocess([prompt])
        assert sorted(actual) == ["clip_g", "clip_l"]
        for key in actual:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=f"{key}: {prompt!r}")


def test_steps_match_kerashub(kerashub_preset):
    import keras

    folder, hub, hub_preprocessor = kerashub_preset
    backbone = StableDiffusion3Backbone.from_preset(folder)
    assert backbone.image_shape == (64, 64, 3)
    ids, negative = _ids(hub_preprocessor, PROMPTS), _ids(hub_preprocessor, ["", ""])
    expected, actual = hub.encode_text_step(ids, negative), backbone.encode_text_step(ids, negative)
    for e, a in zip(expected, actual):
        assert_close(_np(a), _np(e), rel=1e-5)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype("float32")
    for step, guidance in ((0, 4.0), (3, 7.0), (5, None)):
        assert_close(_np(backbone.denoise_step(latents, actual, step, 6, guidance)),
                     _np(hub.denoise_step(keras.ops.convert_to_tensor(latents), expected, step, 6, guidance)), rel=1e-5)
    assert_close(_np(backbone.decode_step(latents)), _np(hub.decode_step(keras.ops.convert_to_tensor(latents))), rel=1e-5)


def test_image_shape_and_dtype(kerashub_preset):
    backbone = StableDiffusion3Backbone.from_preset(kerashub_preset[0], image_shape=(32, 48, 3), dtype="bfloat16")
    assert backbone.image_shape == (32, 48, 3) and backbone.latent_shape == (4, 6, 16)
    assert backbone.diffuser.compute_dtype == "bfloat16"


def test_kaggle_cache_lookup_offline(kerashub_preset, tmp_path, monkeypatch):
    name = "stable_diffusion_3.5_medium"
    folder = tmp_path / "kaggle" / "models" / presets.KAGGLE_HANDLES[name]
    shutil.copytree(kerashub_preset[0], folder)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert presets.preset_folder(name) == str(folder)
    backbone = StableDiffusion3Backbone.from_preset(name)
    assert backbone.mmdit_config.dual_attention_layers == (0,)
    assert StableDiffusion3TextToImagePreprocessor.from_preset(name).t5_tokenizer is None


def test_bad_folders(kerashub_preset, tmp_path):
    import h5py

    missing = tmp_path / "missing"
    shutil.copytree(kerashub_preset[0], missing)
    os.remove(missing / "model.weights.h5")
    with pytest.raises(CheckpointError, match="model.weights.h5"):
        StableDiffusion3Backbone.from_preset(str(missing))
    for what, edit, message in (
        ("extra", lambda f: f.create_dataset("layers/mm_di_t/layers/mystery/vars/0", data=np.zeros(3)),
         "layers/mm_di_t/layers/mystery/vars/0"),
        ("dropped", lambda f: f.__delitem__("layers/mm_di_t/layers/dense_1/vars/1"), "proj_out.bias"),
        ("reshaped", lambda f: (f.__delitem__("layers/mm_di_t/layers/dense_1/vars/1"),
                                f.create_dataset("layers/mm_di_t/layers/dense_1/vars/1", data=np.zeros(5))),
         "proj_out.bias"),
    ):
        folder = tmp_path / what
        shutil.copytree(kerashub_preset[0], folder)
        with h5py.File(folder / "model.weights.h5", "r+") as f:
            edit(f)
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
            StableDiffusion3Backbone.from_preset(str(folder))
