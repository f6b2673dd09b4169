"""Real tokenizers for a closed vocabulary, built offline from a word list (no hub here): CLIP's and a T5-like one.

CLIP's byte-level BPE needs a vocabulary and merges; here every byte character is in the
vocabulary (so any text still tokenizes) and each listed word gets merges that make it one token.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerFast
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


def build_t5_like_tokenizer(words: list[str], directory: str | Path,
                            model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with T5's special ids (pad 0, ``</s>`` 1 appended, unknown 2), for ``AutoTokenizer``;
    ``model_max_length`` None: no limit of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {word: i + 3 for i, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", **({} if model_max_length is None else
                                                              {"model_max_length": model_max_length}))
    tokenizer.save_pretrained(directory)
    return tokenizer
