"""Runs every code cell of the keras.io guide "Stable Diffusion 3 in KerasHub" against keras_sd3.

The only edits are the ones the issue allows: `keras_sd3` for `keras_hub`, a tiny local checkpoint for
the preset name, the tiny model's image size for 512 x 512, stand-in pictures for the two downloaded
photos, and no shell (`!pip`, `!wget`) lines. `matplotlib` is replaced by a recorder of what was shown.
"""

import os
import re
import sys
import types

import numpy as np
import pytest
from conftest import IMAGE_SHAPE
from PIL import Image
from tiny_text import build_pipeline

GUIDE = os.path.join(os.path.dirname(__file__), "guides", "stable_diffusion_3_in_keras_hub.md")
H, W, _ = IMAGE_SHAPE


def guide_cells():
    with open(GUIDE, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def adapt(code, checkpoint):
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("!"))
    code = code.replace('os.environ["KERAS_BACKEND"] = "jax"', "")
    code = code.replace("keras_hub", "keras_sd3").replace('"stable_diffusion_3_medium"', repr(checkpoint))
    return code.replace("image_shape=(512, 512, 3)", f"image_shape={IMAGE_SHAPE}").replace(
        ".resize((512, 512))", f".resize(({W}, {H}))"
    )


class Shown(list):
    """A stand-in for matplotlib.pyplot that records the images passed to imshow."""

    def __getattr__(self, name):
        return self.append if name == "imshow" else (lambda *args, **kwargs: None)


@pytest.fixture
def guide_environment(tmp_path, monkeypatch):
    build_pipeline(str(tmp_path / "checkpoint"), with_t5=False)
    y, x = np.mgrid[0:512, 0:512] / 512.0
    dog = np.stack([np.sin(6 * x + c) * np.cos(4 * y) for c in range(3)], -1)
    Image.fromarray(((dog + 1) * 127.5).astype(np.uint8)).save(tmp_path / "mountain_dog.png")
    Image.fromarray(((x > 0.4) & (y > 0.3)).astype(np.uint8) * 255).save(tmp_path / "mountain_dog_mask.png")
    monkeypatch.chdir(tmp_path)
    shown = Shown()
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.pyplot = shown
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", shown)
    return str(tmp_path / "checkpoint"), shown


def test_every_guide_cell_runs(guide_environment):
    checkpoint, shown = guide_environment
    cells = guide_cells()
    assert len(cells) >= 10
    namespace = {}
    for cell in cells:
        exec(compile(adapt(cell, checkpoint), GUIDE, "exec"), namespace)
    # The cells display: 1 image, 3 prompts, 3 step counts, 3 negatives, 3 guidance scales,
    # the image-to-image pair, 3 strengths and the inpainting triple, concatenated side by side.
    widths = [np.asarray(image).shape[1] // W for image in shown]
    assert widths == [1, 3, 3, 3, 3, 2, 3, 3]
    for image in shown:
        assert np.asarray(image).shape[0] == H and np.asarray(image).dtype == np.uint8
    assert namespace["generated_image"].shape == IMAGE_SHAPE and namespace["generated_image"].dtype == np.uint8
    assert namespace["text_to_image"].backbone.compute_dtype == "float16"
