"""keras_sd3: Stable Diffusion 3 and 3.5 for Keras 3 (JAX, PyTorch, TensorFlow).

Importing the package chooses the Keras backend when nothing else did (`keras_sd3.keras_backend`:
`KERAS_BACKEND`, else Keras' config file, else the first installed of torch, jax, tensorflow).
Sub-packages are imported on first use, so that the `keras-sd3` command can still choose another.
"""

import importlib

from keras_sd3 import keras_backend

__version__ = "0.1.0"
_SUBMODULES = ("cli", "explore", "media", "models", "presets", "sampling", "tasks", "text", "training", "weights")

keras_backend.choose_on_import()


def backend_name():
    """The Keras backend keras_sd3 runs on ("torch", "jax" or "tensorflow"); imports Keras."""
    keras_backend.require()
    import keras

    return keras.config.backend()


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_sd3.{name}")
    raise AttributeError(f"module 'keras_sd3' has no attribute {name!r}")
