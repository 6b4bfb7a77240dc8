"""Training: the synthetic shapes dataset, fit() for the MMDiT / VAE / LoRA, the tiny model recipe."""

from keras_sd3.keras_backend import require

require()  # a clear error for a missing or unknown backend, before Keras is imported
