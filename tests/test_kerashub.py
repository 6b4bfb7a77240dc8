"""KerasHub preset folders: keras-hub saves a tiny random SD3 with `save_to_preset`; keras_sd3 loads it.

keras-hub runs on the same Keras backend as the test run, except for the preset with T5: keras-hub's
`T5Encoder` cannot be built on torch, so that preset and keras-hub's outputs on it come from a jax
subprocess (tests/kerashub_tiny.py) on every backend. KerasHub ships no T5 in its own presets.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import keras_hub  # noqa: F401  (the README's test command installs it --no-deps, with tensorflow-text)
import numpy as np
import pytest
from conftest import assert_close
from kerashub_tiny import (BANG_PAIR, BANG_PROMPTS, GUIDANCE, NEGATIVE, PROMPTS, STEPS, T5_LENGTH, build, hub_images,
                           noise)

from keras_sd3 import presets
from keras_sd3.errors import CheckpointError
from keras_sd3.models import StableDiffusion3Backbone
from keras_sd3.tasks import StableDiffusion3TextToImage
from keras_sd3.text import StableDiffusion3TextToImagePreprocessor
from keras_sd3.text.tokenizers import CLIPTokenizer
from keras_sd3.weights import kerashub

IMAGE_TOLERANCE = 2  # /255, the bound for images from the same noise


@pytest.fixture(scope="module")
def kerashub_preset(tmp_path_factory):
    """(folder, keras-hub backbone, keras-hub preprocessor): an SD3.5-Medium-like tiny model without T5."""
    return build(tmp_path_factory.mktemp("kerashub"))


@pytest.fixture(scope="module")
def kerashub_t5_preset(tmp_path_factory):
    """(folder, keras-hub's reference outputs): the tiny model with a T5 encoder, saved in ~1 MB shards."""
    root = tmp_path_factory.mktemp("kerashub_t5")
    script = os.path.join(os.path.dirname(__file__), "kerashub_tiny.py")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    subprocess.run([sys.executable, script, str(root)], env=env, check=True, capture_output=True, timeout=600)
    return str(root / "preset"), dict(np.load(root / "reference.npz"))


def _np(x):
    import keras

    return keras.ops.convert_to_numpy(x)


def _ids(preprocessor, prompts):
    return {k: _np(v) for k, v in preprocessor.generate_preprocess(prompts).items()}


def test_tokenizers_match_kerashub(kerashub_preset):
    """Token ids equal keras-hub's, "!" (CLIP-G's id-0 pad token) included: keras-hub byte-pair-encodes it
    where transformers would make it a special token (BANG_PROMPTS: "!!", "!!!", "?!", a trailing "!",
    upper case, the empty prompt, one of over 77 tokens)."""
    folder, _, hub_preprocessor = kerashub_preset
    preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(folder)
    # (the prompts tell the two rules apart: with "!" special, as for a diffusers folder, CLIP-G's ids differ)
    vocab, merges, pad = kerashub.tokenizer_assets(folder)["clip_g"]
    as_transformers = CLIPTokenizer(vocab, merges, pad_token=pad)
    assert (as_transformers(BANG_PROMPTS[:4]) != _ids(hub_preprocessor, BANG_PROMPTS[:4])["clip_g"]).any(axis=1).all()
    for prompt in PROMPTS + BANG_PROMPTS:
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
    # Both steps get keras-hub's embeddings. Guidance g multiplies the two passes' float32 rounding
    # differences by g: at g = 7 the step differs by 0.6-0.8e-5 relative on every backend (once 1.06e-5
    # on tensorflow, whose oneDNN matmuls round differently under load), hence 2e-5 there, 1e-5 elsewhere.
    for step, guidance, tolerance in ((0, 4.0, 1e-5), (3, 7.0, 2e-5), (5, None, 1e-5)):
        assert_close(_np(backbone.denoise_step(latents, expected, step, 6, guidance)),
                     _np(hub.denoise_step(keras.ops.convert_to_tensor(latents), expected, step, 6, guidance)),
                     rel=tolerance)
    assert_close(_np(backbone.decode_step(latents)), _np(hub.decode_step(keras.ops.convert_to_tensor(latents))), rel=1e-5)


def _generate(folder, prompts=PROMPTS, negative=NEGATIVE):
    """keras_sd3's text-to-image from `noise()`, loaded from the KerasHub folder alone."""
    task = StableDiffusion3TextToImage.from_preset(folder)
    return task.generate({"prompts": list(prompts), "negative_prompts": list(negative)}, num_steps=STEPS,
                         guidance_scale=GUIDANCE, latents=noise())


def _assert_images_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.uint8
    assert expected.std() > 20  # not a flat image
    difference = np.abs(actual.astype(int) - expected.astype(int)).max()
    assert difference <= IMAGE_TOLERANCE, f"images differ by {difference}/255"


@pytest.mark.parametrize("prompts", [(PROMPTS, NEGATIVE), BANG_PAIR], ids=["plain", "bang"])
def test_text_to_image_matches_kerashub(kerashub_preset, prompts):
    """keras-hub's own `generate()` (its noise replaced by ours) vs keras_sd3's, same prompts and settings.

    Both run the same Euler flow-matching schedule and CFG; no difference by design for text-to-image
    (KerasHub's image-to-image starts at another step, so only text-to-image is compared).
    """
    folder, hub, hub_preprocessor = kerashub_preset
    _assert_images_close(_generate(folder, *prompts), hub_images(hub, hub_preprocessor, noise(), *prompts))


def test_t5_preset_matches_kerashub(kerashub_t5_preset):
    folder, reference = kerashub_t5_preset
    assert not os.path.exists(os.path.join(folder, "model.weights.h5"))
    assert len([f for f in os.listdir(folder) if f.startswith("model_")]) > 3  # read through model.weights.json
    preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(folder)
    ids, negative = preprocessor.generate_preprocess(PROMPTS), preprocessor.generate_preprocess(NEGATIVE)
    assert ids["t5"].shape == (len(PROMPTS), T5_LENGTH)
    for key in ("clip_l", "clip_g", "t5"):
        np.testing.assert_array_equal(ids[key], reference[f"ids_{key}"], err_msg=key)
        np.testing.assert_array_equal(negative[key], reference[f"negative_{key}"], err_msg=key)
    for i, prompt in enumerate(BANG_PROMPTS):
        for key, ids_ in preprocessor.generate_preprocess([prompt]).items():
            np.testing.assert_array_equal(ids_, reference[f"bang_{i}_{key}"], err_msg=f"{key}: {prompt!r}")
    backbone = StableDiffusion3Backbone.from_preset(folder)
    assert backbone.t5.config.dense_act_fn == "gelu"  # keras-hub's "gelu" is the exact one
    for i, embedding in enumerate(backbone.encode_text_step(ids, negative)):
        assert_close(_np(embedding), reference[f"embedding_{i}"], rel=1e-5)
    _assert_images_close(_generate(folder), reference["images"])
    _assert_images_close(_generate(folder, *BANG_PAIR), reference["bang_images"])


def test_bad_t5_and_shard_index(kerashub_t5_preset, tmp_path):
    for what, edit, message in (
        ("relu", lambda c: c["config"]["t5"]["config"].update(activation="relu"), "activation 'relu'"),
        ("ungated", lambda c: c["config"]["t5"]["config"].update(use_gated_activation=False), "gated: False"),
    ):
        folder = tmp_path / what
        shutil.copytree(kerashub_t5_preset[0], folder)
        with open(folder / "config.json") as f:
            config = json.load(f)
        edit(config)
        with open(folder / "config.json", "w") as f:
            json.dump(config, f)
        with pytest.raises(CheckpointError, match=message):
            StableDiffusion3Backbone.from_preset(str(folder))
    folder = tmp_path / "index"
    shutil.copytree(kerashub_t5_preset[0], folder)
    (folder / "model.weights.json").write_text('{"weight_map": 3}')
    with pytest.raises(CheckpointError, match="model.weights.json is not a valid Keras sharded-weights index"):
        StableDiffusion3Backbone.from_preset(str(folder))


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
