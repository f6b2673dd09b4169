"""A real ``CLIPTokenizer`` for a closed vocabulary, built offline from a word list.

CLIP's byte-level BPE needs a vocabulary and merges; here every byte character is in the
vocabulary (so any text still tokenizes) and each listed word gets merges that make it one token.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def build_clip_tokenizer(words: list[str], directory: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Build the tokenizer, save it to ``directory`` (loadable by ``CLIPTokenizer.from_pretrained``)."""
    characters = list(bytes_to_unicode().values())
    vocab = characters + [c + "</w>" for c in characters]
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges,
                              model_max_length=model_max_length)
    for word in words:
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            raise ValueError(f"tokenizer vocabulary: {word!r} splits into {pieces}; choose words whose merges agree")
    tokenizer.save_pretrained(directory)
    return tokenizer
