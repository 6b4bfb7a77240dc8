"""Model-parallel layouts of the backbone's variables for `keras.distribution.ModelParallel` (jax).

Variable paths read like the checkpoint: `<part>/<diffusers key, list indices joined>/<variable>`, e.g.
`diffuser/transformer_blocks_3/attn/to_q/kernel` for `transformer_blocks.3.attn.to_q.weight` (see
`keras_sd3.weights.assign.set_checkpoint_paths`). Each model part has a table of rules next to its code
(`LAYOUT` in `models/mmdit.py`, `clip.py`, `t5.py`, `vae.py`): a regex of a layer's path -> one of the
kinds below. Megatron style: a (in, out) kernel is split by output columns where its output is split
into heads or an MLP's hidden units (its bias likewise), by input rows where it takes them back (its
bias replicated), so each device computes whole heads and whole hidden units and one all-reduce per
attention / MLP joins them. Tables are split along their big axis (vocabulary, positions) where the
model axis divides it: each table rule carries the real models' row count (CLIP 49,408 tokens and 77
positions, T5 32,128, the MMDiT's 192² positions), so the map says "replicated" for a table the axis
does not divide (CLIP's 77 positions on 2, 4 or 8 devices). What no rule names is replicated.

The map is what is done: every variable's layout equals `layout_map[variable.path]`. A model whose
table has another length than the real one (a tiny test model) is laid out by its own length, and the
distribution's layout map gets an entry for that variable's path saying so when the backbone is built.
"""

import functools
import re
import warnings

import keras

from keras_sd3.models import clip, mmdit, t5, vae

MODEL = "model"  # stands for the mesh's model axis in `KINDS`
PARTS = {"diffuser": mmdit.LAYOUT, "vae": vae.LAYOUT, "clip_l": clip.LAYOUT, "clip_g": clip.LAYOUT, "t5": t5.LAYOUT}

# kind -> {variable name: the mesh axis of each of its dimensions}; other variables of the layer are replicated.
KINDS = {
    # (int8 / int4 scales and zero points: (out,), or (groups, out) for int4 by groups, the axes right-aligned)
    "columns": {"kernel": (None, MODEL), "bias": (MODEL,), "kernel_scale": (MODEL,), "kernel_zero": (MODEL,)},
    "head_columns": {"kernel": (None, MODEL), "bias": (MODEL,), "kernel_scale": (MODEL,), "kernel_zero": (MODEL,)},
    # q / k / v above: also needs the heads to divide
    "rows": {"kernel": (MODEL, None)},
    "head_rows": {"kernel": (MODEL, None)},  # attention output
    "table": {"weight": (MODEL, None)},  # (rows, D): replicated where the axis does not divide the rows
    "positions": {"pos_embed": (None, MODEL, None)},  # (1, positions, D), likewise
}
HEAD_KINDS, TABLE_KINDS = ("head_columns", "head_rows"), ("table", "positions")


def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
    """The `keras.distribution.LayoutMap` of a `StableDiffusion3Backbone` on `device_mesh`.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with both axes below (either may have size 1).
        model_parallel_dim_name: the axis the large kernels are split over.
        data_parallel_dim_name: the axis images are split over (give the same name to
            `ModelParallel(..., batch_dim_name=)`); no variable is split over it.

    Raises:
        ValueError: an axis name that `device_mesh` does not have.
    """
    for role, name in (("model_parallel_dim_name", model_parallel_dim_name),
                       ("data_parallel_dim_name", data_parallel_dim_name)):
        if name not in device_mesh.axis_names:
            raise ValueError(f"The device mesh has no axis {name!r} ({role}); its axes are "
                             f"{list(device_mesh.axis_names)}.")
    model_size = dict(zip(device_mesh.axis_names, device_mesh.shape))[model_parallel_dim_name]
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for part, rules in PARTS.items():
        for pattern, kind, *rows in rules:
            for variable, axes in KINDS[kind].items():
                if rows and rows[0] % model_size:
                    axes = (None,) * len(axes)  # a table the axis does not divide stays whole
                layout_map[f"{part}/(?:{pattern})/{variable}"] = tuple(
                    model_parallel_dim_name if axis == MODEL else axis for axis in axes)
    return layout_map


def rule_kind(path):
    """The kind of the `LAYOUT` rule that names the variable at `path`, or None."""
    part, _, rest = path.partition("/")
    for pattern, kind, *_ in PARTS.get(part, ()):
        if re.fullmatch(f"(?:{pattern})/[^/]+", rest):
            return kind
    return None


def apply_layouts(backbone, heads):
    """Gives every variable of `backbone` its layout under the current `keras.distribution`, checked.

    Called when the backbone is built, after its variables got their checkpoint paths. Variables that
    are still empty (deferred initialisation: `from_preset`) receive their checkpoint tensor straight
    into these shards; a backbone built with random values is laid out again.

    Args:
        heads: {part: attention heads} (a model axis that does not divide them is warned about).

    Raises:
        ValueError: a distribution on a backend other than jax; a split that does not divide a tensor
            (the message names the tensor, the axis and the sizes).
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    if keras.config.backend() != "jax":
        raise ValueError(f"A keras.distribution is set, but distributing a model is a feature of Keras' jax "
                         f"backend; this is {keras.config.backend()!r}. Use KERAS_BACKEND=jax, or unset the "
                         "distribution (keras.distribution.set_distribution(None)).")
    for variable in backbone.variables:
        variable._layout = None  # (a variable built eagerly got one from its earlier path)
        layout = distribution.get_variable_layout(variable)
        variable._layout = checked_layout(variable, layout, heads)
        if variable._layout is not layout:
            _record(distribution, variable.path, variable._layout)
        if variable._value is not None:
            variable._direct_assign(variable._value)


def _record(distribution, path, layout):
    """Makes the distribution's layout map say `layout` for the variable at `path` (an exact key wins
    over the rules' patterns in a `LayoutMap`)."""
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is None:
        return
    if path in set(layout_map):
        del layout_map[path]
    layout_map[path] = keras.distribution.TensorLayout(layout.axes, layout.device_mesh)


def checked_layout(variable, layout, heads):
    """`layout` for `variable`, or the replicated layout for a table the axis does not divide (a table
    of another length than the real models', whose rule assumed the real length).

    A head count the axis does not divide (SD3.5 Large: 38 heads) is allowed where the width is
    divisible: the projections are then split by columns across heads, and XLA regroups the heads for
    attention (more communication; a warning says so).
    """
    sizes = dict(zip(layout.device_mesh.axis_names, layout.device_mesh.shape))
    kind, part = rule_kind(variable.path), variable.path.split("/")[0]
    if len(layout.axes) < len(variable.shape):  # an int4 (groups, out) scale under an (out,) rule
        layout = keras.distribution.TensorLayout(
            (None,) * (len(variable.shape) - len(layout.axes)) + tuple(layout.axes), layout.device_mesh)
    for dim, axis in enumerate(layout.axes):
        if axis is None:
            continue
        if axis not in sizes:
            raise ValueError(f"The layout of {variable.path} names the mesh axis {axis!r}, which the mesh does "
                             f"not have (its axes: {list(sizes)}).")
        if variable.shape[dim] % sizes[axis]:
            if kind in TABLE_KINDS:
                return keras.distribution.TensorLayout((None,) * len(variable.shape), layout.device_mesh)
            raise ValueError(f"{variable.path} cannot be split over the mesh axis {axis!r} of size {sizes[axis]}: "
                             f"its dimension {dim} ({variable.shape[dim]} of shape {tuple(variable.shape)}) is "
                             "not a multiple of it.")
        if kind in HEAD_KINDS and heads.get(part, 1) % sizes[axis]:
            _warn_heads(part, heads.get(part, 1), axis, sizes[axis])
    return layout


@functools.cache
def _warn_heads(part, heads, axis, size):
    warnings.warn(f"The {part}'s {heads} attention heads do not divide into the {size} devices of the mesh axis "
                  f"{axis!r}: its attention projections are split by columns and XLA regroups the heads for "
                  "attention (more communication than with a head count the axis divides).", stacklevel=4)
