"""Writing frames and images: GIF, MP4 / WebM video, PNG contact sheets, PNG / JPEG / WebP images with their
generation parameters.

Frames are uint8 (H, W, 3) arrays (or a (N, H, W, 3) array), as the tasks and `keras_sd3.explore` return.
Pillow does the images; video needs `imageio` and `imageio-ffmpeg` (`pip install imageio imageio-ffmpeg`).
"""

import contextlib
import json
import math
import os

import numpy as np
from PIL import Image, PngImagePlugin

METADATA_KEY = "keras_sd3"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IMAGE_DESCRIPTION = 0x010E
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


def _save_atomically(path, image, **options):
    """Writes the uint8 (H, W, 3) `image` with Pillow's save `options` (`format` included) onto `path`.

    Pillow writes a hidden temporary file beside `path` that then replaces it in one step; on any exception,
    KeyboardInterrupt included, the temporary is removed, so `path` is either whole or as it was.
    """
    image = Image.fromarray(_frames([image])[0])
    folder, name = os.path.split(os.fspath(path))
    stem, extension = os.path.splitext(name)
    temporary = os.path.join(folder, f".{stem}-{os.urandom(4).hex()}{extension}")
    file = open(temporary, "xb")
    try:
        with file:
            image.save(file, **options)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _png_info(metadata):
    """PNG text chunks: each entry readable on its own, and the whole dict as JSON under "keras_sd3"."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(metadata))
    return info


def _save_options(extension, metadata, quality):
    """Pillow's save options for `extension`, with `metadata` in PNG text chunks or in EXIF (and the JPEG comment)."""
    image_format = IMAGE_FORMATS[extension]
    if image_format == "PNG":
        return {"format": image_format, "pnginfo": _png_info(metadata)}
    options = {"format": image_format, "quality": quality}
    if metadata:
        text = json.dumps(metadata, ensure_ascii=True)
        exif = Image.Exif()
        exif[EXIF_IMAGE_DESCRIPTION] = text
        options["exif"] = exif.tobytes()
        if image_format == "JPEG":
            options["comment"] = text
    return options


def save_png(path, image, metadata=None):
    """Writes one PNG (atomically); `metadata` (a JSON-able dict: prompt, seed, steps, ...) goes in its text chunks.

    Each entry is stored as a readable text chunk, and the whole dict as JSON under "keras_sd3", which
    `read_metadata` returns with its types intact.
    """
    _save_atomically(path, image, format="PNG", pnginfo=_png_info(metadata))


def save_image(path, image, metadata=None, quality=95):
    """Writes one image by extension (.png, .jpg / .jpeg, .webp), atomically, with `metadata` inside.

    Args:
        path: the file to write; its extension picks the format.
        image: a uint8 (H, W, 3) array.
        metadata: a JSON-able dict (prompt, seed, steps, ...). PNG keeps it as `save_png` does; JPEG and WebP
            keep it as ASCII JSON in the EXIF ImageDescription (0x010E), and JPEG also in its comment.
        quality: JPEG and (lossy) WebP quality, 0 to 100.

    Raises:
        ValueError: the extension is not one of `IMAGE_EXTENSIONS`.
    """
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension not in IMAGE_EXTENSIONS:
        allowed = ", ".join(IMAGE_EXTENSIONS)
        raise ValueError(f"Image files must end in one of {allowed}; got {extension!r} in {path!r}.")
    _save_atomically(path, image, **_save_options(extension, metadata, quality))


def save_grid(path, frames, columns=None, padding=2, metadata=None):
    """`make_grid` written as a PNG (with `metadata`, as `save_png`)."""
    save_png(path, make_grid(frames, columns, padding), metadata)


def _metadata_dict(text):
    """The dict that `text` (str or bytes) holds as JSON, else None."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_metadata(path):
    """The `metadata` dict written by `save_png` / `save_grid` / `save_image` ({} when there is none).

    Read from the PNG text chunk "keras_sd3", else the EXIF ImageDescription, else the JPEG comment; text that
    is not a JSON dict counts as none.
    """
    with Image.open(path) as image:
        texts = [
            (getattr(image, "text", None) or {}).get(METADATA_KEY),
            image.getexif().get(EXIF_IMAGE_DESCRIPTION),
            image.info.get("comment"),
        ]
    found = (_metadata_dict(text) for text in texts)
    return next((metadata for metadata in found if metadata is not None), {})


def save_frames(path, frames, fps=10, rubber_band_loop=False, metadata=None):
    """Writes frames by file extension: .gif, .mp4 / .webm / .mov, or .png (a contact sheet)."""
    name = str(path).lower()
    if name.endswith(".gif"):
        return save_gif(path, frames, fps, rubber_band_loop)
    if name.endswith(".png"):
        return save_grid(path, frames, metadata=metadata)
    return save_video(path, frames, fps, rubber_band_loop)
