"""`StableDiffusion3TextToImagePreprocessor`: prompts -> the token-id dict of `encode_text_step`."""

import os

from keras_sd3 import presets
from keras_sd3.text.tokenizers import CLIPTokenizer, T5Tokenizer


class StableDiffusion3TextToImagePreprocessor:
    """Tokenizes prompts for CLIP-L, CLIP-G and (optionally) T5, with KerasHub's interface.

    Args:
        clip_l_tokenizer, clip_g_tokenizer: `CLIPTokenizer`s.
        t5_tokenizer: a `T5Tokenizer` or None (the backbone then uses a zero T5 context).

    Example:
        >>> preprocessor = StableDiffusion3TextToImagePreprocessor.from_preset("path/to/sd3-diffusers")
        >>> token_ids = preprocessor.generate_preprocess(["a cat"])  # {"clip_l", "clip_g"[, "t5"]}
    """

    def __init__(self, clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer=None):
        self.clip_l_tokenizer, self.clip_g_tokenizer = clip_l_tokenizer, clip_g_tokenizer
        self.t5_tokenizer = t5_tokenizer

    @classmethod
    def from_preset(cls, source, max_sequence_length=256):
        """Loads `tokenizer/`, `tokenizer_2/` and, if present, `tokenizer_3/` of a diffusers folder.

        Args:
            source: a diffusers-format folder or a preset name.
            max_sequence_length: T5 length (diffusers' default 256, at most 512).
        """
        source, _ = presets.resolve(source)
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
        )

    def generate_preprocess(self, prompts):
        """A prompt or list of prompts -> dict of (B, T) int32 numpy ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        ids = {"clip_l": self.clip_l_tokenizer(prompts), "clip_g": self.clip_g_tokenizer(prompts)}
        if self.t5_tokenizer is not None:
            ids["t5"] = self.t5_tokenizer(prompts)
        return ids

    __call__ = generate_preprocess
