"""keras_sd3 on several devices through Keras' own `keras.distribution` (a jax-backend feature of Keras).

Set a distribution before building the model; everything after that (loading, the step API, the
tasks, `keras_sd3.explore`) runs on it:

    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], keras.distribution.list_devices())
    layout_map = StableDiffusion3Backbone.get_layout_map(mesh)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    task = StableDiffusion3TextToImage.from_preset(...)

or `keras.distribution.DataParallel()` for images split over all devices and the model on each, or
`set_mesh("2x4")` for the first of these. Images are split over the batch axis: a batch that it does
not divide is padded with copies of its last image, which are dropped afterwards.
"""

import re

# (Keras is imported inside the functions: the command line parses a mesh before choosing the backend.)


def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
    """`StableDiffusion3Backbone.get_layout_map` (see `keras_sd3.distribution.layout`)."""
    from keras_sd3.distribution.layout import get_layout_map

    return get_layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name)


def parse_mesh(text):
    """"BxM" (e.g. "2x4": 2 groups of images, the model split over 4 devices) -> (B, M).

    Raises:
        ValueError: not of the form "BxM" with B, M >= 1.
    """
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"A mesh is 'BxM' with B images at a time and the model split over M devices, "
                         f"e.g. '1x8' or '8x1'; got {text!r}.")
    return int(match[1]), int(match[2])


def mesh_distribution(batch, model):
    """A `keras.distribution.ModelParallel` on a (batch, model) mesh of the first B x M devices.

    Raises:
        ValueError: not the jax backend, or fewer than B x M devices.
    """
    import keras

    if keras.config.backend() != "jax":
        raise ValueError(f"Spreading a model over devices is a feature of Keras' jax backend; this is "
                         f"{keras.config.backend()!r}. Use KERAS_BACKEND=jax (pip install 'keras_sd3[jax-cuda]' on GPUs).")
    devices = keras.distribution.list_devices()
    if batch * model > len(devices):
        raise ValueError(f"The mesh {batch}x{model} needs {batch * model} devices; there are {len(devices)}: {devices}.")
    mesh = keras.distribution.DeviceMesh((batch, model), ["batch", "model"], devices[: batch * model])
    return keras.distribution.ModelParallel(layout_map=get_layout_map(mesh), batch_dim_name="batch")


def set_mesh(text):
    """Sets `mesh_distribution(*parse_mesh(text))` as Keras' distribution (None or "1x1": one device)."""
    import keras

    if text is None or parse_mesh(text) == (1, 1):
        keras.distribution.set_distribution(None)
        return
    keras.distribution.set_distribution(mesh_distribution(*parse_mesh(text)))


def batch_axis_size():
    """How many groups the current distribution splits images into (1 without a distribution)."""
    import keras

    distribution = keras.distribution.distribution() if keras.config.backend() == "jax" else None
    if distribution is None or distribution.batch_dim_name is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[list(mesh.axis_names).index(distribution.batch_dim_name)]


def pad_batch(x, size):
    """A batch-1 `x` repeated to `size`, or a batch-N `x` padded to `size` with copies of its last element."""
    import keras

    count = int(x.shape[0])
    if count == 1:
        return keras.ops.repeat(x, size, axis=0)
    if count == size:
        return x
    return keras.ops.concatenate([x, keras.ops.repeat(x[-1:], size - count, axis=0)], axis=0)


def split_batch(x):
    """`x` (batch first, a multiple of `batch_axis_size()`) placed split over the batch axis; unchanged
    without a distribution."""
    import keras

    distribution = keras.distribution.distribution() if keras.config.backend() == "jax" else None
    if distribution is None:
        return x
    return keras.distribution.distribute_tensor(x, distribution.get_data_layout(x.shape))
