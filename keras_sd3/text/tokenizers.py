"""Tokenizers of SD3's text encoders, built on the `tokenizers` and `sentencepiece` libraries.

Both produce fixed-length numpy int32 ids exactly as diffusers' `encode_prompt` gets them from
transformers (`padding="max_length", truncation=True`):
- CLIP: `[bos] tokens[:length - 2] [eos] pad...` (CLIP-L pads with `<|endoftext|>`, CLIP-G with `!`);
- T5: `tokens[:length - 1] </s> 0...`.
"""

import json
import os

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

# CLIP's word split: contractions, letter runs, single digits, punctuation runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(token):
    """Special tokens are stored either as strings or as AddedToken dicts."""
    return token["content"] if isinstance(token, dict) else token


def _special_tokens(folder):
    """Merged `tokenizer_config.json` and `special_tokens_map.json` token strings."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = _read_json(os.path.join(folder, name), {})
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if config.get(key) is not None:
                found[key] = _token_text(config[key])
    return found


def _pad_ids(rows, length, pad_id):
    out = np.full((len(rows), length), pad_id, dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer.

    Args:
        vocab: dict token -> id (`vocab.json`).
        merges: list of `(left, right)` merges (`merges.txt`).
        pad_token: `"<|endoftext|>"` for CLIP-L, `"!"` for CLIP-G.
        sequence_length: output length (77).
        pad_is_special: whether the pad token is also a special token of the text, never split and
            never merged: transformers' tokenizers (diffusers folders) make it one, so CLIP-G reads
            "!!" as two "!" tokens; keras-hub's `CLIPTokenizer` (KerasHub presets) keeps only the start
            and end tokens special and byte-pair-encodes "!!" like any other text.
    """

    def __init__(self, vocab, merges, pad_token="<|endoftext|>", sequence_length=77,
                 bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_is_special=True):
        for token in (bos_token, eos_token, pad_token):
            if token not in vocab:
                raise ValueError(f"CLIP vocabulary has no {token!r} token.")
        bpe = models.BPE(
            vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
            fuse_unk=False, unk_token=eos_token,
        )
        self.tokenizer = Tokenizer(bpe)
        self.tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        self.tokenizer.add_special_tokens([bos_token, eos_token] + [pad_token] * pad_is_special)
        self.sequence_length = sequence_length
        self.bos_id, self.eos_id, self.pad_id = (vocab[t] for t in (bos_token, eos_token, pad_token))

    @classmethod
    def from_folder(cls, folder, sequence_length=None):
        """Loads `vocab.json` + `merges.txt`, or the BPE model of `tokenizer.json` (transformers 5 saves
        only that), plus the special tokens of the tokenizer configs.

        `sequence_length` defaults to the `model_max_length` of `tokenizer_config.json` (77 in the
        real SD3 tokenizers), or 77 when there is none."""
        vocab, merges_path = _read_json(os.path.join(folder, "vocab.json")), os.path.join(folder, "merges.txt")
        if vocab is not None and os.path.isfile(merges_path):
            with open(merges_path, encoding="utf-8") as f:
                merges = [line.rstrip("\n") for line in f]
            merges = [m for m in merges if m and not m.startswith("#version")]
        else:
            model = _read_json(os.path.join(folder, "tokenizer.json"), {}).get("model", {})
            if model.get("type") != "BPE":
                raise FileNotFoundError(
                    f"{folder} has no CLIP tokenizer: expected vocab.json + merges.txt or a BPE tokenizer.json."
                )
            vocab, merges = model["vocab"], model["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        special = _special_tokens(folder)
        if sequence_length is None:
            stored = _read_json(os.path.join(folder, "tokenizer_config.json"), {}).get("model_max_length", 77)
            sequence_length = int(stored) if stored and stored <= 4096 else 77
        return cls(
            vocab, merges,
            pad_token=special.get("pad_token", "<|endoftext|>"),
            sequence_length=sequence_length,
            bos_token=special.get("bos_token", "<|startoftext|>"),
            eos_token=special.get("eos_token", "<|endoftext|>"),
        )

    def tokenize(self, texts):
        """list of str -> ((B, sequence_length) int32 ids, the number of tokens cut from each text)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        keep = self.sequence_length - 2
        rows = [[self.bos_id, *e.ids[:keep], self.eos_id] for e in encodings]
        return _pad_ids(rows, self.sequence_length, self.pad_id), [max(len(e.ids) - keep, 0) for e in encodings]

    def __call__(self, texts):
        """list of str -> (B, sequence_length) int32 ids."""
        return self.tokenize(texts)[0]


class T5Tokenizer:
    """T5 (SentencePiece unigram) tokenizer: `tokenizer.json` through `tokenizers`, else `spiece.model`.

    Args:
        encode: function list of str -> list of id lists (no special tokens).
        eos_id, pad_id: `</s>` and `<pad>` ids.
        sequence_length: output length (`max_sequence_length`, at most 512).
    """

    def __init__(self, encode, eos_id=1, pad_id=0, sequence_length=256):
        if not 1 <= sequence_length <= 512:
            raise ValueError(f"T5 max_sequence_length must be in [1, 512], got {sequence_length}.")
        self.encode, self.eos_id, self.pad_id = encode, eos_id, pad_id
        self.sequence_length = sequence_length

    @classmethod
    def from_folder(cls, folder, sequence_length=256):
        """Loads `tokenizer.json` if present (what `T5TokenizerFast` uses), else `spiece.model`."""
        json_path, spm_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "spiece.model")
        if not os.path.isfile(json_path):
            if os.path.isfile(spm_path):
                return cls.from_sentencepiece(spm_path, sequence_length)
            raise FileNotFoundError(f"{folder} has no T5 tokenizer: expected tokenizer.json or spiece.model.")
        tokenizer = Tokenizer.from_file(json_path)
        encode = lambda texts: [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
        eos_id, pad_id = tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<pad>")
        return cls(encode, eos_id=eos_id, pad_id=max(pad_id, 0), sequence_length=sequence_length)

    @classmethod
    def from_sentencepiece(cls, path, sequence_length=256):
        """Loads a SentencePiece model file (`spiece.model`, KerasHub's `vocabulary.spm`)."""
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=path)
        encode = lambda texts: processor.encode(list(texts))  # noqa: E731
        return cls(encode, eos_id=processor.eos_id(), pad_id=max(processor.pad_id(), 0),
                   sequence_length=sequence_length)

    def tokenize(self, texts):
        """list of str -> ((B, sequence_length) int32 ids, the number of tokens cut from each text)."""
        keep = self.sequence_length - 1
        encoded = self.encode(list(texts))
        rows = [[*ids[:keep], self.eos_id] for ids in encoded]
        return _pad_ids(rows, self.sequence_length, self.pad_id), [max(len(ids) - keep, 0) for ids in encoded]

    def __call__(self, texts):
        """list of str -> (B, sequence_length) int32 ids."""
        return self.tokenize(texts)[0]
