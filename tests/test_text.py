"""Text side: tokenizers vs transformers, CLIP / T5 encoders vs transformers, encode_text_step vs diffusers."""

import os

import keras
import numpy as np
import pytest
import torch
from conftest import IMAGE_SHAPE, assert_close
from tiny_text import PROMPTS, build_pipeline, build_text_side, train_clip_tokenizer, train_t5_tokenizer

from keras_sd3.models import StableDiffusion3Backbone, StableDiffusion3TextToImagePreprocessor
from keras_sd3.models.clip import CLIPConfig, CLIPTextEncoder
from keras_sd3.models.t5 import T5Config, T5Encoder, relative_position_buckets
from keras_sd3.text.tokenizers import CLIPTokenizer, T5Tokenizer
from keras_sd3.weights.assign import load_layer_weights
from keras_sd3.weights.safetensors_file import open_safetensors


def reference_ids(tokenizer, length):
    return np.array(tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True).input_ids)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_tokens_match_transformers(tmp_path, pad_token):
    from transformers import CLIPTokenizer as Reference

    train_clip_tokenizer(str(tmp_path), pad_token)
    expected = reference_ids(Reference.from_pretrained(str(tmp_path)), 77)
    assert len(PROMPTS) >= 60 and expected.shape == (len(PROMPTS), 77)
    assert (expected[:, -2] != expected[0, -2]).any()  # some prompts are truncated to 77 tokens
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(str(tmp_path))(PROMPTS), expected)


@pytest.mark.parametrize("with_json", [True, False])
@pytest.mark.parametrize("length", [77, 256, 512])
def test_t5_tokens_match_transformers(tmp_path, with_json, length):
    from transformers import T5TokenizerFast

    train_t5_tokenizer(str(tmp_path), with_tokenizer_json=with_json)
    assert os.path.exists(tmp_path / "tokenizer.json") == with_json
    expected = reference_ids(T5TokenizerFast.from_pretrained(str(tmp_path)), length)
    if length == 512:
        assert (expected[:, -1] != 0).any()  # some prompt is longer than 512 tokens
    np.testing.assert_array_equal(T5Tokenizer.from_folder(str(tmp_path), length)(PROMPTS), expected)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    positions = torch.arange(600)
    relative = positions[None, :] - positions[:, None]
    expected = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(relative_position_buckets(600), expected.numpy())


@pytest.fixture(scope="module")
def text_side(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("text"))
    return folder, build_text_side(folder, with_t5=True)


def loaded_encoder(model, encoder_cls, config, folder):
    model.save_pretrained(str(folder))
    keras_model = encoder_cls(config)
    source = open_safetensors(str(folder / "model.safetensors")).without(("text_model.embeddings.position_ids", "encoder.embed_tokens.weight"))
    load_layer_weights(keras_model, source)
    return keras_model


@pytest.mark.parametrize("name", ["", "_2"])
def test_clip_encoder_matches_transformers(text_side, name, tmp_path):
    # hidden_states[-2], hidden_states[-3] (clip_skip=1) and text_embeds; 1e-4 x max |reference|.
    _, parts = text_side
    model, tokenizer = parts["text_encoder" + name], parts["tokenizer" + name]
    config = CLIPConfig.from_transformers(model.config.to_dict())
    ours = loaded_encoder(model, CLIPTextEncoder, config, tmp_path)
    ids = reference_ids(tokenizer, 77)[:8]
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    for clip_skip, index in ((None, -2), (1, -3)):
        hidden, pooled = ours(ids, clip_skip=clip_skip)
        assert_close(keras.ops.convert_to_numpy(hidden), out.hidden_states[index].numpy())
        assert_close(keras.ops.convert_to_numpy(pooled), out.text_embeds.numpy())


def test_t5_encoder_matches_transformers(text_side, tmp_path):
    _, parts = text_side
    model = parts["text_encoder_3"]
    ours = loaded_encoder(model, T5Encoder, T5Config.from_transformers(model.config.to_dict()), tmp_path)
    ids = reference_ids(parts["tokenizer_3"], 160)[:6]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert_close(keras.ops.convert_to_numpy(ours(ids)), expected)


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no_t5"])
def pipeline(request, tmp_path_factory):
    """A tiny StableDiffusion3Pipeline saved with save_pretrained, with or without T5."""
    folder = str(tmp_path_factory.mktemp("pipeline"))
    return folder, build_pipeline(folder, with_t5=request.param)


@pytest.mark.parametrize(
    "max_sequence_length, clip_skip, negative",
    [(77, None, ""), (256, 1, "blurry, low quality"), (256, None, "")],
)
def test_encode_text_step_matches_diffusers(pipeline, max_sequence_length, clip_skip, negative):
    folder, pipe = pipeline
    prompts = ["a red circle on a blue background", "Astronaut in a jungle, cold color palette, 8k"]
    with torch.no_grad():
        expected = pipe.encode_prompt(
            prompts, prompts, prompts, negative_prompt=[negative] * 2, do_classifier_free_guidance=True,
            clip_skip=clip_skip, max_sequence_length=max_sequence_length,
        )
    preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(folder, max_sequence_length=max_sequence_length)
    backbone = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE, t5_zero_tokens=max_sequence_length)
    assert (backbone.t5 is None) == (pipe.text_encoder_3 is None)
    actual = backbone.encode_text_step(
        preprocessor.generate_preprocess(prompts), preprocessor.generate_preprocess([negative] * 2), clip_skip=clip_skip
    )
    # diffusers returns (positive, negative, positive_pooled, negative_pooled), the same order.
    for ours, reference in zip(actual, expected):
        assert_close(keras.ops.convert_to_numpy(ours), reference.numpy())


def test_single_file_with_text_encoders_loads_to_identical_outputs(pipeline, tmp_path):
    # An `*_incl_clips[_t5xxl]`-style file: original MMDiT / VAE keys plus text_encoders.* (no CLIP-L projection).
    from safetensors.numpy import load_file, save_file
    from test_checkpoints import to_original_mmdit, to_original_vae

    folder, pipe = pipeline
    read = lambda *parts: load_file(os.path.join(folder, *parts))
    tensors = {
        **to_original_mmdit(read("transformer", "diffusion_pytorch_model.safetensors"), pipe.transformer.config.num_layers),
        **to_original_vae(read("vae", "diffusion_pytorch_model.safetensors")),
    }
    prefixes = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}
    for subfolder, name in prefixes.items():
        if os.path.isdir(os.path.join(folder, subfolder)):
            for key, value in read(subfolder, "model.safetensors").items():
                if not (name == "clip_l" and key == "text_projection.weight"):
                    tensors[f"text_encoders.{name}.transformer.{key}"] = value
    path = str(tmp_path / "sd3_incl_clips.safetensors")
    save_file(tensors, path)

    preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset(folder, max_sequence_length=77)
    ids = preprocessor.generate_preprocess(["a red circle", "a blue square"])
    negative_ids = preprocessor.generate_preprocess(["", "green"])
    from_file = StableDiffusion3Backbone.from_preset(path, image_shape=IMAGE_SHAPE)
    from_folder = StableDiffusion3Backbone.from_preset(folder, image_shape=IMAGE_SHAPE)
    assert from_file.text_configs == from_folder.text_configs
    for a, b in zip(from_file.encode_text_step(ids, negative_ids), from_folder.encode_text_step(ids, negative_ids)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_missing_text_tensor_is_named(pipeline, tmp_path):
    import shutil

    from keras_sd3.weights import CheckpointError
    from safetensors.numpy import load_file, save_file

    folder, _ = pipeline
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = str(copy / "text_encoder_2" / "model.safetensors")
    tensors = load_file(path)
    del tensors["text_model.encoder.layers.1.mlp.fc1.bias"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"clip_g encoder .* missing 1 tensor.*'text_model\.encoder\.layers\.1\.mlp\.fc1\.bias'"):
        StableDiffusion3Backbone.from_preset(str(copy), image_shape=IMAGE_SHAPE)
