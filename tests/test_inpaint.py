"""Inpainting on the embedded `sd3_tiny_shapes`: `keep_unmasked`, mask size and empty-mask checks."""

import warnings

import keras
import numpy as np
import pytest

from keras_sd3.models import StableDiffusion3Inpaint
from keras_sd3.tasks.inpaint import overlay_alpha
from keras_sd3.tasks.task import from_uint8

H = W = 64
STEPS = 4
PROMPTS = ["a red circle on a blue background", "a red square in the top left on a blue background"]


@pytest.fixture(scope="module")
def task():
    return StableDiffusion3Inpaint.from_preset("sd3_tiny_shapes")


def blue_pictures(batch):
    pictures = np.zeros((batch, H, W, 3), np.uint8)
    pictures[..., 2] = 255
    return pictures


def masks():
    """A disc in the centre and a square in the top left."""
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 14**2
    square = (yy >= 4) & (yy < 28) & (xx >= 4) & (xx < 28)
    return np.stack([disc, square])


def chebyshev_distance(mask):
    """Each pixel's distance max(|dy|, |dx|) to the nearest masked pixel, by brute force."""
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[:H, :W]
    return np.min(np.maximum(np.abs(yy[..., None] - ys), np.abs(xx[..., None] - xs)), axis=-1)


class Forbidden:
    """Stands in for a model part that must not be used: any call or attribute raises."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.name} was called")

    def __getattr__(self, attribute):
        raise AssertionError(f"{self.name}.{attribute} was used")


def inpaint(task, **options):
    pictures = blue_pictures(2)
    inputs = {"images": from_uint8(pictures), "masks": masks(), "prompts": PROMPTS}
    return pictures, task.generate(inputs, num_steps=STEPS, strength=1.0, seed=0, **options)


def test_keep_unmasked_keeps_the_input_outside_and_repaints_inside(task):
    pictures, outputs = inpaint(task, keep_unmasked=True)
    assert outputs.shape == (2, H, W, 3) and outputs.dtype == np.uint8
    for picture, output, mask in zip(pictures, outputs, masks()):
        far = chebyshev_distance(mask) > 4
        np.testing.assert_array_equal(output[far], picture[far])
        inside = np.abs(output[mask].astype(float) - picture[mask]).mean() / 255
        assert inside > 20 / 255, f"the masked area hardly changed: mean abs difference {inside:.3f}"


def test_by_default_pixels_outside_change(task):
    pictures, outputs = inpaint(task)  # keep_unmasked=False, as KerasHub
    for picture, output, mask in zip(pictures, outputs, masks()):
        far = chebyshev_distance(mask) > 4
        assert np.any(output[far] != picture[far]), "the default already keeps the unmasked pixels"


def test_overlay_alpha_fades_linearly_over_four_pixels():
    mask = np.zeros((1, 13, 13), bool)
    mask[0, 6, 6] = True
    distance = np.maximum(*np.abs(np.mgrid[:13, :13] - 6))
    np.testing.assert_allclose(overlay_alpha(mask)[0], np.clip(1 - distance / 5, 0, 1), atol=1e-6)
    assert np.all(overlay_alpha(mask)[0][distance > 4] == 0)


def test_keep_unmasked_with_latents_raises(task):
    inputs = {"images": from_uint8(blue_pictures(1)), "masks": masks()[:1], "prompts": PROMPTS[0]}
    with pytest.raises(ValueError, match="keep_unmasked"):
        task.generate(inputs, num_steps=STEPS, output="latents", keep_unmasked=True)


def test_mask_of_another_size_raises_before_any_model_work(task, monkeypatch):
    monkeypatch.setattr(task, "encode", Forbidden("the text encoder"))
    monkeypatch.setattr(task, "compiled", Forbidden("the compiled model"))
    inputs = {"images": from_uint8(blue_pictures(1)), "masks": np.ones((32, 32), bool), "prompts": PROMPTS[0]}
    with pytest.raises(ValueError, match="masks are 32 x 32 pixels but images are 64 x 64"):
        task.generate(inputs, num_steps=STEPS)


@pytest.mark.parametrize("prompts, shape", [(PROMPTS[0], (H, W, 3)), (PROMPTS, (2, H, W, 3))])
def test_empty_mask_warns_and_returns_the_input_without_the_model(task, monkeypatch, prompts, shape):
    for name in ("encode", "run", "compiled"):
        monkeypatch.setattr(task, name, Forbidden(f"task.{name}"))
    picture = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    inputs = {"images": from_uint8(picture), "masks": np.zeros((H, W), np.float32), "prompts": prompts}
    with pytest.warns(UserWarning, match="nothing to repaint"):
        output = task.generate(inputs, num_steps=STEPS, keep_unmasked=True)
    assert output.shape == shape and output.dtype == np.uint8
    np.testing.assert_array_equal(output, np.broadcast_to(picture, shape))


def test_empty_mask_latents_are_the_image_latents(task, monkeypatch):
    images = from_uint8(blue_pictures(1))
    expected = keras.ops.convert_to_numpy(task.compiled.encode(images))
    monkeypatch.setattr(task, "run", Forbidden("task.run"))
    with pytest.warns(UserWarning, match="nothing to repaint"):
        latents = task.generate({"images": images, "masks": np.zeros((H, W)), "prompts": PROMPTS[0]}, output="latents")
    np.testing.assert_array_equal(latents, expected[0])


def test_one_non_empty_mask_in_the_batch_runs_the_model(task, monkeypatch):
    class Ran(Exception):
        pass

    def run(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(task, "run", run)
    batch_masks = np.stack([np.zeros((H, W), bool), masks()[1]])
    inputs = {"images": from_uint8(blue_pictures(2)), "masks": batch_masks, "prompts": PROMPTS}
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Ran):
        warnings.simplefilter("always")
        task.generate(inputs, num_steps=STEPS)
    assert not [w for w in caught if "nothing to repaint" in str(w.message)]
