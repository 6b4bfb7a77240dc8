"""The persistent compilation cache: where it lives, that a second process reads it, and that it can be
moved or turned off. Generation runs in fresh processes (the cache is set up when keras_sd3 is imported)."""

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_sd3 import backend

BACKEND = keras.config.backend()
SCRIPT = """
import json, os, sys
hits = []
if os.environ["KERAS_BACKEND"] == "jax":
    import jax
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
from keras_sd3.models import StableDiffusion3TextToImage
task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
task.generate("a red circle on a blue background", seed=0, num_steps=2)
folder = None
if os.environ["KERAS_BACKEND"] == "jax":
    folder = jax.config.jax_compilation_cache_dir
print(json.dumps({"hits": hits.count("/jax/compilation_cache/cache_hits"),
                  "misses": hits.count("/jax/compilation_cache/cache_misses"), "folder": folder}))
"""


def run_generation(**env):
    # Not this process's TF_XLA_FLAGS: importing keras_sd3 here put the test run's cache folder in it.
    inherited = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env={**inherited, "KERAS_BACKEND": BACKEND, **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def listing(folder):
    """{file: modification time} of everything under `folder`."""
    return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(folder) for name in names}


def test_folder_rules(monkeypatch, tmp_path):
    monkeypatch.delenv(backend.CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backend.compilation_cache_folder("jax") == str(tmp_path / "xdg" / "keras_sd3" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert backend.compilation_cache_folder("tensorflow") == os.path.expanduser("~/.cache/keras_sd3/tensorflow")
    monkeypatch.setenv(backend.CACHE_VARIABLE, str(tmp_path / "moved"))
    assert backend.compilation_cache_folder("jax") == str(tmp_path / "moved" / "jax")
    assert backend.compilation_cache_folder("torch") is None  # torch runs eagerly: nothing to keep
    monkeypatch.setenv(backend.CACHE_VARIABLE, "0")
    assert backend.compilation_cache_folder("jax") is None


@pytest.mark.skipif(BACKEND == "torch", reason="torch compiles nothing; test_folder_rules covers it")
def test_a_second_process_reads_the_cache(tmp_path):
    first = run_generation(KERAS_SD3_CACHE=str(tmp_path))
    written = listing(tmp_path / BACKEND)
    assert written, "the first process wrote no compiled program"
    second = run_generation(KERAS_SD3_CACHE=str(tmp_path))
    assert listing(tmp_path / BACKEND) == written  # nothing compiled and written again
    if BACKEND == "jax":
        assert first["folder"] == str(tmp_path / "jax") and first["hits"] == 0 and first["misses"] > 0
        assert second["hits"] == first["misses"] and second["misses"] == 0


@pytest.mark.skipif(BACKEND == "torch", reason="torch compiles nothing; test_folder_rules covers it")
def test_the_cache_can_be_turned_off_and_a_users_own_is_kept(tmp_path):
    home = tmp_path / "home"
    result = run_generation(KERAS_SD3_CACHE="0", XDG_CACHE_HOME=str(home), HOME=str(home))
    assert not (home / ".cache" / "keras_sd3").exists() and result["folder"] is None
    if BACKEND == "jax":
        own = str(tmp_path / "own")
        assert run_generation(JAX_COMPILATION_CACHE_DIR=own, KERAS_SD3_CACHE=str(tmp_path / "ours"))["folder"] == own
        assert not (tmp_path / "ours").exists()
