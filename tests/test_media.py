"""Media export, read back independently (Pillow's GIF / PNG / JPEG / WebP readers, imageio's ffmpeg reader)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keras_sd3 import media


def frames(count, height=32, width=48):
    """Distinct frames: frame k is a flat colour k * 20 in red, so GIF frames never merge."""
    out = np.zeros((count, height, width, 3), np.uint8)
    out[..., 0] = (np.arange(count) * 20)[:, None, None]
    out[..., 2] = 200
    return out


def gif_frames(path):
    with Image.open(path) as gif:
        reds, durations = [], []
        for index in range(gif.n_frames):
            gif.seek(index)
            reds.append(int(np.asarray(gif.convert("RGB"))[0, 0, 0]))
            durations.append(gif.info["duration"])
        return reds, durations, gif.info.get("loop")


def test_gif_frames_durations_and_loop(tmp_path):
    media.save_gif(tmp_path / "a.gif", frames(5), fps=4)
    reds, durations, loop = gif_frames(tmp_path / "a.gif")
    assert reds == [0, 20, 40, 60, 80]
    assert durations == [250] * 5 and loop == 0


def test_gif_rubber_band_goes_back_without_repeating_the_ends(tmp_path):
    media.save_gif(tmp_path / "b.gif", list(frames(5)), fps=10, rubber_band_loop=True, loop=False)
    reds, durations, loop = gif_frames(tmp_path / "b.gif")
    assert reds == [0, 20, 40, 60, 80, 60, 40, 20]  # 2N - 2 frames, A -> B -> A
    assert durations == [100] * 8 and loop is None


def test_grid_png_size_layout_and_metadata(tmp_path):
    metadata = {"prompt": "a red circle", "seed": 42, "steps": 28, "guidance": 7.0, "model": "sd3_tiny"}
    media.save_grid(tmp_path / "grid.png", frames(7), columns=3, padding=2, metadata=metadata)
    with Image.open(tmp_path / "grid.png") as png:
        sheet, text = np.asarray(png.convert("RGB")), png.text
    assert sheet.shape == (3 * 32 + 2 * 2, 3 * 48 + 2 * 2, 3)
    assert sheet[34 + 5, 50 + 5, 0] == 80 and sheet[68 + 5, 5, 0] == 120  # cell (1, 1) is frame 4, (2, 0) frame 6
    assert np.all(sheet[68:, 50:] == 255)  # empty cells and gaps
    assert media.read_metadata(tmp_path / "grid.png") == metadata
    assert text["prompt"] == "a red circle" and text["seed"] == "42"  # readable by any PNG tool


def test_png_metadata_round_trip_and_no_metadata(tmp_path):
    image = frames(1)[0]
    media.save_png(tmp_path / "one.png", image, {"prompt": "42", "negative_prompt": "", "size": [32, 48]})
    assert media.read_metadata(tmp_path / "one.png") == {"prompt": "42", "negative_prompt": "", "size": [32, 48]}
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")), image)
    media.save_png(tmp_path / "bare.png", image)
    assert media.read_metadata(tmp_path / "bare.png") == {}


PARAMETERS = {"prompt": "un chat café", "seed": 42, "guidance": 4.5, "size": [64, 96], "negative_prompt": ""}


def gradient(height=64, width=96):
    """A smooth image: red rises left to right, green top to bottom."""
    out = np.zeros((height, width, 3), np.uint8)
    out[..., 0] = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    out[..., 1] = np.linspace(0, 255, height).astype(np.uint8)[:, None]
    out[..., 2] = 128
    return out


def interrupted_save(error, targets):
    """A stand-in for `Image.Image.save` that notes in `targets` where it was told to write, writes a few bytes
    there, then raises `error`."""

    def save(self, fp, *args, **kwargs):
        targets.append(getattr(fp, "name", fp))
        if hasattr(fp, "write"):
            fp.write(b"partial")
        else:
            with open(fp, "wb") as file:
                file.write(b"partial")
        raise error

    return save


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.jpeg", "a.webp", "A.JPG"])
def test_image_metadata_round_trip_keeps_types(tmp_path, name):
    media.save_image(tmp_path / name, gradient(), PARAMETERS)
    read = media.read_metadata(tmp_path / name)
    assert read == PARAMETERS
    assert [type(value) for value in read.values()] == [type(value) for value in PARAMETERS.values()]  # 42 == 42.0
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize(("name", "image_format"), [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.webp", "WEBP")])
def test_image_format_and_pixels(tmp_path, name, image_format):
    image = gradient()
    media.save_image(tmp_path / name, image, quality=95)
    with Image.open(tmp_path / name) as decoded:
        pixels, found_format = np.asarray(decoded.convert("RGB")), decoded.format
    assert found_format == image_format and pixels.shape == image.shape
    assert media.read_metadata(tmp_path / name) == {}
    if image_format == "PNG":
        np.testing.assert_array_equal(pixels, image)
        return
    assert np.mean(np.abs(pixels.astype(np.int16) - image)) < 8
    media.save_image(tmp_path / f"low_{name}", image, quality=10)
    assert (tmp_path / f"low_{name}").stat().st_size < (tmp_path / name).stat().st_size


def test_webp_is_lossy(tmp_path):
    media.save_image(tmp_path / "a.webp", gradient(), PARAMETERS)
    data = (tmp_path / "a.webp").read_bytes()
    assert b"VP8 " in data and b"VP8L" not in data


@pytest.mark.parametrize("name", ["a.jpg", "a.webp"])
def test_jpeg_and_webp_metadata_is_ascii_json_in_exif_and_jpeg_comment(tmp_path, name):
    media.save_image(tmp_path / name, gradient(), PARAMETERS)
    with Image.open(tmp_path / name) as decoded:
        description, comment = decoded.getexif()[0x010E], decoded.info.get("comment")
    assert description.isascii() and "caf\\u00e9" in description and json.loads(description) == PARAMETERS
    assert comment == (description.encode() if name.endswith(".jpg") else None)


def test_read_metadata_falls_back_to_the_jpeg_comment_and_ignores_foreign_text(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "comment.jpg", comment=json.dumps(PARAMETERS))
    assert media.read_metadata(tmp_path / "comment.jpg") == PARAMETERS
    exif = Image.Exif()
    exif[0x010E] = "OLYMPUS DIGITAL CAMERA"
    Image.fromarray(gradient()).save(tmp_path / "camera.jpg", exif=exif, comment="[1, 2]")
    assert media.read_metadata(tmp_path / "camera.jpg") == {}


def test_save_image_rejects_other_extensions(tmp_path):
    for name in ["a.gif", "a.tiff", "a"]:
        with pytest.raises(ValueError, match=r"\.png, \.jpg, \.jpeg, \.webp; got '(\.gif|\.tiff|)'"):
            media.save_image(tmp_path / name, gradient())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.webp"])
def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch, name, error):
    monkeypatch.setattr(Image.Image, "save", interrupted_save(error, []))
    with pytest.raises(error):
        media.save_image(tmp_path / name, gradient(), PARAMETERS)
    with pytest.raises(error):
        media.save_png(tmp_path / "b.png", gradient(), PARAMETERS)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    media.save_image(tmp_path / "a.webp", gradient(), {"seed": 1})
    before = (tmp_path / "a.webp").read_bytes()
    targets = []
    monkeypatch.setattr(Image.Image, "save", interrupted_save(KeyboardInterrupt, targets))
    with pytest.raises(KeyboardInterrupt):
        media.save_image(tmp_path / "a.webp", gradient(), {"seed": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.webp"] and (tmp_path / "a.webp").read_bytes() == before
    temporary = Path(targets[0])
    assert temporary.parent == tmp_path and temporary.name.startswith(".") and temporary.suffix == ".webp"


@pytest.mark.parametrize("extension", ["mp4", "webm"])
def test_video_frame_count(tmp_path, extension):
    import imageio.v2 as imageio

    path = str(tmp_path / f"walk.{extension}")
    media.save_frames(path, frames(6), fps=5, rubber_band_loop=True)
    with imageio.get_reader(path) as reader:
        decoded = [frame for frame in reader]
        fps = reader.get_meta_data()["fps"]
    assert len(decoded) == 10 and decoded[0].shape == (32, 48, 3) and fps == 5
    reds = [int(np.median(f[..., 0])) for f in decoded]
    assert np.all(np.abs(np.array(reds) - [0, 20, 40, 60, 80, 100, 80, 60, 40, 20]) <= 6)  # lossy codec


def test_bad_frames_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\) arrays of one size; got float32"):
        media.save_gif(tmp_path / "x.gif", frames(2).astype(np.float32))
    with pytest.raises(ValueError, match="No frames"):
        media.save_grid(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match=r"Video files must end in one of \['.mov', '.mp4', '.webm'\]"):
        media.save_video(tmp_path / "x.avi", frames(2))
