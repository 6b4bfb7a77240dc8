"""Runs every code cell of the two keras.io guides ("Stable Diffusion 3 in KerasHub" and "A walk through
latent space with Stable Diffusion 3") against keras_sd3.

The only edits are the ones the issues allow: `keras_sd3` for `keras_hub`, a tiny local checkpoint for
the preset name, the tiny model's image size for 512 x 512, fewer steps and frames, stand-in pictures
for the two downloaded photos, and no shell (`!pip`, `!wget`) lines. `matplotlib` is replaced by a
recorder of what was shown.
"""

import os
import re
import sys
import types

import keras
import numpy as np
import pytest
from conftest import IMAGE_SHAPE
from PIL import Image
from tiny_text import build_pipeline

GUIDES = os.path.join(os.path.dirname(__file__), "guides")
H, W, _ = IMAGE_SHAPE
# The latent-walk guide, made small: image size, 2 steps, 8 frames, a 2 x 2 grid.
WALK_EDITS = {
    "height, width = 512, 512": f"height, width = {H}, {W}",
    "num_steps = 28": "num_steps = 2",
    "interpolation_steps = 8\n": "interpolation_steps = 2\n",  # the grid, before 64 becomes 8
    "interpolation_steps = 64": "interpolation_steps = 8",
    "walk_steps = 64": "walk_steps = 8",
}


def guide_cells(name):
    with open(os.path.join(GUIDES, name), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def adapt(code, checkpoint, edits=()):
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("!")) + "\n"
    code = code.replace('os.environ["KERAS_BACKEND"] = "jax"', "")
    code = code.replace("keras_hub", "keras_sd3").replace('"stable_diffusion_3_medium"', repr(checkpoint))
    code = code.replace("image_shape=(512, 512, 3)", f"image_shape={IMAGE_SHAPE}").replace(
        ".resize((512, 512))", f".resize(({W}, {H}))"
    )
    for old, new in dict(edits).items():
        code = code.replace(old, new)
    return code


class Axes:
    def __init__(self, shown):
        self.imshow = shown.append

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Shown(list):
    """A stand-in for matplotlib.pyplot that records the images passed to imshow and the saved files."""

    def __init__(self):
        super().__init__()
        self.saved = []

    def subplots(self, rows, columns, **kwargs):
        return Axes(self), types.SimpleNamespace(flat=[Axes(self) for _ in range(rows * columns)])

    def savefig(self, fname, **kwargs):
        self.saved.append(fname)

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


def run_guide(name, checkpoint, edits=()):
    """Executes every code cell of guide `name` in one namespace, which it returns."""
    cells = guide_cells(name)
    assert len(cells) >= 10
    namespace = {}
    for cell in cells:
        exec(compile(adapt(cell, checkpoint, edits), name, "exec"), namespace)
    return namespace


def test_every_guide_cell_runs(guide_environment):
    checkpoint, shown = guide_environment
    namespace = run_guide("stable_diffusion_3_in_keras_hub.md", checkpoint)
    # The cells display: 1 image, 3 prompts, 3 step counts, 3 negatives, 3 guidance scales,
    # the image-to-image pair, 3 strengths and the inpainting triple, concatenated side by side.
    widths = [np.asarray(image).shape[1] // W for image in shown]
    assert widths == [1, 3, 3, 3, 3, 2, 3, 3]
    for image in shown:
        assert np.asarray(image).shape[0] == H and np.asarray(image).dtype == np.uint8
    assert namespace["generated_image"].shape == IMAGE_SHAPE and namespace["generated_image"].dtype == np.uint8
    assert namespace["text_to_image"].backbone.compute_dtype == "float16"


def gif_length(path):
    with Image.open(path) as gif:
        return gif.n_frames


def test_every_latent_walk_guide_cell_runs(guide_environment):
    checkpoint, shown = guide_environment
    namespace = run_guide("random_walks_with_stable_diffusion_3.md", checkpoint, WALK_EDITS)
    # GIFs: 5 and 8 frames rubber-banded by the guide's export_as_gif (+ frames[2:-1] reversed), 8 looped.
    assert [gif_length(name) for name in ("dog_to_cat_5.gif", "dog_to_cat_64.gif")] == [7, 13]
    # On torch the guide's walk `positive_embeddings += delta` adds in place to the one tensor it appended
    # each time, so all 8 frames are the last one and Pillow stores them as one GIF frame (the guide's code
    # does the same with KerasHub on torch).
    walk_frames = 1 if keras.config.backend() == "torch" else 13
    assert [gif_length(name) for name in ("eiffel-tower-starry-night.gif", "cows.gif")] == [walk_frames, 8]
    assert shown.saved == ["4-way-interpolation.jpg", "4-way-interpolation-varying-latent.jpg"]
    assert len(shown) == 8 and all(np.asarray(image).shape == IMAGE_SHAPE for image in shown)
    # The guide's own compiled loop gives keras_sd3's text-to-image result for the same noise.
    from keras_sd3.models import StableDiffusion3TextToImage

    task = StableDiffusion3TextToImage(namespace["backbone"], namespace["preprocessor"])
    noise = np.asarray(namespace["ops"].convert_to_numpy(namespace["latents"][0][:1]), np.float32)
    expected = task.generate(namespace["prompt"], num_steps=2, guidance_scale=7.0, latents=noise)
    difference = np.abs(namespace["images"][0].astype(int) - expected.astype(int))
    # Both run in float16 (the guide's dtype) as two separately compiled programs: a rounding apart per
    # value, which two steps and the VAE carry to the pixels. Here: max 1-2 / 255 and mean 0.13-0.25 / 255
    # by backend and CPU (3 / 255 on one CI machine); guidance 6 instead of 7 gives 62 / 255.
    assert difference.max() <= 4, f"cows frame 0 differs from text-to-image by {difference.max()} / 255"
    assert difference.mean() <= 0.5, f"cows frame 0 differs from text-to-image by {difference.mean():.2f} / 255 on average"
