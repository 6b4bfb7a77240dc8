"""The errors keras_sd3 raises for bad checkpoints and presets (plain `ValueError`s, importable alone)."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, incomplete or does not fit the model."""


class PresetError(CheckpointError):
    """A preset name that cannot be resolved to a local folder (unknown, or not downloaded)."""
