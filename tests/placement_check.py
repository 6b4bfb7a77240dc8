"""Run by tests/test_placement.py in a subprocess: jax with 2 forced CPU devices, the embedded model with
its text encoders on the second device. Prints one JSON line of what it found."""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from keras_sd3.models import StableDiffusion3TextToImage  # noqa: E402

TEXT = ("clip_l", "clip_g", "t5")


def devices(variables):
    return sorted({str(d) for v in variables for d in v.value.devices()})


def main():
    prompt = {"prompts": "a red circle on a blue background", "negative_prompts": ""}
    plain = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    moved = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", text_encoders_device=jax.devices("cpu")[1])
    ids = moved.preprocessor.generate_preprocess([prompt["prompts"]])
    negative = moved.preprocessor.generate_preprocess([prompt["negative_prompts"]])
    embeddings = moved.compiled.encode_text(ids, negative)
    expected = plain.compiled.encode_text(ids, negative)
    text_variables = [v for name in TEXT if getattr(moved.backbone, name) is not None
                      for v in getattr(moved.backbone, name).variables]
    other = [v for name in ("diffuser", "vae") for v in getattr(moved.backbone, name).variables]
    images = moved.generate(prompt, num_steps=3, seed=1)
    print(json.dumps({
        "devices": len(jax.devices()),
        "text_variables": devices(text_variables),
        "other_variables": devices(other),
        "embedding_devices": sorted({str(d) for e in embeddings for d in e.devices()}),
        "embeddings_equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(embeddings, expected)),
        "images_equal": bool(np.array_equal(images, plain.generate(prompt, num_steps=3, seed=1))),
        "image_std": float(np.std(images)),
    }))


if __name__ == "__main__":
    sys.exit(main())
