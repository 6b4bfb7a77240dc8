"""keras_sd3 over several devices with `keras.distribution` (jax): sharded outputs equal one device's.

The 8-device checks run in a subprocess (tests/distribution_check.py) that forces 8 XLA CPU devices
before jax starts, so the rest of the suite keeps its single device.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import TINY_MMDIT, TINY_VAE

from keras_sd3 import distribution
from keras_sd3.distribution.layout import rule_kind
from keras_sd3.models import CLIPConfig, MMDiTConfig, StableDiffusion3Backbone, T5Config, VAEConfig
from keras_sd3.weights.assign import build_then_load

JAX = keras.config.backend() == "jax"
EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_sd3", "embedded",
                        "sd3_tiny_shapes")
MAX_RELATIVE = 1e-5  # float32 sums split over devices are added in another order: ~2e-6 measured
# Variables that stay replicated by design: small embedders, the patch conv, the output projection,
# T5's relative position table, norms (1-D, not listed).
REPLICATED = ("diffuser/time_text_embed/", "diffuser/pos_embed/proj/", "diffuser/proj_out/",
              "/relative_attention_bias/", "/norm_q/", "/norm_k/", "/norm_added_q/", "/norm_added_k/")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distribution")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribution_check.py")
    result = subprocess.run([sys.executable, script, str(folder)], capture_output=True, text=True, timeout=1200,
                            env=dict(os.environ, KERAS_BACKEND="jax"))
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not JAX, reason="keras.distribution is a jax feature; other backends: test_needs_jax")
def test_model_parallel_equals_one_device(eight_devices):
    assert eight_devices["devices"] == 8
    runs = eight_devices["model_parallel"]
    assert {name.split()[0] for name in runs} == {"sd3", "sd35_medium", "sd35_large"}
    assert {name.split()[1] for name in runs} == {"2x4", "4x2", "1x8"}
    for name, run in runs.items():
        worst = max(run["relative_difference"].values())
        assert worst <= MAX_RELATIVE, (name, run["relative_difference"])
        assert not run["wrong_shardings"], (name, run["wrong_shardings"][:5])
        assert not run["uneven_shards"], (name, run["uneven_shards"][:5])  # each device: 1/model of each split
        assert run["split_variables"] >= 140, (name, run["split_variables"])
        assert run["bytes_host_to_one_device"] == 0, name  # loading went straight into the shards


@pytest.mark.skipif(not JAX, reason="keras.distribution is a jax feature; other backends: test_needs_jax")
def test_quantized_model_parallel_equals_one_device(eight_devices):
    """int8 / int4 kernels and their scales are split as the float kernels are (each device holds
    1/model of each), and the split model computes what the quantized model computes on one device."""
    runs = eight_devices["quantized_parallel"]
    assert sorted(runs) == ["int4 1x8", "int4 2x4", "int8 1x8", "int8 2x4"]
    for name, run in runs.items():
        assert run["relative_difference"] <= MAX_RELATIVE, (name, run)
        assert not run["wrong_shardings"], (name, run["wrong_shardings"][:5])
        assert not run["uneven_shards"], (name, run["uneven_shards"][:5])
        assert run["split_int_kernels"] >= 60, (name, run)
        if name.startswith("int8"):
            assert run["split_scales"] >= 30, (name, run)  # (int4's (groups, out) scales: split by columns too)


@pytest.mark.skipif(not JAX, reason="keras.distribution is a jax feature; other backends: test_needs_jax")
def test_layout_map_says_what_is_done(eight_devices):
    """At the real models' shapes every variable's layout is the fresh `get_layout_map(mesh)` entry for its
    path: CLIP's 77-row position table replicated (2, 4 and 8 do not divide 77), T5's 32,128-row
    vocabulary and the MMDiT's 192² positions split by rows, SD3.5 Large's 38 heads split by columns.
    (The tiny models' shardings are checked against the distribution's map in the test above.)"""
    runs = eight_devices["real_shapes"]
    assert len(runs) == 9, sorted(runs)
    for name, run in runs.items():
        assert not run["wrong"], (name, run["wrong"][:5])
        assert run["clip_positions"] == [None, None], name
        assert run["t5_vocabulary"] == ["model", None], name
        assert run["mmdit_positions"] == [None, "model", None], name


@pytest.mark.skipif(not JAX, reason="keras.distribution is a jax feature; other backends: test_needs_jax")
def test_data_parallel_equals_one_device(eight_devices):
    data = eight_devices["data_parallel"]
    assert data["shapes"] == [[8, 64, 64, 3], [16, 64, 64, 3]]
    assert data["images"] <= 1 and data["frames"] <= 1, data  # 8 prompts; a 16-frame circular walk
    assert data["new_traces"] == 0  # compiled once: other prompts and step counts reuse the program
    # A ControlNet task splits its batch too: 3 prompts padded to 8 devices, as one device; its callback
    # sees the 3 real images; the (random) ControlNet changes the images.
    assert data["controlnet"] <= 1 and data["controlnet_shape"] == [3, 64, 64, 3], data
    assert data["controlnet_callback_batches"] == [3] and data["controlnet_changes_images"] > 10, data
    assert data["controlnet_split_batches"] == [8], data  # latents, embeddings and control latents, padded


@pytest.mark.skipif(not JAX, reason="keras.distribution is a jax feature; other backends: test_needs_jax")
def test_bad_meshes_name_the_problem(eight_devices):
    errors = eight_devices["errors"]
    assert "no axis 'batch'" in errors["no batch axis"] and "['data', 'model']" in errors["no batch axis"]
    width = errors["width"]  # the first split tensor of the embedded model: 128 columns over 3 devices
    assert "diffuser/context_embedder/kernel cannot be split over the mesh axis 'model' of size 3" in width
    assert "dimension 1 (128 of shape (192, 128))" in width
    warned = errors["heads warning"]  # 2 heads over 4 devices: split by columns, with a warning each part
    assert any(w.startswith("The diffuser's 2 attention heads do not divide into the 4 devices") for w in warned)
    assert errors["heads split images"] <= 1  # and the images are still one device's


def test_needs_jax():
    """On one device under jax a distribution changes nothing; elsewhere it is a clear error."""
    from keras_sd3.models import StableDiffusion3TextToImage

    plain = StableDiffusion3TextToImage.from_preset(EMBEDDED).generate("a red circle", num_steps=2, seed=0)
    mesh = keras.distribution.DeviceMesh((1,), ["batch"], ["cpu:0"])
    keras.distribution.set_distribution(keras.distribution.DataParallel(device_mesh=mesh))
    try:
        if JAX:
            image = StableDiffusion3TextToImage.from_preset(EMBEDDED).generate("a red circle", num_steps=2, seed=0)
            assert np.array_equal(image, plain)
        else:
            with pytest.raises(ValueError, match="feature of Keras' jax backend; this is"):
                StableDiffusion3TextToImage.from_preset(EMBEDDED)
    finally:
        keras.distribution.set_distribution(None)
    if not JAX:
        with pytest.raises(ValueError, match="Use KERAS_BACKEND=jax"):
            distribution.set_mesh("2x1")


@pytest.mark.parametrize("text, expected", [("1x8", (1, 8)), ("8x1", (8, 1)), (" 2X4 ", (2, 4))])
def test_parse_mesh(text, expected):
    assert distribution.parse_mesh(text) == expected


@pytest.mark.parametrize("text", ["8", "0x2", "2x", "axb", "2x4x1"])
def test_parse_mesh_refuses(text):
    with pytest.raises(ValueError, match="A mesh is 'BxM'"):
        distribution.parse_mesh(text)


@pytest.mark.parametrize("variant", ["sd3", "sd35_medium"])
def test_every_large_variable_has_a_rule(variant):
    """Paths read like the checkpoint, and every large variable of the MMDiT and text encoders is split by
    a rule of the layout tables, except the few replicated by design."""
    mmdit = dict(TINY_MMDIT, qk_norm="rms_norm", dual_attention_layers=(0,)) if variant == "sd35_medium" else TINY_MMDIT
    clip = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                projection_dim=64)
    t5 = dict(vocab_size=100, d_model=256, d_kv=8, d_ff=96, num_layers=2, num_heads=4)
    backbone = build_then_load(lambda: StableDiffusion3Backbone(
        MMDiTConfig.from_diffusers(mmdit), VAEConfig.from_diffusers(TINY_VAE), CLIPConfig(**clip),
        CLIPConfig(**dict(clip, hidden_size=128, projection_dim=128)), T5Config(**t5)), lambda backbone: None)
    paths = {variable.path for variable in backbone.variables}
    assert "diffuser/transformer_blocks_2/attn/to_q/kernel" in paths
    assert "t5/encoder/block_1/layer_1/DenseReluDense/wi_0/kernel" in paths
    assert "clip_g/text_model/encoder/layers_1/mlp/fc2/kernel" in paths
    assert len(paths) == len(backbone.variables)  # unique
    unmatched = [variable.path for variable in backbone.variables
                 if not variable.path.startswith("vae/") and len(variable.shape) >= 2 and np.prod(variable.shape) >= 4096
                 and rule_kind(variable.path) is None and not any(part in variable.path for part in REPLICATED)]
    assert not unmatched, unmatched
