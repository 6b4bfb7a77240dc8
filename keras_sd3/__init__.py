"""keras_sd3: Stable Diffusion 3 and 3.5 for Keras 3 (JAX, PyTorch, TensorFlow)."""

from keras_sd3 import explore, media, models, sampling, text, weights

__version__ = "0.1.0"
