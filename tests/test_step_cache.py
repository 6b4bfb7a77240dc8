"""The step cache (`generate(..., step_cache=...)`): exact when it never reuses, the reuse rule computed
by hand from the MMDiT's blocks, a traced threshold, the CLI option and bad settings."""

import keras
import numpy as np
import pytest
from conftest import assert_close
from keras import ops
from PIL import Image

from keras_sd3 import cli, media, sampling
from keras_sd3.models import StableDiffusion3TextToImage
from keras_sd3.models.layers import layer_norm, modulate

PROMPTS = ["a red circle on a blue background", "a small green triangle in the top left on a white background"]


@pytest.fixture(scope="module")
def task():
    return StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")


def test_threshold_zero_never_reuses_and_changes_nothing(task):
    expected = task.generate(PROMPTS, seed=0, num_steps=6, output="latents")
    actual = task.generate(PROMPTS, seed=0, num_steps=6, output="latents", step_cache=0.0)
    assert task.step_cache_skipped == 0
    assert_close(actual, expected, rel=1e-5)


def _by_hand(task, latents, context, pooled, num_steps):
    """Euler without guidance where every step after the first reuses step 0's rest-of-network residual
    (the rule for a threshold no change reaches), written out from the MMDiT's own blocks."""
    mmdit, np_ = task.backbone.diffuser, keras.ops.convert_to_numpy
    (_, h, w, c), p = latents.shape, mmdit.config.patch_size

    def run(x, sigma, rest=None):
        t = ops.full((x.shape[0],), 1000.0 * sigma)
        tokens, temb, ctx = mmdit.pos_embed(x), mmdit.time_text_embed(t, pooled), mmdit.context_embedder(context)
        first, ctx = mmdit.transformer_blocks[0](tokens, ctx, temb)
        if rest is None:
            out = first
            for block in mmdit.transformer_blocks[1:]:
                out, ctx = block(out, ctx, temb)
            rest = out - first
        scale, shift = mmdit.norm_out(temb)
        y = mmdit.proj_out(modulate(layer_norm(first + rest), shift, scale))
        y = ops.transpose(ops.reshape(y, (-1, h // p, w // p, p, p, c)), (0, 1, 3, 2, 4, 5))
        return np_(ops.reshape(y, (-1, h, w, c))), rest

    sigmas = [float(sampling.sigma(i, num_steps)) for i in range(num_steps + 1)]
    x, rest = latents, None
    for i in range(num_steps):
        v, rest_now = run(x, sigmas[i], rest)
        rest = rest_now if rest is None else rest
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_reuse_matches_the_rule_written_by_hand(task):
    num_steps = 4
    latents = task.noise(2, 0)
    embeddings = task.encode(PROMPTS, ["", ""])
    actual = task.generate(None, num_steps=num_steps, guidance_scale=1.0, latents=latents, embeddings=embeddings,
                           output="latents", step_cache=sampling.StepCache(threshold=1e9, warmup_steps=1))
    assert task.step_cache_skipped == num_steps - 1
    expected = _by_hand(task, latents, embeddings[0], embeddings[2], num_steps)
    assert_close(actual, expected, rel=1e-4)


def test_threshold_is_traced_and_more_reuse_for_larger_thresholds(task):
    skipped = []
    for threshold in (0.05, 0.2, 0.5):
        task.generate(PROMPTS, seed=1, step_cache=threshold)
        skipped.append(task.step_cache_skipped)
        if threshold == 0.05:
            traces = task.compiled.traces
    assert skipped == sorted(skipped) and skipped[-1] > skipped[0] and skipped[-1] < 20
    if keras.config.backend() != "torch":  # torch runs eagerly: nothing is traced
        assert task.compiled.traces == traces, "a new threshold recompiled the loop"


@pytest.mark.parametrize("value, message", [
    (-1, "step cache threshold must be a number >= 0, got -1"),
    ("fast", "step_cache must be None, a threshold >= 0 or a keras_sd3.sampling.StepCache, got 'fast'"),
    (True, "step_cache must be None"),
])
def test_bad_step_cache(task, value, message):
    with pytest.raises(ValueError, match=message):
        task.generate("a cat", num_steps=2, step_cache=value)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0, got -1"):
        sampling.StepCache(warmup_steps=-1)


def test_cli_cache_option(tmp_path, task):
    out = str(tmp_path / "cached.png")
    assert cli.main(["generate", PROMPTS[0], "--seed", "4", "--cache", "-o", out]) == 0
    assert media.read_metadata(out)["step_cache"] == sampling.StepCache().threshold
    expected = task.generate({"prompts": PROMPTS[0], "negative_prompts": ""}, seed=4, step_cache=sampling.StepCache())
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
