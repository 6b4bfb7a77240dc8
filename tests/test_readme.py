"""The README's examples run as written on the embedded model.

Every ```python block runs, in order, in one namespace, with only the edits the guide tests make:
the embedded preset for a real model's path, its 64 x 64 size, fewer steps, frames and pictures.
The first command-line block runs line by line, and its inpainting must visibly repaint the mask.
"""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from keras_sd3 import cli, media
from keras_sd3.training import shapes

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
EDITS = {
    '"path/to/stable-diffusion-3-medium-diffusers"': '"sd3_tiny_shapes"',
    "512, 512": "64, 64",
    "num_steps=28": "num_steps=2",
    "num_steps = 28": "num_steps = 2",
    "shapes_dataset(1024": "shapes_dataset(16",
    "steps=200": "steps=2",
    "steps=500": "steps=2",
    "batch_size=64": "batch_size=8",
    "num_frames=16": "num_frames=3",
    '"a cat", 32,': '"a cat", 3,',
    '"cows in a field", 32,': '"cows in a field", 3,',
    "size=4": "size=2",
    "columns=4": "columns=2",
}


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def blocks(language, text=None):
    return re.findall(rf"```{language}\n(.*?)```", text or readme(), flags=re.S)


def test_every_python_block_runs(tmp_path, monkeypatch):
    from conftest import embedded_controlnet, embedded_lora

    monkeypatch.chdir(tmp_path)
    embedded_controlnet("path/to/SD3-Controlnet-Canny")  # a random ControlNet shaped for the embedded model
    embedded_lora("path/to/style.safetensors")
    embedded_lora("path/to/detail.safetensors", seed=1)
    code = blocks("python")
    assert len(code) >= 4
    namespace = {}
    for block in code:
        for old, new in EDITS.items():
            block = block.replace(old, new)
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (1, 64, 64, 3)  # the last block: one frame from `noise`
    assert namespace["image"].shape == (64, 64, 3) and namespace["image"].dtype == np.uint8
    assert media.read_metadata("grid.png")["seed"] == 1 and os.path.getsize("cows.gif") > 0
    assert os.path.isfile(os.path.join("my_shapes_model", "model_index.json"))


def test_the_command_line_block_runs_and_inpainting_repaints_the_mask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    section = readme().split("## The command line", 1)[1]
    lines = [line for line in blocks("bash", section)[0].splitlines() if line.strip()]
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[0] == "keras-sd3":
            assert cli.main(words[1:]) == 0, line
        else:
            assert words[0] == "python", line
            subprocess.run([sys.executable, *words[1:]], check=True, timeout=60)
    assert [media.read_metadata(f"square-{k}.jpg")["seed"] for k in range(1, 5)] == [7, 8, 9, 10]
    before, after = (np.asarray(Image.open(p), np.float64) for p in ("triangle.png", "inpainted.png"))
    mask = np.asarray(Image.open("mask.png")) > 127
    assert mask[:, 32:].all() and not mask[:, :32].any()
    np.testing.assert_array_equal(after[:, :28], before[:, :28])  # more than 4 pixels from the mask
    change = np.abs(after - before)[mask].mean()
    assert change > 20, f"the masked half changed by only {change:.1f} / 255 on average"
    red = after[6:26, 38:58].mean(axis=(0, 1))  # the asked-for red square, top right
    assert red[0] > 150 and red[1] < 80 and red[2] < 80, red


def test_the_readme_names_the_embedded_models_words():
    """Item 9: every caption word is named in the README; the list is checked against captions drawn."""
    rng = np.random.default_rng(0)
    drawn = {word for _ in range(3000) for word in shapes.random_scene(rng).caption().split()}
    assert set(shapes.caption_words()) == drawn
    section = readme().split("**What to write.**", 1)[1].split("\n\n", 2)
    text = " ".join(section[:2])
    missing = [word for word in sorted(drawn) if not re.search(rf"\b{word}\b", text)]
    assert not missing, f"the README does not name {missing}"
    from keras_sd3.presets import EMBEDDED, folder_settings

    assert folder_settings(os.path.join(EMBEDDED, "sd3_tiny_shapes"))["vocabulary"] == sorted(drawn)


@pytest.mark.parametrize("command", [0, 1])
def test_the_set_up_commands_use_the_embedded_model_and_the_tests(command):
    """The two set-up commands the README promises (the second is what CI runs)."""
    setup = blocks("bash", readme().split("## Set-up", 1)[1])[command]
    assert "pip install" in setup and "torch==" in setup
    assert ("keras-sd3 generate" in setup) if command == 0 else ("pytest" in setup and ".[test]" in setup)
