"""Which backend `import keras_sd3` and `keras-sd3` choose, in fresh processes (Keras picks its backend
once per process). Missing backends are simulated with a None entry in `sys.modules`, which is how
Python marks a module that cannot be imported."""

import json
import os
import subprocess
import sys

import pytest


def run_python(code, tmp_path, keras_backend=None, keras_json=None, block=()):
    """Runs `code` in a fresh interpreter with an empty Keras home (or one holding `keras_json`)."""
    home = tmp_path / "keras_home"
    home.mkdir(exist_ok=True)
    if keras_json is not None:
        (home / "keras.json").write_text(json.dumps(keras_json))
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(home), **({"KERAS_BACKEND": keras_backend} if keras_backend else {}))
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in block)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


BACKEND_OF_IMPORT = "import keras_sd3\nprint(keras_sd3.backend_name())"


@pytest.mark.parametrize(
    "block, expected",
    [((), "torch"), (("torch",), "jax"), (("torch", "jax"), "tensorflow")],
)
def test_import_picks_the_first_installed_backend(tmp_path, block, expected):
    result = run_python(BACKEND_OF_IMPORT, tmp_path, block=block)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == expected


def test_keras_json_and_an_earlier_keras_import_are_respected(tmp_path):
    user_choice = {"backend": "jax", "floatx": "float32"}
    result = run_python(BACKEND_OF_IMPORT, tmp_path, keras_json=user_choice)
    assert result.stdout.split()[-1] == "jax", result.stderr[-2000:]
    # The file Keras writes by itself on its first import names no one's choice.
    keras_written = {"floatx": "float32", "epsilon": 1e-07, "backend": "tensorflow", "image_data_format": "channels_last"}
    result = run_python(BACKEND_OF_IMPORT, tmp_path, keras_json=keras_written)
    assert result.stdout.split()[-1] == "torch", result.stderr[-2000:]
    code = "import os\nos.environ['KERAS_BACKEND'] = 'jax'\nimport keras\ndel os.environ['KERAS_BACKEND']\n"
    result = run_python(code + BACKEND_OF_IMPORT, tmp_path)
    assert result.stdout.split()[-1] == "jax", result.stderr[-2000:]


@pytest.mark.parametrize(
    "keras_backend, block, message",
    [
        ("bogus", (), "KERAS_BACKEND is 'bogus'; keras_sd3 runs on one of torch, jax, tensorflow."),
        ("jax", ("jax",), "backend 'jax' (KERAS_BACKEND) is not installed: pip install \"keras_sd3[jax]\""),
    ],
)
def test_a_bad_backend_is_named_before_keras_is_imported(tmp_path, keras_backend, block, message):
    code = "import keras_sd3\ntry:\n    import keras_sd3.models\nexcept ImportError as e:\n    print(repr(e))\n" \
           "print('keras' in sys.modules)"
    result = run_python(code, tmp_path, keras_backend=keras_backend, block=block)
    lines = result.stdout.splitlines()
    assert lines[-2] == f"BackendError({message!r})" and lines[-1] == "False", result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize(
    "arguments, keras_backend, block, message",
    [
        (["--backend", "jax"], None, ("jax",), 'backend \'jax\' (--backend) is not installed: pip install "keras_sd3[jax]"'),
        ([], "bogus", (), "KERAS_BACKEND is 'bogus'; keras_sd3 runs on one of torch, jax, tensorflow."),
    ],
)
def test_the_cli_reports_a_bad_backend_in_one_line(tmp_path, arguments, keras_backend, block, message):
    code = f"from keras_sd3.cli import main\nsys.exit(main(['generate', 'a red circle', *{arguments!r}]))"
    result = run_python(code, tmp_path, keras_backend=keras_backend, block=block)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"keras-sd3: error: {message}"]
    assert not os.path.exists(tmp_path / "image.png")
