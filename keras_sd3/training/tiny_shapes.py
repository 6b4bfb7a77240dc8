"""Trains the embedded preset `sd3_tiny_shapes` from scratch: an SD3-architecture model of simple shapes.

`python scripts/train_tiny_shapes.py --output keras_sd3/embedded/sd3_tiny_shapes` reruns it: a CLIP
tokenizer trained on the caption words, random frozen tiny CLIP-L / CLIP-G encoders (seeded), a tiny
VAE trained on the pictures, then the MMDiT trained with rectified flow on the VAE latents. The
result is written as a diffusers folder (loadable by keras_sd3 and by diffusers).
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
from keras import ops

from keras_sd3.models.backbone import StableDiffusion3Backbone
from keras_sd3.presets import PRESETS
from keras_sd3.models.clip import CLIPConfig
from keras_sd3.models.config import MMDiTConfig, VAEConfig
from keras_sd3.text.preprocessor import StableDiffusion3TextToImagePreprocessor
from keras_sd3.text.tokenizers import CLIPTokenizer
from keras_sd3.training import clip_tokenizer, shapes, trainer
from keras_sd3.weights.export import save_diffusers_folder

IMAGE_SIZE = 64
CLIP_LENGTH = 32  # tokens per caption (captions have at most 14 words)
VAE = VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, scaling_factor=1.0,
                shift_factor=0.0)


def mmdit_config(num_layers=4):
    return MMDiTConfig(num_layers=num_layers, num_attention_heads=2, attention_head_dim=64, patch_size=2,
                       joint_attention_dim=192, caption_projection_dim=128, pooled_projection_dim=192,
                       pos_embed_max_size=32, sample_size=IMAGE_SIZE // VAE.downsample_factor)


def clip_configs(vocab_size):
    common = dict(vocab_size=vocab_size, intermediate_size=128, num_hidden_layers=2, eos_token_id=vocab_size - 1,
                  max_position_embeddings=CLIP_LENGTH)
    return (CLIPConfig(hidden_size=64, num_attention_heads=1, projection_dim=64, **common),
            CLIPConfig(hidden_size=128, num_attention_heads=2, projection_dim=128, hidden_act="gelu", **common))


def log(message, start=[time.time()]):  # noqa: B006 (the default is the start time)
    print(f"[{time.time() - start[0]:7.1f} s] {message}", flush=True)


def encode_captions(backbone, preprocessor, captions, batch_size=64):
    """Distinct captions -> (contexts (K, T, D), pooled (K, P)) as float32 numpy."""
    contexts, pooled = [], []
    for i in range(0, len(captions), batch_size):
        context, pool = backbone.encode_text(preprocessor.generate_preprocess(captions[i : i + batch_size]))
        contexts.append(ops.convert_to_numpy(context))
        pooled.append(ops.convert_to_numpy(pool))
    return np.concatenate(contexts), np.concatenate(pooled)


def build(output, num_images=8000, vae_steps=800, mmdit_steps=3000, batch_size=64, num_layers=4, seed=0,
          dtype="float16", resume=None, learning_rate=1e-3):
    """Trains the model and writes it to `output` (a diffusers folder). Returns the backbone.

    With `resume` (a folder written by an earlier `build`), training continues from its weights and
    tokenizer on a fresh dataset drawn from `seed` (pass `vae_steps=0` to keep its VAE).
    """
    keras.utils.set_random_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_folder = os.path.join(scratch, "tokenizer")
        if resume is None:
            vocab_size = clip_tokenizer.train_clip_tokenizer(
                tokenizer_folder, shapes.vocabulary_corpus(), vocab_size=600, model_max_length=CLIP_LENGTH)
            clip_l, clip_g = clip_configs(vocab_size)
            backbone = StableDiffusion3Backbone(mmdit_config(num_layers), VAE, clip_l, clip_g, None,
                                                image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), t5_zero_tokens=0)
        else:
            shutil.copytree(os.path.join(resume, "tokenizer"), tokenizer_folder)
            backbone = StableDiffusion3Backbone.from_preset(resume)
        tokenizer = CLIPTokenizer.from_folder(tokenizer_folder)
        preprocessor = StableDiffusion3TextToImagePreprocessor(tokenizer, tokenizer)
        images, captions, _ = shapes.shapes_dataset(num_images, seed, IMAGE_SIZE)
        log(f"dataset: {num_images} images, {len(set(captions))} distinct captions")

        if vae_steps:
            history = trainer.train_vae(backbone.vae, images, vae_steps, batch_size=16, seed=seed)
            shift, scale = trainer.latent_statistics(backbone, images[:1024])
            backbone.vae_config = dataclasses.replace(backbone.vae_config, shift_factor=shift, scaling_factor=scale)
            log(f"VAE: loss {history.history['loss'][-1]:.4f}; latent shift {shift:.4f}, scale {scale:.4f}")

        latents = trainer.encode_in_batches(backbone.encode_image_step, images)
        distinct = sorted(set(captions)) + [""]
        contexts, pooled = encode_captions(backbone, preprocessor, distinct)
        index = {caption: i for i, caption in enumerate(distinct)}
        batches = trainer.FlowMatchingBatches(latents, contexts, pooled, [index[c] for c in captions], index[""],
                                              batch_size, mmdit_steps, seed)
        history = trainer.train_mmdit(backbone, batches, learning_rate)
        log(f"MMDiT: loss {history.history['loss'][-1]:.4f}")
        settings = dict(PRESETS["sd3_tiny_shapes"].defaults, vocabulary=shapes.caption_words())
        settings.pop("skip_layer_guidance")
        save_diffusers_folder(backbone, output, {"clip_l": tokenizer_folder, "clip_g": tokenizer_folder}, dtype,
                              settings)
    stages = []
    if resume is not None:  # read before writing: `resume` may be `output`
        with open(os.path.join(resume, "training.json")) as f:
            stages = json.load(f)["stages"]
    stage = dict(num_images=num_images, vae_steps=vae_steps, mmdit_steps=mmdit_steps, batch_size=batch_size,
                 num_layers=num_layers, seed=seed, learning_rate=learning_rate, resumed=resume is not None,
                 backend=keras.config.backend(), final_loss=round(history.history["loss"][-1], 4))
    with open(os.path.join(output, "training.json"), "w") as f:
        json.dump({"stages": stages + [stage]}, f, indent=2)
    log(f"wrote {output}")
    return backbone
