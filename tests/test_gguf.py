"""GGUF files (city96's SD3 / SD3.5 transformers, llama.cpp's T5 encoders) against diffusers and transformers.

The files are written here with the `gguf` package, of mixed types: Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1
quantised by gguf-py; Q2_K - Q6_K as random blocks with moderate float16 scales (gguf-py cannot quantise
K-quants); F16 and F32. diffusers loads the transformer with `GGUFQuantizationConfig(compute_dtype=float32)`
and its block decoders made to work in float32 (by default they multiply the float16 scales in float16,
3e-4 relative from ggml's float32 dequantisation); the T5 reference is transformers' model fed gguf-py's
dequantised weights.
"""

import functools
import os

import gguf
import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, VARIANTS, assert_close, build_reference, random_inputs, reference_velocity, to_nchw
from safetensors.numpy import load_file, save_file
from test_checkpoints import TIMESTEPS
from test_checkpoints import to_original_mmdit as independent_map
from test_tasks import assert_images_close, noise, reference
from tiny_text import build_pipeline

from keras_sd3.errors import CheckpointError
from keras_sd3.models import StableDiffusion3Backbone, StableDiffusion3TextToImage
from keras_sd3.models.layers import Linear
from keras_sd3.quantization.stored import stored_weight
from keras_sd3.weights.assign import named_variables
from keras_sd3.weights.checkpoint import open_checkpoint

Q = gguf.GGMLQuantizationType
PREFIX = "model.diffusion_model."
STANDARD = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Byte offsets of a K-quant block's float16 scales, and a scale size giving weights of about 0.02.
K_SCALES = {Q.Q2_K: ((80, 82), 2e-3), Q.Q3_K: ((108,), 6e-4), Q.Q4_K: ((0, 2), 1e-4), Q.Q5_K: ((0, 2), 4e-5),
            Q.Q6_K: ((208,), 2e-5)}


def k_blocks(ggml_type, shape, rng):
    """Random (rows, row bytes) blocks of a K-quant type: every bit pattern of the packed fields, scales ~ N(0, s)."""
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(shape[0] * shape[1] // block, size), dtype=np.uint8)
    offsets, scale = K_SCALES[ggml_type]
    for offset in offsets:
        raw[:, offset:offset + 2] = (rng.normal(size=len(raw)) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(shape[0], -1)


def write_gguf(path, tensors, types, architecture, seed=0):
    """Writes `tensors` ({name: float32 array}) as types[name]; K-quant tensors get random blocks instead.

    Returns {name: ggml type}."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, architecture)
    for name, value in tensors.items():
        kind = types.get(name, Q.F32)
        data = k_blocks(kind, value.shape, rng) if kind in K_QUANTS else gguf.quants.quantize(value, kind)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: types.get(name, Q.F32) for name in tensors}


def mixed_types(tensors):
    """K-quants on the matrices with rows of 256 values (MLP outputs, the context embedder), the standard types in
    turn on the other matrices with whole blocks of 32, F16 for the patch embedder, F32 for the rest."""
    types, standard, k_quants = {}, iter(STANDARD * 100), iter(K_QUANTS * 100)
    for name, value in sorted(tensors.items()):
        if value.ndim == 2 and value.shape[1] % 256 == 0 and ("mlp.fc2" in name or "context_embedder" in name):
            types[name] = next(k_quants)
        elif value.ndim == 2 and value.shape[1] % 32 == 0:
            types[name] = next(standard)
        elif value.ndim == 4:
            types[name] = Q.F16
    return types


def float32_diffusers_decoders(monkeypatch):
    import diffusers.quantizers.gguf.utils as utils

    for kind, decode in list(utils.dequantize_functions.items()):
        monkeypatch.setitem(utils.dequantize_functions, kind, functools.partial(decode, dtype=torch.float32))


def diffusers_from_gguf(path, folder, subfolder="transformer"):
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel

    return SD3Transformer2DModel.from_single_file(
        path, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=folder,
        subfolder=subfolder, torch_dtype=torch.float32)


def original_tensors(transformer_folder, num_layers):
    state = load_file(os.path.join(transformer_folder, "diffusion_pytorch_model.safetensors"))
    return {k[len(PREFIX):]: v.astype(np.float32) for k, v in independent_map(state, num_layers).items()}


@pytest.fixture(scope="module", params=["sd3", "sd35_medium"])
def gguf_transformer(request, tmp_path_factory):
    """(folder, GGUF path, {name: type}) of a tiny variant, its transformer written as a mixed GGUF."""
    folder = str(tmp_path_factory.mktemp(request.param))
    build_reference(folder, request.param)
    tensors = original_tensors(os.path.join(folder, "transformer"), VARIANTS[request.param]["num_layers"])
    path = os.path.join(folder, "transformer.gguf")
    types = write_gguf(path, tensors, mixed_types(tensors), "sd3")
    return folder, path, types, StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE, transformer=path)


def test_transformer_matches_diffusers_gguf(gguf_transformer, monkeypatch):
    folder, path, types, backbone = gguf_transformer
    assert set(types.values()) == {*STANDARD, *K_QUANTS, Q.F32}
    inputs = (*random_inputs(), TIMESTEPS)
    ours = keras.ops.convert_to_numpy(backbone.diffuser(*inputs))
    float32_diffusers_decoders(monkeypatch)
    assert_close(ours, reference_velocity(diffusers_from_gguf(path, folder), *inputs), rel=1e-4)  # measured: jax 2e-6, torch 4.8e-7, tensorflow 2.3e-6


@pytest.mark.parametrize("rows", [None, 8])
def test_weights_stay_in_blocks_and_decode_as_gguf_py(gguf_transformer, rows, monkeypatch):
    """Each Linear weight of a block type is held as its uint8 blocks (a fused qkv as three parts), and decodes
    inside keras (`stored_weight`) to gguf-py's `dequantize` of those bytes, bit for bit; also when decoded
    `rows` rows at a time, as torch decodes large matrices (`stored.TORCH_ROWS`)."""
    from keras_sd3.quantization import stored as stored_module

    if rows is not None:
        monkeypatch.setattr(stored_module, "_TORCH", True)
        monkeypatch.setattr(stored_module, "TORCH_ROWS", rows)
    folder, path, types, backbone = gguf_transformer
    tensors = open_checkpoint(folder, transformer=path).mmdit.tensors
    stored = {layer._kernel.path: layer for layer in backbone.diffuser._flatten_layers()
              if isinstance(layer, Linear) and layer.weight_format is not None}
    kinds = {layer.weight_format.name for layer in stored.values()}
    assert kinds == {t.name for t in (*STANDARD, *K_QUANTS) if t != Q.F16}
    expected = sum(3 if name.endswith("qkv.weight") else 1 for name, t in types.items()
                   if t not in (Q.F16, Q.F32) and name != "x_embedder.proj.weight")
    assert len(stored) == expected
    keys = {var.path: key for key, var, _ in named_variables(backbone.diffuser)}
    for variable_path, layer in stored.items():
        assert layer._kernel.dtype == "uint8"
        key = keys[variable_path]
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(stored_weight(layer)), tensors.read_float(key),
                                      err_msg=key)


T5_NAMES = {"shared": "token_embd", "encoder.final_layer_norm": "enc.output_norm"}
T5_LAYER_NAMES = {
    "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k", "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o", "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.0.layer_norm": "attn_norm", "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down", "layer.1.layer_norm": "ffn_norm",
}
T5_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q8_0, "attn_k": Q.Q4_K, "attn_v": Q.Q5_0, "attn_o": Q.F16,
            "ffn_gate": Q.Q6_K, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}


def llama_cpp_t5_name(key):
    """transformers' T5 name -> llama.cpp's (written out independently of keras_sd3's map)."""
    module, _, kind = key.rpartition(".")
    if module in T5_NAMES:
        return f"{T5_NAMES[module]}.{kind}"
    _, _, block, rest = module.split(".", 3)  # encoder.block.N.<layer>
    return f"enc.blk.{block}.{T5_LAYER_NAMES[rest]}.{kind}"


def write_t5_gguf(folder, path):
    """The pipeline's T5 as a llama.cpp-named GGUF; returns its tensors dequantised by gguf-py, transformers-named."""
    state = load_file(os.path.join(folder, "text_encoder_3", "model.safetensors"))
    state = {llama_cpp_t5_name(k): v.astype(np.float32) for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    types = {name: T5_TYPES[name.split(".")[-2]] for name in state if name.split(".")[-2] in T5_TYPES}
    write_gguf(path, state, types, "t5encoder", seed=1)
    reader = gguf.GGUFReader(path)
    names = {llama_cpp_t5_name(k): k for k in load_file(os.path.join(folder, "text_encoder_3", "model.safetensors"))}
    return {names[t.name]: torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
                                            .reshape(tuple(int(d) for d in t.shape[::-1])).astype(np.float32))
            for t in reader.tensors}


def test_pipeline_with_gguf_transformer_and_t5_matches_diffusers(tmp_path, monkeypatch):
    """Text to image with the transformer and T5 from GGUF files, everything else from the folder: diffusers'
    pipeline with its GGUF transformer and transformers' T5 of the dequantised weights; images within 2/255."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    folder = str(tmp_path)
    pipe = build_pipeline(folder, with_t5=True)
    tensors = original_tensors(os.path.join(folder, "transformer"), VARIANTS["sd3"]["num_layers"])
    transformer_path, t5_path = str(tmp_path / "mmdit.gguf"), str(tmp_path / "t5.gguf")
    write_gguf(transformer_path, tensors, mixed_types(tensors), "sd3")
    t5_state = write_t5_gguf(folder, t5_path)
    task = StableDiffusion3TextToImage.from_preset(folder, image_shape=IMAGE_SHAPE, transformer=transformer_path,
                                                   t5=t5_path)
    latents = noise(1)
    ours = task.generate("a red circle on a blue background", num_steps=2, guidance_scale=5.0, latents=latents)
    float32_diffusers_decoders(monkeypatch)
    t5 = T5EncoderModel(pipe.text_encoder_3.config).eval()
    t5.load_state_dict({**t5_state, "encoder.embed_tokens.weight": t5_state["shared.weight"]})
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": diffusers_from_gguf(transformer_path, folder),
                                       "text_encoder_3": t5})
    expected = reference(pipe, StableDiffusion3Pipeline, "pipeline_stable_diffusion_3", latents,
                         prompt="a red circle on a blue background", num_inference_steps=2, guidance_scale=5.0,
                         height=IMAGE_SHAPE[0], width=IMAGE_SHAPE[1], latents=to_nchw(latents))
    assert_images_close(ours, expected[0])


def test_unsupported_type_names_tensor_and_type(tmp_path):
    path = str(tmp_path / "x.gguf")
    writer = gguf.GGUFWriter(path, "sd3")
    writer.add_tensor("pos_embed", np.zeros((1, 4, 36), np.uint8), raw_dtype=Q.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"tensor 'pos_embed' is of GGUF type IQ4_NL.*supported types: F32, "
                                              r"F16, BF16, .*Q8_0.*Q6_K"):
        StableDiffusion3Backbone.from_preset("sd3_tiny_shapes", transformer=path)


def test_misshaped_tensor_wrong_architecture_and_not_gguf(gguf_transformer, tmp_path):
    folder = gguf_transformer[0]
    tensors = original_tensors(os.path.join(folder, "transformer"), 3)
    wide = dict(tensors, **{"joint_blocks.1.x_block.mlp.fc1.weight": np.zeros((512, 160), np.float32)})
    path = str(tmp_path / "wide.gguf")
    write_gguf(path, wide, {"joint_blocks.1.x_block.mlp.fc1.weight": Q.Q8_0}, "sd3")
    with pytest.raises(CheckpointError, match=r"'transformer_blocks.1.ff.net.0.proj.weight' in the transformer "
                                              r".*wide.gguf has shape \(512, 160\), but the model expects \(512, 128\)"):
        StableDiffusion3Backbone.from_preset(folder, transformer=path)
    flux = str(tmp_path / "flux.gguf")
    write_gguf(flux, {"img_in.weight": np.zeros((4, 32), np.float32)}, {}, "flux")
    with pytest.raises(CheckpointError, match=r"flux.gguf is a GGUF file of architecture 'flux'; an SD3 / SD3.5 "
                                              r"transformer has 'sd3'"):
        StableDiffusion3Backbone.from_preset(folder, transformer=flux)
    with pytest.raises(CheckpointError, match="a T5 encoder has one of"):
        StableDiffusion3Backbone.from_preset(folder, t5=flux)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="garbage.gguf is not a readable GGUF file"):
        StableDiffusion3Backbone.from_preset(folder, transformer=str(garbage))
    with pytest.raises(CheckpointError, match=r"must be a \.gguf or \.safetensors file"):
        save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "x.bin"))
        StableDiffusion3Backbone.from_preset(folder, transformer=str(tmp_path / "x.bin"))


def test_lora_export_and_t5_tokenizer_on_a_gguf_mmdit(tmp_path):
    """On the embedded model with its MMDiT converted to Q4_0: a LoRA adds its float product on top of the stored
    kernel and fuse_loras refuses; an export writes the weights gguf-py decodes; `t5=` without a T5 tokenizer
    is refused before anything is read."""
    from conftest import embedded_lora

    from keras_sd3.lora.formats import LoraError
    from keras_sd3.quantization.convert import convert_to_gguf
    from keras_sd3.weights.export import layer_state_dict

    path = convert_to_gguf("sd3_tiny_shapes", str(tmp_path / "mmdit.gguf"), "Q4_0")
    backbone = StableDiffusion3Backbone.from_preset("sd3_tiny_shapes", transformer=path)
    layer = backbone.diffuser.transformer_blocks[0].attn.to_q
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).standard_normal((1, 5, 128)).astype("float32"))
    base = keras.ops.convert_to_numpy(layer(x))
    backbone.load_lora(embedded_lora(tmp_path / "lora.safetensors"), scale=0.5)
    adapter = next(iter(layer._lora_adapters.values()))
    delta = keras.ops.convert_to_numpy(adapter(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), base + delta, rtol=1e-5, atol=1e-6)
    assert np.abs(delta).max() > 1e-3
    with pytest.raises(LoraError, match="quantized layers"):
        backbone.fuse_loras()
    backbone.unload_lora(next(iter(backbone.lora_names)))
    tensors = open_checkpoint("sd3_tiny_shapes", transformer=path).mmdit.tensors
    state = layer_state_dict(backbone.diffuser)
    assert sorted(state) == sorted(tensors.keys())
    for key in ("transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.ff.net.2.weight", "pos_embed.pos_embed"):
        np.testing.assert_array_equal(state[key], tensors.read_float(key), err_msg=key)
    (tmp_path / "t5.gguf").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match=r"needs T5's tokenizer, and .*sd3_tiny_shapes has none"):
        StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", t5=str(tmp_path / "t5.gguf"))
