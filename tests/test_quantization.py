"""Keras int8 / int4 quantization of keras_sd3's large matrix products.

Proofs: a quantized layer's product equals the closed form of its Keras variables computed in numpy
(weight-only: `x @ (q / s)`; W8A8: per-token abs-max int8 inputs; int4 by groups: `(q - z) * s`); the
quantized weights round the float ones to the nearest step; loading with `quantize=` equals quantizing
after loading, bit for bit; the whole model against the float model within the stated relative errors;
and the tasks, samplers, step cache, ControlNet, explore and LoRA adapters keep working, compiled once.
"""

import keras
import numpy as np
import pytest
from conftest import embedded_controlnet, embedded_lora

from keras_sd3 import explore, quantization
from keras_sd3.backend import compile_function
from keras_sd3.lora import LoraError
from keras_sd3.models import StableDiffusion3Backbone, StableDiffusion3ControlNet, StableDiffusion3TextToImage

PROMPTS = ["a red circle on a blue background", "a small green triangle in the top left on a white background"]
# The embedded model against float, largest difference relative to the largest value, measured alike on jax,
# torch and tensorflow: int8 weight-only: text embeddings 6.6-7.8e-3, denoise_step 1.6e-2; W8A8: 1.2-1.8e-2,
# 3.5-3.6e-2; int4 (Keras' default, groups of 128: whole columns of this 128-wide model) 1.0-1.6e-1, 1.6e-1.
MAX_RELATIVE = {"int8": 2.5e-2, "w8a8": 6e-2, "int4": 0.3}


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def _embedded(**kwargs):
    return StableDiffusion3Backbone.from_preset("sd3_tiny_shapes", **kwargs)


def _layer(backbone, path="diffuser/transformer_blocks_1/attn/to_q"):
    return next(layer for layer in quantization.selected_layers(backbone, "mmdit") + _quantized(backbone)
                if layer._kernel.path == f"{path}/kernel")


def _quantized(backbone):
    from keras_sd3.models.layers import Linear

    return [layer for layer in backbone._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, Linear) and layer.quantization_mode is not None]


def _w8a8():
    return keras.quantizers.Int8QuantizationConfig()


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4"])
def test_layer_equals_closed_form(mode):
    """The layer's output equals numpy's product with the dequantised kernel, and the stored values are
    the float kernel rounded to the nearest quantisation step."""
    backbone = _embedded()
    layer = _layer(backbone)
    weight = _np(layer._kernel)  # (in, out) float
    kind = "int4" if mode == "int4" else "int8"
    layer.quantize(kind, config=_w8a8() if mode == "w8a8" else quantization.resolve_config(kind, None))
    x = np.random.default_rng(0).standard_normal((2, 40, weight.shape[0])).astype("float32")
    bias = _np(layer.bias)
    if mode == "int4":
        q = _np(keras.quantizers.unpack_int4(layer._kernel.value, weight.shape[1], axis=-1))
        groups = _np(layer.g_idx).astype(int)
        scale, zero = _np(layer.kernel_scale)[groups], _np(layer.kernel_zero)[groups]  # (in, out)
        assert q.min() >= -8 and q.max() <= 7
        dequantised = (q - zero) * scale
        assert np.abs(dequantised - weight).max() <= 0.5 * scale.max() * (1 + 1e-5)  # nearest step
        expected = x @ dequantised + bias
    else:
        q, scale = _np(layer._kernel.value), _np(layer.kernel_scale)
        assert layer._kernel.dtype == "int8" and np.abs(q).max() <= 127
        np.testing.assert_allclose(scale, 127 / (np.abs(weight).max(axis=0) + keras.config.epsilon()), rtol=1e-6)
        assert np.abs(q / scale - weight).max() <= (0.5 / scale).max() * (1 + 1e-5)
        if mode == "w8a8":
            x_scale = 127 / (np.abs(x).max(axis=-1, keepdims=True) + keras.config.epsilon())
            x_q = np.clip(np.round(x * x_scale), -127, 127)
            expected = (x_q @ q) / (scale * x_scale) + bias
        else:
            expected = x @ (q / scale) + bias
    actual = _np(layer(keras.ops.convert_to_tensor(x)))
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_which_layers_are_quantized():
    """The LAYOUT tables' matrix products of the MMDiT and the text encoders; norms, embedders, the
    output projection and the VAE stay float. A dict quantizes only the parts it names."""
    backbone = _embedded()
    backbone.quantize("int8")
    paths = {layer._kernel.path for layer in _quantized(backbone)}
    blocks = backbone.mmdit_config.num_layers
    assert "diffuser/transformer_blocks_0/attn/to_q/kernel" in paths
    assert "diffuser/transformer_blocks_0/norm1/linear/kernel" in paths and "diffuser/context_embedder/kernel" in paths
    assert "clip_g/text_model/encoder/layers_0/mlp/fc1/kernel" in paths
    assert not any(p.startswith(("vae/", "diffuser/time_text_embed", "diffuser/proj_out", "diffuser/pos_embed"))
                   for p in paths)
    assert len([p for p in paths if p.startswith("diffuser/transformer_blocks_")]) >= 10 * blocks - 2
    # every quantized variable still has its checkpoint-named path (the layout map and loading read them)
    for layer in _quantized(backbone):
        assert layer.kernel_scale.path == layer._kernel.path.replace("/kernel", "/kernel_scale")
    parts = _embedded()
    parts.quantize({"mmdit": "int4"})
    assert {p.split("/")[0] for p in (layer._kernel.path for layer in _quantized(parts))} == {"diffuser"}
    assert {layer.quantization_mode for layer in _quantized(parts)} == {"int4"}


def test_bad_arguments_name_the_problem():
    backbone = _embedded()
    for quantize, message in (("int3", "must be one of"), ({"vae": "int8"}, "the parts are"), (8, "must be None")):
        with pytest.raises(ValueError, match=message):
            _embedded(quantize=quantize)
    with pytest.raises(ValueError, match="float16 compute dtype"):
        _embedded(quantize="int8", dtype="float16")
    with pytest.raises(ValueError, match="needs a mode"):
        backbone.quantize()
    with pytest.raises(ValueError, match="weight-only"):
        backbone.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=None,
            activation_quantizer=keras.quantizers.AbsMaxQuantizer(axis=-1)))
    assert not _quantized(backbone)  # nothing half-done


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_quantized_equals_quantizing_after(mode):
    loaded = _embedded(quantize=mode)
    after = _embedded()
    after.quantize(mode)
    assert len(loaded.variables) == len(after.variables)
    for a, b in zip(sorted(loaded.variables, key=lambda v: v.path), sorted(after.variables, key=lambda v: v.path)):
        assert a.path == b.path and a.dtype == b.dtype
        np.testing.assert_array_equal(_np(a), _np(b), err_msg=a.path)


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4"])
def test_model_against_float(mode):
    """denoise_step and the text embeddings of the quantized embedded model against the float one."""
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    quantized = StableDiffusion3TextToImage.from_preset(
        "sd3_tiny_shapes", quantize="int4" if mode == "int4" else "int8",
        quantization_config=_w8a8() if mode == "w8a8" else None)
    ids = task.preprocessor.generate_preprocess(PROMPTS)
    negative = task.preprocessor.generate_preprocess(["", ""])
    expected = task.compiled.encode_text(ids, negative)
    actual = quantized.compiled.encode_text(ids, negative)
    for e, a in zip(expected, actual):
        assert np.abs(_np(a) - _np(e)).max() / np.abs(_np(e)).max() <= MAX_RELATIVE[mode]
    latents = np.random.default_rng(0).standard_normal((2, *task.backbone.latent_shape)).astype("float32")
    step = lambda t: compile_function(t.backbone, lambda x, *e: t.backbone.denoise_step(x, e, 3, 8, 4.0))  # noqa: E731
    e = _np(step(task)(latents, *expected))
    a = _np(step(quantized)(latents, *expected))
    relative = np.abs(a - e).max() / np.abs(e).max()
    assert 0 < relative <= MAX_RELATIVE[mode], relative


def test_tasks_samplers_cache_controlnet_explore_compiled_once(tmp_path):
    """Everything runs on an int8 backbone, each program compiled once; images stay close to float's."""
    float_task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", quantize="int8")
    reference = float_task.generate(PROMPTS, num_steps=4, seed=0).astype(int)
    images = task.generate(PROMPTS, num_steps=4, seed=0).astype(int)
    assert np.abs(images - reference).mean() < 3, np.abs(images - reference).mean()
    traces = task.compiled.traces
    task.generate(PROMPTS[::-1], num_steps=3, seed=1)
    if keras.config.backend() != "torch":  # (torch compiles nothing: its body runs at every call)
        assert task.compiled.traces == traces  # other prompts and steps: the same programs
    for sampler in ("heun", "dpmpp_2m"):
        assert task.generate(PROMPTS[:1], num_steps=3, seed=0, sampler=sampler).shape == (1, 64, 64, 3)
    task.generate(PROMPTS[0], num_steps=6, seed=0, step_cache=0.15)
    assert task.step_cache_skipped >= 0
    frames = explore.circular_walk(task, PROMPTS[0], 4, seed=1, num_steps=2)
    assert frames.shape == (4, 64, 64, 3)
    net = embedded_controlnet(str(tmp_path / "controlnet"))
    controlled = StableDiffusion3ControlNet.from_preset("sd3_tiny_shapes", net, quantize="int8")
    control = np.zeros((64, 64, 3), "float32")
    assert controlled.generate({"prompts": PROMPTS[:1], "control_images": control}, num_steps=2).shape == (1, 64, 64, 3)


def test_lora_stays_float_on_a_quantized_kernel(tmp_path):
    """A LoRA on a quantized backbone adds exactly its float product; unload gives the quantized model's
    outputs back bit for bit; fuse_loras refuses, leaving everything as it was."""
    path = embedded_lora(tmp_path / "lora.safetensors")
    backbone = _embedded(quantize="int8")
    layer = _layer(backbone, "diffuser/transformer_blocks_0/attn/to_q")
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).standard_normal((1, 5, 128)).astype("float32"))
    base = _np(layer(x))
    backbone.load_lora(path, scale=0.5)
    adapter = next(iter(layer._lora_adapters.values()))
    np.testing.assert_allclose(_np(layer(x)), base + _np(adapter(x)), rtol=1e-5, atol=1e-6)
    assert np.abs(_np(adapter(x))).max() > 1e-3
    backbone.set_lora_scale(next(iter(backbone.lora_names)), 0.0)
    np.testing.assert_allclose(_np(layer(x)), base, atol=1e-6)
    with pytest.raises(LoraError, match="quantized layers"):
        backbone.fuse_loras()
    assert layer._lora_adapters  # not dropped by the refusal
    backbone.unload_lora(next(iter(backbone.lora_names)))
    np.testing.assert_array_equal(_np(layer(x)), base)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="jax: the dequantisation inside the compiled program")
def test_jax_program_takes_int8_weights():
    """The compiled denoising program receives the int8 kernels as its inputs and converts them inside
    (XLA sees the dequantisation, so it can fuse it), rather than float copies made outside."""
    import jax

    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", quantize="int8")
    backbone = task.backbone
    embeddings = task.encode(PROMPTS[:1], [""])
    latents = np.zeros((1, *backbone.latent_shape), "float32")
    variables = backbone.trainable_variables + backbone.non_trainable_variables

    def step(state, latents):
        with keras.StatelessScope(state_mapping=zip(variables, state)):
            return backbone.denoise_step(latents, embeddings, 0, 4, 4.0)

    text = jax.jit(step).lower([v.value for v in variables], latents).as_text()
    int8_inputs = sum(1 for v in variables if v.dtype == "int8")
    assert int8_inputs >= 40
    assert text.count("tensor<128x128xi8>") >= 1 and "stablehlo.convert" in text
