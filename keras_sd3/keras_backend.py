"""Which Keras backend keras_sd3 runs on, chosen before Keras is imported (no Keras import here).

The rule, shared by `import keras_sd3` and the `keras-sd3` command line:
1. the backend asked for (the CLI's `--backend`);
2. else `KERAS_BACKEND`;
3. else the backend Keras already runs on, if Keras was imported first;
4. else the `"backend"` of Keras' config file (`$KERAS_HOME/keras.json`, default `~/.keras/keras.json`),
   unless the file is the one Keras writes by itself on its first import (its four default entries,
   backend "tensorflow", whatever backend that import used): that names no one's choice;
5. else the first installed of torch, jax, tensorflow (torch has no compilation step, which makes it
   the fastest for one-off runs on CPU), written to `KERAS_BACKEND` so that Keras picks it up.
Keras' own default, tensorflow, is often not installed: that is why keras_sd3 chooses for itself.
"""

import importlib.util
import json
import os
import sys

BACKENDS = ("torch", "jax", "tensorflow")
# What Keras writes to keras.json on its first import when there is none.
KERAS_DEFAULT_CONFIG = {"floatx": "float32", "epsilon": 1e-07, "backend": "tensorflow", "image_data_format": "channels_last"}
_problem = None  # what choose_on_import() found wrong, raised by require()


class BackendError(ImportError):
    """The Keras backend asked for is not one keras_sd3 runs on, or is not installed."""


def installed(backend):
    """Whether `backend`'s package can be imported (a None entry in `sys.modules` blocks it)."""
    if backend in sys.modules:
        return sys.modules[backend] is not None
    try:
        return importlib.util.find_spec(backend) is not None
    except (ImportError, ValueError):
        return False


def _check(backend, source):
    """`backend` if it is valid and installed, else a BackendError naming `source` (where it came from)."""
    if backend not in BACKENDS:
        raise BackendError(f"{source} is {backend!r}; keras_sd3 runs on one of {', '.join(BACKENDS)}.")
    if not installed(backend):
        raise BackendError(f"backend {backend!r} ({source}) is not installed: pip install \"keras_sd3[{backend}]\"")
    return backend


def _config_file_backend():
    """`(backend, path)` named in Keras' config file by someone, or None."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(home, "keras.json")
    try:
        with open(path) as f:
            config = json.load(f)
        backend = config.get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return (backend, path) if backend and config != KERAS_DEFAULT_CONFIG else None


def choose(requested=None):
    """Applies the rule above; returns the backend name.

    Raises:
        BackendError: the requested / configured backend is unknown or not installed, or none is installed.
    """
    if requested is not None:
        os.environ["KERAS_BACKEND"] = _check(requested, "--backend")
        return requested
    if os.environ.get("KERAS_BACKEND"):
        return _check(os.environ["KERAS_BACKEND"], "KERAS_BACKEND")
    if "keras" in sys.modules:
        return sys.modules["keras"].config.backend()
    configured = _config_file_backend()
    if configured is not None:
        return _check(configured[0], f"the 'backend' of {configured[1]}")
    for backend in BACKENDS:
        if installed(backend):
            os.environ["KERAS_BACKEND"] = backend
            return backend
    raise BackendError('no Keras backend is installed: pip install "keras_sd3[torch]" (or [jax], [tensorflow])')


def choose_on_import():
    """`choose()` for `import keras_sd3`: a problem is kept and raised by `require()` instead, so that the
    CLI, which imports the package first, can report it as one line."""
    global _problem
    try:
        choose()
    except BackendError as error:
        _problem = error


def require():
    """Called before the first Keras import: if `choose_on_import` found a problem, chooses again (the
    environment may have been fixed since), raising the BackendError that still holds."""
    global _problem
    if _problem is not None:
        choose()
        _problem = None
