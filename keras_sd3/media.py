"""Writing frames and images: GIF, MP4 / WebM video, PNG contact sheets, PNGs with their generation parameters.

Frames are uint8 (H, W, 3) arrays (or a (N, H, W, 3) array), as the tasks and `keras_sd3.explore` return.
Pillow does the images; video needs `imageio` and `imageio-ffmpeg` (`pip install imageio imageio-ffmpeg`).
"""

import json
import math

import numpy as np
from PIL import Image, PngImagePlugin

METADATA_KEY = "keras_sd3"
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9"}


def _frames(frames):
    """-> list of uint8 (H, W, 3) arrays of one size."""
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError("No frames to write.")
    for f in frames:
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3 or f.shape != frames[0].shape:
            raise ValueError(
                f"Frames must be uint8 (H, W, 3) arrays of one size; got {f.dtype} {f.shape} after {frames[0].shape}."
            )
    return frames


def rubber_band(frames):
    """A -> B -> A: the frames, then the same back without repeating either end (2N - 2 frames)."""
    return list(frames) + list(frames)[-2:0:-1]


def save_gif(path, frames, fps=10, rubber_band_loop=False, loop=True):
    """Writes an animated GIF.

    Args:
        fps: frames per second; each frame lasts `round(1000 / fps)` ms.
        rubber_band_loop: play forward then backward (for paths whose ends differ, e.g. prompt A -> B).
        loop: repeat forever (the GIF loop flag 0); False plays once.

    Pillow stores a frame identical to the one before it only once, with the summed duration.
    """
    frames = _frames(frames)
    frames = rubber_band(frames) if rubber_band_loop else frames
    images = [Image.fromarray(f) for f in frames]
    options = {"loop": 0} if loop else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), **options)


def save_video(path, frames, fps=10, rubber_band_loop=False, quality=8):
    """Writes an MP4 (H.264) or WebM (VP9) video; needs `imageio` and `imageio-ffmpeg`.

    Sizes must be multiples of 16 (every keras_sd3 image size is).
    """
    import os

    extension = os.path.splitext(str(path))[1].lower()
    if extension not in VIDEO_CODECS:
        raise ValueError(f"Video files must end in one of {sorted(VIDEO_CODECS)}, got {path!r}.")
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401
    except ImportError as error:
        raise ImportError("Writing video needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg") from error
    frames = _frames(frames)
    frames = rubber_band(frames) if rubber_band_loop else frames
    with imageio.get_writer(path, fps=fps, codec=VIDEO_CODECS[extension], quality=quality, macro_block_size=16) as w:
        for frame in frames:
            w.append_data(frame)


def make_grid(frames, columns=None, padding=0, background=255):
    """A contact sheet: frames row-major in `columns` columns (default: a near-square grid).

    Returns:
        uint8 (rows * H + (rows - 1) * padding, columns * W + (columns - 1) * padding, 3); empty
        cells and the gaps are filled with `background`.
    """
    frames = _frames(frames)
    columns = columns or math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / columns)
    height, width, _ = frames[0].shape
    sheet = np.full((rows * (height + padding) - padding, columns * (width + padding) - padding, 3), background, np.uint8)
    for i, frame in enumerate(frames):
        top, left = (i // columns) * (height + padding), (i % columns) * (width + padding)
        sheet[top : top + height, left : left + width] = frame
    return sheet


def save_png(path, image, metadata=None):
    """Writes one PNG; `metadata` (a JSON-able dict: prompt, seed, steps, ...) goes in its text chunks.

    Each entry is stored as a readable text chunk, and the whole dict as JSON under "keras_sd3", which
    `read_metadata` returns with its types intact.
    """
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(metadata))
    Image.fromarray(_frames([image])[0]).save(path, pnginfo=info)


def save_grid(path, frames, columns=None, padding=2, metadata=None):
    """`make_grid` written as a PNG (with `metadata`, as `save_png`)."""
    save_png(path, make_grid(frames, columns, padding), metadata)


def read_metadata(path):
    """The `metadata` dict written by `save_png` / `save_grid` ({} when there is none)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
    return json.loads(text[METADATA_KEY]) if METADATA_KEY in text else {}


def save_frames(path, frames, fps=10, rubber_band_loop=False, metadata=None):
    """Writes frames by file extension: .gif, .mp4 / .webm / .mov, or .png (a contact sheet)."""
    name = str(path).lower()
    if name.endswith(".gif"):
        return save_gif(path, frames, fps, rubber_band_loop)
    if name.endswith(".png"):
        return save_grid(path, frames, metadata=metadata)
    return save_video(path, frames, fps, rubber_band_loop)
