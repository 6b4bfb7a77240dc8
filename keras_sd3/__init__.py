"""keras_sd3: Stable Diffusion 3 and 3.5 for Keras 3 (JAX, PyTorch, TensorFlow).

Sub-packages are imported on first use, so that `keras-sd3` can choose the Keras backend before
Keras is imported.
"""

import importlib

__version__ = "0.1.0"
_SUBMODULES = ("cli", "explore", "media", "models", "presets", "sampling", "tasks", "text", "training", "weights")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_sd3.{name}")
    raise AttributeError(f"module 'keras_sd3' has no attribute {name!r}")
