"""Training a CLIP-format BPE tokenizer with the `tokenizers` library (for tiny models and the tests)."""

import json
import os


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)


def train_clip_tokenizer(folder, corpus, pad_token="<|endoftext|>", vocab_size=700, model_max_length=77):
    """Trains a byte-level BPE on `corpus` and saves it in CLIP's format in `folder`.

    Writes vocab.json and merges.txt (the two special tokens take the last ids, bos = n - 2 and
    eos = n - 1, as in the real CLIP vocabulary), special_tokens_map.json and tokenizer_config.json.

    Returns:
        The vocabulary size.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet + [c + "</w>" for c in alphabet],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    os.makedirs(folder, exist_ok=True)
    tokenizer.model.save(folder)
    # As in the real CLIP vocabulary, the two special tokens take the last ids (bos = n - 2, eos = n - 1).
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    order = sorted(vocab, key=vocab.get)
    order = [t for t in order if t not in ("<|startoftext|>", "<|endoftext|>")] + ["<|startoftext|>", "<|endoftext|>"]
    write_json(os.path.join(folder, "vocab.json"), {t: i for i, t in enumerate(order)})
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"),
               dict(special, model_max_length=model_max_length, tokenizer_class="CLIPTokenizer"))
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        return len(json.load(f))
