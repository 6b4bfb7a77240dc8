"""Text encoders on their own device (`from_preset(..., text_encoders_device=...)`)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_sd3.models import StableDiffusion3TextToImage

PROMPT = {"prompts": "a red circle on a blue background", "negative_prompts": ""}


@pytest.mark.skipif(keras.config.backend() != "jax", reason="the subprocess is jax whatever the suite's backend: "
                    "it runs once, in the jax suite")
def test_text_encoders_on_a_second_jax_device():
    """jax with 2 forced CPU devices (a subprocess, tests/placement_check.py): the text encoders' variables,
    their compiled program's outputs on device 1, the MMDiT and the VAE on device 0; embeddings and images
    identical to the default placement."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "placement_check.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["devices"] == 2
    assert found["text_variables"] == ["cpu:1"] and found["embedding_devices"] == ["cpu:1"]
    assert found["other_variables"] == ["cpu:0"]
    assert found["embeddings_equal"] and found["images_equal"] and found["image_std"] > 1


def test_text_encoders_on_the_cpu_give_the_same_images():
    """On this backend: "cpu" (what a GPU machine would use) puts the text encoders' variables on the CPU
    and changes no pixel."""
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", text_encoders_device="cpu")
    assert task.backbone.text_encoders_device == "cpu"
    for variable in task.backbone.clip_l.variables + task.backbone.clip_g.variables:
        assert "cpu" in str(getattr(variable.value, "device", None) or variable.value.devices()).lower()
    expected = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes").generate(PROMPT, num_steps=2, seed=3)
    np.testing.assert_array_equal(task.generate(PROMPT, num_steps=2, seed=3), expected)


def test_bad_devices_are_refused_before_loading(monkeypatch):
    from keras_sd3.weights import checkpoint

    monkeypatch.setattr(checkpoint, "open_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was opened"))
    with pytest.raises(ValueError, match=r"text_encoders_device='nowhere:7' is not a device of the"):
        StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", text_encoders_device="nowhere:7")


@pytest.mark.skipif(keras.config.backend() != "jax", reason="keras.distribution is jax-only")
def test_refused_under_a_distribution():
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    try:
        with pytest.raises(ValueError, match="does not go with a keras.distribution"):
            StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", text_encoders_device="cpu")
    finally:
        keras.distribution.set_distribution(None)
