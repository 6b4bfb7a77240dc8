"""A tiny random keras-hub SD3 (backbone + preprocessor) saved with `save_to_preset`: the reference of
test_kerashub.py.

`build(root, with_t5)` runs in the test process. keras-hub's `T5Encoder` cannot be built on torch (it sets
layers before `Module.__init__`), so the T5 preset and keras-hub's outputs on it are made by running this
file as a script under jax: `KERAS_BACKEND=jax python tests/kerashub_tiny.py FOLDER` writes `FOLDER/preset`
(sharded: `model.weights.json` + `model_*.weights.h5`) and `FOLDER/reference.npz`.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_text import train_clip_tokenizer, train_t5_tokenizer  # noqa: E402

PROMPTS = ["a red circle on a blue background", "Astronaut in a jungle, cold color palette"]
NEGATIVE = ["", "blurry"]
# "!" is CLIP-G's pad token (id 0): transformers makes it a special token, keras-hub's CLIPTokenizer does not.
BANG_PROMPTS = ["a castle, 8k!!", "!!!", "?!", "a red circle on a blue background!", "A RED Circle On A Blue!! BACKGROUND",
                "", " ".join(["red circle!"] * 40)]
BANG_PAIR = (["a castle, 8k!!", "a red circle on a blue background!!!"], ["?!", "!"])  # prompts, negative prompts
T5_LENGTH = 40  # keras-hub's T5Preprocessor sequence length in the preset (keras_sd3 must read it)
STEPS, GUIDANCE = 4, 4.0


def _vocab_merges(folder):
    import json

    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = [m for m in f.read().splitlines() if m and not m.startswith("#version")]
    return vocab, merges


def _clip_preprocessor(folder, name, pad_with_end_token):
    from keras_hub.models import CLIPPreprocessor, CLIPTokenizer

    tokenizer = CLIPTokenizer(*_vocab_merges(folder), pad_with_end_token=pad_with_end_token,
                              config_file=f"{name}_tokenizer.json", name=f"{name}_tokenizer")
    return CLIPPreprocessor(tokenizer, config_file=f"{name}_preprocessor.json", name=f"{name}_preprocessor")


def _t5(root):
    from keras_hub.models import T5Preprocessor, T5Tokenizer
    from keras_hub.src.models.stable_diffusion_3.t5_encoder import T5Encoder

    vocab = train_t5_tokenizer(str(root / "tok_t5"), False)
    encoder = T5Encoder(vocab, 2, 6, 256, 96, key_value_dim=8, activation="gelu", use_gated_activation=True,
                        name="t5")
    tokenizer = T5Tokenizer(str(root / "tok_t5" / "spiece.model"), config_file="t5_tokenizer.json",
                            name="t5_tokenizer")
    return encoder, T5Preprocessor(tokenizer, sequence_length=T5_LENGTH, config_file="t5_preprocessor.json",
                                   name="t5_preprocessor")


def build(root, with_t5=False, max_shard_size=10):
    """Saves an SD3.5-Medium-like tiny model (qk norm, one dual block) to `root/preset`.

    Returns:
        (folder, keras-hub backbone, keras-hub preprocessor).
    """
    import keras
    import tensorflow_text  # noqa: F401  (keras-hub's tokenizers need it)
    from keras_hub.models import CLIPTextEncoder
    from keras_hub.models import StableDiffusion3Backbone as HubBackbone
    from keras_hub.models import StableDiffusion3TextToImagePreprocessor as HubPreprocessor
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    l_size = train_clip_tokenizer(str(root / "tok_l"), "<|endoftext|>")
    g_size = train_clip_tokenizer(str(root / "tok_g"), "!")
    keras.utils.set_random_seed(0)
    vae = VAEBackbone([32, 32, 64, 64], [1, 1, 1, 1], [64, 64, 32, 32], [2, 2, 2, 2], sampler_method="mode", name="vae")
    clip_l = CLIPTextEncoder(l_size, 64, 64, 2, 1, 96, "quick_gelu", -2, name="clip_l")
    clip_g = CLIPTextEncoder(g_size, 128, 128, 2, 2, 96, "gelu", -2, name="clip_g")
    t5, t5_preprocessor = _t5(root) if with_t5 else (None, None)
    backbone = HubBackbone(2, 128, 2, 2, 12, "rms_norm", (0,), vae, clip_l, clip_g, t5=t5, image_shape=(64, 64, 3))
    # Re-draw every weight (keras-hub zero-initialises biases and adaLN) so a wrong mapping shows.
    rng = np.random.default_rng(1)
    for var in backbone.weights:
        shape = tuple(var.shape)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) >= 2 else 0.1
        var.assign((rng.standard_normal(shape) * scale + (1.0 if "gamma" in var.path else 0.0)).astype("float32"))
    preprocessor = HubPreprocessor(_clip_preprocessor(str(root / "tok_l"), "clip_l", True),
                                   _clip_preprocessor(str(root / "tok_g"), "clip_g", False), t5_preprocessor)
    folder = str(root / "preset")
    preprocessor.save_to_preset(folder)
    backbone.save_to_preset(folder, max_shard_size=max_shard_size)
    return folder, backbone, preprocessor


def noise():
    return np.random.default_rng(0).standard_normal((len(PROMPTS), 8, 8, 16)).astype("float32")


def hub_images(backbone, preprocessor, latents, prompts=PROMPTS, negative=NEGATIVE):
    """keras-hub's own `generate()` (its preprocessing, compiled loop and uint8 conversion) from `latents`."""
    import keras
    from keras_hub.models import StableDiffusion3TextToImage
    from keras_hub.src.models import text_to_image

    class FixedNoise:
        @staticmethod
        def normal(shape, dtype=None, seed=None):
            assert tuple(shape) == latents.shape, (shape, latents.shape)
            return keras.ops.convert_to_tensor(latents)

    task = StableDiffusion3TextToImage(backbone, preprocessor)
    real, text_to_image.random = text_to_image.random, FixedNoise
    try:
        return np.asarray(task.generate({"prompts": list(prompts), "negative_prompts": list(negative)},
                                        num_steps=STEPS, guidance_scale=GUIDANCE))
    finally:
        text_to_image.random = real


def main(out):
    """The T5 preset, sharded into ~1 MB files, and keras-hub's token ids, text embeddings and images."""
    import pathlib

    import keras

    root = pathlib.Path(out)
    folder, backbone, preprocessor = build(root, with_t5=True, max_shard_size=0.001)
    ids = {k: keras.ops.convert_to_numpy(v) for k, v in preprocessor.generate_preprocess(PROMPTS).items()}
    negative = {k: keras.ops.convert_to_numpy(v) for k, v in preprocessor.generate_preprocess(NEGATIVE).items()}
    tensors = [{k: keras.ops.convert_to_tensor(v) for k, v in d.items()} for d in (ids, negative)]
    embeddings = [keras.ops.convert_to_numpy(e) for e in backbone.encode_text_step(*tensors)]
    bang = [{k: keras.ops.convert_to_numpy(v) for k, v in preprocessor.generate_preprocess([p]).items()}
            for p in BANG_PROMPTS]
    np.savez(root / "reference.npz", **{f"ids_{k}": v for k, v in ids.items()},
             **{f"bang_{i}_{k}": v for i, d in enumerate(bang) for k, v in d.items()},
             bang_images=hub_images(backbone, preprocessor, noise(), *BANG_PAIR),
             **{f"negative_{k}": v for k, v in negative.items()},
             **{f"embedding_{i}": e for i, e in enumerate(embeddings)},
             images=hub_images(backbone, preprocessor, noise()))


if __name__ == "__main__":
    main(sys.argv[1])
