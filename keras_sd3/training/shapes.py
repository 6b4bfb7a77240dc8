"""A synthetic captioned dataset: one flat-coloured shape on a flat background, described in words.

"a small red circle in the top left on a blue background", "a green square on a white background".
Everything is drawn from a seed, so the dataset is the same on every machine. Big shapes sit near the
centre and their size word is optional ("a red circle" means a big one); small shapes sit in one of
five places, named unless it is the centre.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.34, 0.42), "big": (0.58, 0.72)}  # side / diameter as a fraction of the image
PLACES = {  # centre (x, y) of small shapes, as fractions of the image
    "in the center": (0.5, 0.5),
    "in the top left": (0.28, 0.28),
    "in the top right": (0.72, 0.28),
    "in the bottom left": (0.28, 0.72),
    "in the bottom right": (0.72, 0.72),
}


@dataclasses.dataclass(frozen=True)
class ShapeScene:
    """One picture: what is drawn, where, and how the caption words it."""

    shape: str
    color: str
    background: str
    size: str
    place: str
    center: tuple  # (x, y) in [0, 1]
    extent: float  # side or diameter in [0, 1]
    say_size: bool

    def caption(self):
        size = f"{self.size} " if self.say_size else ""
        place = f" {self.place}" if self.size == "small" and self.place != "in the center" else ""
        return f"a {size}{self.color} {self.shape}{place} on a {self.background} background"


def random_scene(rng):
    """One scene drawn from `rng` (a NumPy Generator)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color, background = rng.choice(list(COLORS), size=2, replace=False)
    size = "small" if rng.random() < 0.4 else "big"
    extent = rng.uniform(*SIZES[size])
    if size == "small":
        place = list(PLACES)[rng.integers(len(PLACES))]
        center = tuple(np.asarray(PLACES[place]) + rng.uniform(-0.04, 0.04, 2))
    else:
        place, center = "in the center", tuple(0.5 + rng.uniform(-0.06, 0.06, 2))
    say_size = size == "small" or rng.random() < 0.5
    return ShapeScene(shape, str(color), str(background), size, place, center, float(extent), say_size)


def render(scene, size=64, supersample=4):
    """The scene as a uint8 (size, size, 3) image (anti-aliased by drawing at `supersample` x)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = scene.center[0] * big, scene.center[1] * big
    half = scene.extent * big / 2
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # upright triangle with base = height = extent
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return np.asarray(image.resize((size, size), Image.LANCZOS))


def shapes_dataset(count, seed=0, size=64):
    """`count` scenes drawn from `seed` -> (uint8 images (count, size, size, 3), captions, scenes)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    images = np.stack([render(scene, size) for scene in scenes])
    return images, [scene.caption() for scene in scenes], scenes


def caption_words():
    """The sorted words the captions are made of (every caption uses only these)."""
    places = [word for place in PLACES if place != "in the center" for word in place.split()]
    return sorted({*COLORS, *SHAPES, *SIZES, *places, "a", "on", "background"})


def vocabulary_corpus():
    """Every caption word in context (for training the tokenizer)."""
    words = [*COLORS, *SHAPES, *SIZES, *(p for place in PLACES for p in place.split()), "a", "on", "background"]
    rng = np.random.default_rng(0)
    captions = [random_scene(rng).caption() for _ in range(2000)]
    return captions + [" ".join(words)]
