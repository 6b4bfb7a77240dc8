"""Checkpoint reading: safetensors files, key maps and strict assignment to Keras variables."""

from keras_sd3.keras_backend import require

require()  # a clear error for a missing or unknown backend, before Keras is imported

from keras_sd3.weights.assign import load_layer_weights, named_variables
from keras_sd3.weights.checkpoint import Checkpoint, open_checkpoint
from keras_sd3.weights.safetensors_file import CheckpointError
