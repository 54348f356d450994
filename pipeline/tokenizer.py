"""A word-level report tokenizer saved as JSON.

Ids 0-3 are reserved: ``<pad>`` 0, ``<unk>`` 1, ``<start>`` 2, ``<end>`` 3. Words follow in
order of decreasing training frequency, ties broken alphabetically, so the same training
reports always give the same ids.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.atomic import write_text

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIAL_TOKENS = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(4)
FORMAT_VERSION = 1


class Tokenizer:
    """Maps cleaned report words to integer ids and back."""

    def __init__(self, words: list[str], max_length: int):
        self.tokens = list(SPECIAL_TOKENS) + [word for word in words if word not in SPECIAL_TOKENS]
        self.max_length = max_length
        self._ids = {token: index for index, token in enumerate(self.tokens)}

    @classmethod
    def fit(cls, reports: Iterable[list[str]], max_length: int, min_count: int) -> Tokenizer:
        """Build the vocabulary from tokenised training reports; rarer words map to <unk>."""
        counts = Counter(word for words in reports for word in words)
        kept = sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept, max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, words: list[str]) -> np.ndarray:
        """Return int32 ids (max_length,): <start>, words cut from the end to fit, <end>, then <pad>."""
        ids = np.full(self.max_length, PAD_ID, dtype=np.int32)
        body = [self._ids.get(word, UNK_ID) for word in words[: self.max_length - 2]]
        sequence = [START_ID, *body, END_ID]
        ids[: len(sequence)] = sequence
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Return the words for ids up to the first <end>, without <start> or <pad>."""
        words = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == END_ID:
                break
            if token_id in (PAD_ID, START_ID):
                continue
            words.append(self.tokens[token_id] if 0 <= token_id < len(self.tokens) else UNK)
        return words

    def save(self, path: Path | str) -> None:
        """Write the tokenizer as JSON, atomically."""
        payload = {"format_version": FORMAT_VERSION, "max_length": self.max_length, "tokens": self.tokens}
        write_text(path, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`; raise ValueError naming the file if it is not one."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            if payload.get("format_version") != FORMAT_VERSION or list(payload["tokens"][:4]) != list(SPECIAL_TOKENS):
                raise ValueError("unexpected format_version or special tokens")
            return cls(payload["tokens"][4:], int(payload["max_length"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a cxrgen tokenizer ({error}); rerun the tokenize stage") from None
