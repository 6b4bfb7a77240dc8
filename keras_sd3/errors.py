"""The errors keras_sd3 raises for bad checkpoints, presets and command lines (importable alone)."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, incomplete or does not fit the model."""


class PresetError(CheckpointError):
    """A preset name that cannot be resolved to a local folder (unknown, or not downloaded)."""


class UsageError(Exception):
    """A bad command-line argument or input file, found before the model is loaded: one line, exit 2."""
