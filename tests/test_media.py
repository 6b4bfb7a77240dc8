"""Media export, read back with independent readers (Pillow's GIF / PNG decoders, imageio's ffmpeg reader)."""

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
