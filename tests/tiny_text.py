"""Tiny text-side checkpoints for the tests: tokenizers trained here, random CLIP / T5 encoders.

Tokenizers are trained with the `tokenizers` / `sentencepiece` trainers on a small corpus and saved
in the real file formats (vocab.json + merges.txt; spiece.model; tokenizer.json), so that
transformers' tokenizers can be built from the same files as the reference.
"""

import itertools
import os

from keras_sd3.training import clip_tokenizer

WORDS = [
    "a", "photo", "of", "the", "cat", "dog", "astronaut", "in", "jungle", "cold", "color", "palette",
    "muted", "colors", "detailed", "8k", "red", "circle", "blue", "square", "green", "triangle",
    "small", "large", "top", "left", "right", "bottom", "on", "background", "café", "naïve", "über",
    "São", "Paulo", "東京", "猫", "🙂", "rocket", "1024", "3.5", "don't", "it's", "we're", "HELLO",
]
CORPUS = [
    " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 9)) + (".", "!", ",", "?", "")[i % 5]
    for i in range(400)
]

PROMPTS = [
    "",
    " ",
    "a",
    "a red circle on a blue background",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "A PHOTO OF THE CAT",
    "MiXeD CaSe WoRdS",
    "don't stop, it's fine; we're here!",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1024 3.14159",
    "punctuation!!! ??? ... --- ;;; ::: ((())) [[]] {{}}",
    "email@example.com #hashtag $100 50% a&b",
    "café naïve über São Paulo",
    "東京 の 猫",
    "emoji 🙂🚀 rocket",
    "tabs\tand\nnewlines\r\nhere",
    "repeated     spaces    between   words",
    "  leading and trailing spaces  ",
    "Ünïcödé àccénts éverywhere",
    "Ωmega αlpha βeta",
    "mixed 東京tokyo 🙂smile",
    "<|startoftext|> special tokens <|endoftext|> in text",
    "quotes \"double\" 'single' `back`",
    "hyphen-ated words and under_scores",
    "a" * 300,
    " ".join(["long"] * 100),
    " ".join(WORDS * 3),
    " ".join(WORDS * 15),
] + [" ".join(itertools.islice(itertools.cycle(WORDS), i, i + 3 + i % 11)) for i in range(40)]


def train_clip_tokenizer(folder, pad_token):
    """A byte-level BPE in CLIP's format (vocab.json, merges.txt, tokenizer configs) on the test corpus."""
    return clip_tokenizer.train_clip_tokenizer(folder, CORPUS, pad_token, vocab_size=700)


def train_t5_tokenizer(folder, with_tokenizer_json):
    """A SentencePiece unigram model in T5's format (spiece.model, optionally tokenizer.json)."""
    import sentencepiece
    from transformers import T5TokenizerFast

    os.makedirs(folder, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=os.path.join(folder, "spiece"), vocab_size=90,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2,
    )
    os.remove(os.path.join(folder, "spiece.vocab"))
    reference = T5TokenizerFast.from_pretrained(folder)
    if with_tokenizer_json:
        reference.save_pretrained(folder)
    return len(reference)


# Heads of 64 as in the real encoders (single files do not record the head count); context width
# 64 + 128 padded to the T5 width 256 = the tiny MMDiT's joint_attention_dim; pooled 64 + 128 = 192.
CLIP_L = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=1, projection_dim=64,
              hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, projection_dim=128,
              hidden_act="gelu")
T5 = dict(d_model=256, d_kv=8, d_ff=96, num_layers=2, num_heads=6, feed_forward_proj="gated-gelu")


def build_text_side(folder, with_t5, seed=10):
    """Tokenizers and random text encoders of a tiny SD3 pipeline; returns the transformers objects."""
    import torch
    from conftest import randomize
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)

    parts = {}
    for i, (name, pad, config) in enumerate((("", "<|endoftext|>", CLIP_L), ("_2", "!", CLIP_G))):
        tokenizer_folder = os.path.join(folder, "tokenizer" + name)
        size = train_clip_tokenizer(tokenizer_folder, pad)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
        encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=size, bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=tokenizer.pad_token_id,
            **config))
        randomize(encoder, seed + i)
        if name == "":  # SD3's CLIP-L projection is the identity (single files do not store it)
            torch.nn.init.eye_(encoder.text_projection.weight)
        parts["tokenizer" + name], parts["text_encoder" + name] = tokenizer, encoder
    parts["tokenizer_3"] = parts["text_encoder_3"] = None
    if with_t5:
        tokenizer_folder = os.path.join(folder, "tokenizer_3")
        size = train_t5_tokenizer(tokenizer_folder, with_tokenizer_json=True)
        parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(tokenizer_folder)
        parts["text_encoder_3"] = randomize(T5EncoderModel(T5Config(vocab_size=size, **T5)), seed + 2)
    return parts


def build_pipeline(folder, with_t5, variant="sd3"):
    """A tiny `StableDiffusion3Pipeline` (random weights, tokenizers trained here) saved in `folder`."""
    from conftest import build_reference
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer, vae = build_reference(os.path.join(folder, "parts"), variant)
    parts = build_text_side(os.path.join(folder, "parts"), with_t5=with_t5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts
    )
    pipe.save_pretrained(folder)
    return pipe
