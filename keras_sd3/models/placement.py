"""Text encoders on another device than the MMDiT and the VAE (`text_encoders_device`).

CLIP-L, CLIP-G and T5-XXL run once per prompt; T5 alone is 9 GB in bfloat16. With
`from_preset(..., text_encoders_device="cpu")` their variables are created on that device and their
compiled program runs there, under Keras' `keras.device` scope: on jax `jax.default_device` (the
program's inputs are uncommitted arrays on that device, so XLA runs it there), on tensorflow
`tf.device`, on torch Keras' device for new tensors. Only the embeddings (a few hundred KB) then cross
to the accelerator, where the generation loop's program takes them.

Under a `keras.distribution` it is refused: the distribution lays out every variable of the model
over its mesh, the text encoders included.
"""

import contextlib

import keras


def check_text_encoders_device(device):
    """Raises ValueError for a device this backend does not have, or with a `keras.distribution` set."""
    if device is None:
        return
    if keras.distribution.distribution() is not None:
        raise ValueError("text_encoders_device does not go with a keras.distribution (it lays the text encoders "
                         "out over its mesh like the rest of the model): leave text_encoders_device=None, or "
                         "generate without the distribution.")
    try:
        with keras.device(device):
            pass
    except Exception as error:  # (each backend raises its own type)
        raise ValueError(f"text_encoders_device={device!r} is not a device of the {keras.config.backend()} backend "
                         f"({error}); give e.g. 'cpu' or 'cpu:0', or a device object of the backend.") from None


def device_scope(device):
    """`keras.device(device)`, or no scope for None."""
    return contextlib.nullcontext() if device is None else keras.device(device)


class Variables:
    """The variables of some layers, as `backend.compile_function` reads them from a model."""

    def __init__(self, layers):
        self.layers = [layer for layer in layers if layer is not None]

    @property
    def trainable_variables(self):
        return [v for layer in self.layers for v in layer.trainable_variables]

    @property
    def non_trainable_variables(self):
        return [v for layer in self.layers for v in layer.non_trainable_variables]
