"""`StableDiffusion3TextToImagePreprocessor`: prompts -> the token-id dict of `encode_text_step`."""

import os
import re
import warnings

from keras_sd3 import presets
from keras_sd3.text.tokenizers import CLIPTokenizer, T5Tokenizer


class StableDiffusion3TextToImagePreprocessor:
    """Tokenizes prompts for CLIP-L, CLIP-G and (optionally) T5, with KerasHub's interface.

    Prompts longer than an encoder takes are cut, as diffusers does, with one warning per encoder
    saying how many tokens were dropped.

    Args:
        clip_l_tokenizer, clip_g_tokenizer: `CLIPTokenizer`s.
        t5_tokenizer: a `T5Tokenizer` or None (the backbone then uses a zero T5 context).
        vocabulary: for a model trained on a closed set of caption words (the embedded one), those
            words (`unknown_words` then lists the others); None for an open vocabulary.

    Example:
        >>> preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset("path/to/sd3-diffusers")
        >>> token_ids = preprocessor.generate_preprocess(["a cat"])  # {"clip_l", "clip_g"[, "t5"]}
    """

    def __init__(self, clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer=None, vocabulary=None):
        self.clip_l_tokenizer, self.clip_g_tokenizer = clip_l_tokenizer, clip_g_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.vocabulary = None if vocabulary is None else frozenset(vocabulary)

    @classmethod
    def from_preset(cls, source, max_sequence_length=256):
        """Loads `tokenizer/`, `tokenizer_2/` and, if present, `tokenizer_3/` of a diffusers folder, or
        the tokenizer assets of a KerasHub preset folder (its T5 length is the preset's, not
        `max_sequence_length`).

        Args:
            source: a diffusers-format folder or a preset name.
            max_sequence_length: T5 length (diffusers' default 256, at most 512).
        """
        source, _ = presets.resolve(source)
        from keras_sd3.weights import kerashub

        if os.path.isdir(source) and kerashub.is_kerashub_folder(source):
            clip = {name: CLIPTokenizer(vocab, merges, pad_token=pad, pad_is_special=False)
                    for name, (vocab, merges, pad) in kerashub.tokenizer_assets(source).items()}
            t5 = kerashub.t5_tokenizer_asset(source)
            return cls(clip["clip_l"], clip["clip_g"], t5 and T5Tokenizer.from_sentencepiece(*t5))
        if not os.path.isdir(source):
            raise ValueError(
                f"{source!r} is not a diffusers folder: single-file checkpoints carry no tokenizer files; "
                "pass the folder holding tokenizer/, tokenizer_2/ (and tokenizer_3/)."
            )
        t5_folder = os.path.join(source, "tokenizer_3")
        return cls(
            CLIPTokenizer.from_folder(os.path.join(source, "tokenizer")),
            CLIPTokenizer.from_folder(os.path.join(source, "tokenizer_2")),
            T5Tokenizer.from_folder(t5_folder, max_sequence_length) if os.path.isdir(t5_folder) else None,
            presets.folder_settings(source).get("vocabulary"),
        )

    def generate_preprocess(self, prompts):
        """A prompt or list of prompts -> dict of (B, T) int32 numpy ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        encoders = {"clip_l": ("CLIP-L", self.clip_l_tokenizer), "clip_g": ("CLIP-G", self.clip_g_tokenizer),
                    "t5": ("T5", self.t5_tokenizer)}
        ids = {}
        for key, (name, tokenizer) in encoders.items():
            if tokenizer is not None:
                ids[key], dropped = tokenizer.tokenize(prompts)
                _warn_truncated(name, tokenizer.sequence_length, dropped)
        return ids

    def unknown_words(self, prompt):
        """The words of `prompt` outside the model's closed `vocabulary`, in order ([] for an open one)."""
        if self.vocabulary is None:
            return []
        words = re.findall(r"[^\W\d_]+|\d+", str(prompt).lower())
        return list(dict.fromkeys(w for w in words if w not in self.vocabulary))

    __call__ = generate_preprocess


def _warn_truncated(encoder, length, dropped):
    """One warning for the prompts an encoder cut (diffusers warns the same way)."""
    cut = [(i, n) for i, n in enumerate(dropped) if n]
    if cut:
        which = ", ".join(f"{n} tokens of prompt {i}" for i, n in cut)
        warnings.warn(f"{encoder} takes at most {length} tokens per prompt (its special tokens included): "
                      f"dropped the last {which}.", stacklevel=3)
