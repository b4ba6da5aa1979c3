"""A character-level Hugging Face tokenizer for tiny models trained from scratch (CPU demo, tests).

One token per character of printable ASCII (plus ``extra_chars``), after the special tokens
``<pad>`` (id 0), ``<eos>`` (id 1) and ``<unk>`` (id 2): about 100 tokens, so that a tiny model's
embedding stays small. ``decode(encode(s)) == s`` for any text in the alphabet, spaces and newlines
included (every character is its own pre-token and the decoder joins them as they are).
"""
from __future__ import annotations

import os
import string

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def alphabet(extra_chars: str = "") -> list[str]:
    """Printable ASCII (``string.printable``: letters, digits, punctuation, space, tab, newline, ...)
    followed by the characters of ``extra_chars`` not already in it, without duplicates, in order."""
    return list(dict.fromkeys(string.printable + extra_chars))


def make_char_tokenizer(path: str | os.PathLike | None = None, extra_chars: str = ""):
    """A ``transformers.PreTrainedTokenizerFast`` with one token per character of
    :func:`alphabet` and the special tokens ``<pad>``, ``<eos>`` (also its ``eos_token``) and
    ``<unk>``. No BOS and no special tokens added on ``encode``. Saved to ``path`` when given, so
    that :func:`jackpot_jax.models.hf.load_tokenizer` loads it back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (heavy)

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(alphabet(extra_chars)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    if path is not None:
        tokenizer.save_pretrained(os.fspath(path))
    return tokenizer
