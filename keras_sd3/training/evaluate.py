"""Scoring generated shape pictures: does the image show the prompt's shape, colour and background?

The analyser knows nothing of the model: the background colour is the median of the image border,
the shape is the largest connected region of pixels far from it (specks and halos elsewhere are
ignored), its colour the median of those pixels (each snapped to the nearest named colour), and its
class comes from how much of its bounding box it fills (square 1, circle pi / 4, triangle 1 / 2).
"""

import numpy as np

from keras_sd3.training.shapes import COLORS, SHAPES

PALETTE = np.array(list(COLORS.values()), np.float32)
NAMES = list(COLORS)


def nearest_color(rgb):
    return NAMES[int(np.argmin(np.linalg.norm(PALETTE - np.asarray(rgb, np.float32), axis=1)))]


def analyse(image, threshold=80.0):
    """uint8 (H, W, 3) -> {"shape", "color", "background"} (shape None when nothing stands out)."""
    image = np.asarray(image, np.float32)
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(image - background, axis=-1) > threshold
    result = {"background": nearest_color(background), "color": None, "shape": None}
    if mask.sum() < 0.01 * mask.size:
        return result
    mask = largest_region(mask)
    result["color"] = nearest_color(np.median(image[mask], axis=0))
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = mask.sum() / box
    result["shape"] = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    result["fill"] = float(fill)
    return result


def largest_region(mask):
    """The largest 4-connected region of a boolean (H, W) mask (iterative flood fill)."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, label = None, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        stack, size = [start], 0
        labels[start] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best


def evaluation_prompts(count=48, seed=123):
    """`count` fixed (prompt, expected) pairs: every shape equally often, shape colour != background."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        color, background = rng.choice(NAMES, size=2, replace=False)
        shape = SHAPES[i % len(SHAPES)]
        expected = {"shape": shape, "color": str(color), "background": str(background)}
        items.append((f"a {color} {shape} on a {background} background", expected))
    return items


def score(images, expected):
    """Accuracies over images: colour (shape colour and background both right) and shape class."""
    found = [analyse(image) for image in images]
    color = np.mean([f["color"] == e["color"] and f["background"] == e["background"] for f, e in zip(found, expected)])
    shape = np.mean([f["shape"] == e["shape"] for f, e in zip(found, expected)])
    return {"color_accuracy": float(color), "shape_accuracy": float(shape), "count": len(found), "found": found}


def evaluate(text_to_image, count=48, num_steps=20, guidance_scale=5.0, seed=0, batch_size=8, **options):
    """Generates the evaluation prompts (seed `seed + i` for prompt i) and scores them.

    `options`: more `generate()` arguments (`sampler`, `shift`, ...)."""
    items = evaluation_prompts(count)
    images = []
    for start in range(0, count, batch_size):
        chunk = items[start : start + batch_size]
        noise = np.concatenate([text_to_image.noise(1, seed + start + i) for i in range(len(chunk))])
        images.append(text_to_image.generate([p for p, _ in chunk], num_steps=num_steps,
                                             guidance_scale=guidance_scale, latents=noise, **options))
    images = np.concatenate(images)
    return images, score(images, [e for _, e in items])
