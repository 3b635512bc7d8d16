"""Text as token sequences: characters (MNIST-SVHN-Text, bimodal CelebA, as in the MoPoE code) and words (CUB
captions, as in the MMVAE code), with no downloaded tokenizer data.

A sequence is stored as int64 token ids ``(L,)``; the encoders one-hot them and the decoders return logits over
the vocabulary (a categorical likelihood per position).
"""

from __future__ import annotations

import re
from collections import Counter

import torch

__all__ = ["ALPHABET", "PAD_CHARACTER", "build_vocabulary", "decode_characters", "decode_words", "encode_characters",
           "encode_words", "tokenise"]

#: the character vocabulary: id 0 is padding, then lowercase letters, digits, space and punctuation
PAD_CHARACTER = "\0"
ALPHABET = (PAD_CHARACTER,) + tuple("abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()&*+/[]_#")
_CHARACTER_ID = {c: i for i, c in enumerate(ALPHABET)}


def encode_characters(text: str, length: int) -> torch.Tensor:
    """``(length,)`` character ids of ``text`` (lowercased), padded; an error names a character outside
    ``ALPHABET`` or a text longer than ``length``."""
    text = text.lower()
    if len(text) > length:
        raise ValueError(f"text of {len(text)} characters does not fit length {length}: {text!r}")
    unknown = sorted(set(text) - _CHARACTER_ID.keys())
    if unknown:
        raise ValueError(f"characters {unknown} of {text!r} are not in the alphabet")
    ids = torch.zeros(length, dtype=torch.long)
    ids[: len(text)] = torch.tensor([_CHARACTER_ID[c] for c in text], dtype=torch.long)
    return ids


def _check_ids(ids: torch.Tensor, count: int) -> list[int]:
    """``ids`` as a list of integers, each in ``[0, count)``: a negative id indexed from the end (-1 read as the
    last character or word)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [i for i in values if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ValueError(f"ids must be integers in [0, {count}), got {bad[:5]}")
    return values


def decode_characters(ids: torch.Tensor) -> str:
    return "".join(ALPHABET[i] for i in _check_ids(ids, len(ALPHABET))).replace(PAD_CHARACTER, "")


_WORD = re.compile(r"[a-z0-9]+|'[a-z]+|[^\sa-z0-9]")

#: CUB's special words (the MMVAE vocabulary's): unknown word, padding, end of sentence
UNKNOWN, PAD, END = "<exc>", "<pad>", "<eos>"


def tokenise(sentence: str) -> list[str]:
    """Lowercase words, numbers, clitics (``'s``) and single punctuation marks, by a regular expression."""
    return _WORD.findall(sentence.lower())


def build_vocabulary(sentences, more_than: int = 3) -> tuple[str, ...]:
    """The special words, then the words occurring more than ``more_than`` times (the MMVAE and MMVAE+ code's
    ``occ > min_occ``, ``min_occ = 3``), most frequent first (ties alphabetically, so the vocabulary does not
    depend on the order of the sentences)."""
    counts = Counter(word for sentence in sentences for word in tokenise(sentence))
    words = sorted((w for w, c in counts.items() if c > more_than and w not in (UNKNOWN, PAD, END)),
                   key=lambda w: (-counts[w], w))
    return (UNKNOWN, PAD, END, *words)


def encode_words(sentence: str, vocabulary, length: int) -> torch.Tensor:
    """``(length,)`` word ids: the first ``length - 1`` words (unknown ones as ``<exc>``), ``<eos>``, padding."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:  # (0 gave every word and <eos>)
        raise ValueError(f"length must be a positive integer (the words and <eos>), got {length!r}")
    index = {w: i for i, w in enumerate(vocabulary)} if not isinstance(vocabulary, dict) else vocabulary
    words = tokenise(sentence)[: length - 1]
    ids = [index.get(w, index[UNKNOWN]) for w in words] + [index[END]]
    return torch.tensor(ids + [index[PAD]] * (length - len(ids)), dtype=torch.long)


def decode_words(ids: torch.Tensor, vocabulary) -> str:
    words = []
    for i in _check_ids(ids, len(vocabulary)):
        if vocabulary[i] == END:
            break
        if vocabulary[i] != PAD:
            words.append(vocabulary[i])
    return " ".join(words)
