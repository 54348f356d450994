"""The tokenize stage: cleaned report text, a tokenizer, and a GloVe embedding matrix.

Outputs in ``data/text/``:

* ``tokenizer.json``: the vocabulary, fitted on training studies only;
* ``embeddings.npy``: float32 (vocab_size, dim) GloVe matrix in tokenizer order;
* ``targets.parquet``: one row per study with its split, cleaned full ``text`` (the
  scoring reference, never truncated) and ``token_ids`` (max_length int32 ids);
* ``glove_coverage.json``: the share of vocabulary words and of training tokens in GloVe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, write_text
from pipeline.config import TokenizeParams
from pipeline.embeddings import build_embedding_matrix
from pipeline.errors import StageInputError
from pipeline.text import join_sections, report_words
from pipeline.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TARGETS_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("report_id", pa.int64()),
        ("split", pa.string()),
        ("text", pa.string()),
        ("n_words", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
    ]
)


def run(
    params: TokenizeParams,
    reports_path: Path = Path("data/interim/reports.parquet"),
    splits_path: Path = Path("data/interim/splits.parquet"),
    text_dir: Path = Path("data/text"),
) -> None:
    """Clean report text, fit the tokenizer on the train split and build the embedding matrix."""
    targets = study_texts(pd.read_parquet(reports_path), pd.read_parquet(splits_path), params.sections)
    training_words = [text.split() for text in targets.loc[targets["split"] == "train", "text"]]
    if not training_words:
        raise StageInputError(f"{splits_path}: no training study has report text; check the split and tokenize.sections")

    tokenizer = Tokenizer.fit(training_words, params.max_length, params.min_count)
    logger.info("tokenize: vocabulary of %d tokens from %d training reports", tokenizer.vocab_size, len(training_words))
    _log_truncation(targets, params.max_length)
    targets["token_ids"] = [tokenizer.encode(text.split()) for text in targets["text"]]

    matrix, coverage = build_embedding_matrix(tokenizer, params.glove, training_words)
    logger.info(
        "tokenize: GloVe (%s, %d-d) covers %.1f%% of vocabulary words and %.1f%% of training tokens",
        coverage.source, coverage.dim, 100 * coverage.vocabulary, 100 * coverage.tokens,
    )
    _write_outputs(text_dir, tokenizer, matrix, targets, coverage)


def study_texts(reports: pd.DataFrame, splits: pd.DataFrame, sections: list[str]) -> pd.DataFrame:
    """Join each study's split with its report's cleaned text; drop studies whose text is empty."""
    by_report = reports.set_index("report_id")
    rows = []
    for study in splits.itertuples(index=False):
        report = by_report.loc[study.report_id]
        raw = join_sections({name: report[name] for name in sections}, sections)
        words = report_words(raw)
        rows.append((study.study_id, int(study.report_id), study.split, " ".join(words), len(words)))
    table = pd.DataFrame(rows, columns=["study_id", "report_id", "split", "text", "n_words"])
    empty = table["n_words"] == 0
    if empty.any():
        logger.warning("tokenize: skipped %d studies whose %s text is empty", int(empty.sum()), "+".join(sections))
    return table.loc[~empty].sort_values("study_id").reset_index(drop=True)


def _log_truncation(targets: pd.DataFrame, max_length: int) -> None:
    cut = int((targets["n_words"] > max_length - 2).sum())
    logger.info(
        "tokenize: %d of %d reports are longer than max_length %d and are cut for training (scored in full)",
        cut, len(targets), max_length,
    )


def _write_outputs(text_dir: Path, tokenizer: Tokenizer, matrix: np.ndarray, targets: pd.DataFrame, coverage) -> None:
    tokenizer.save(text_dir / "tokenizer.json")
    with atomic_path(text_dir / "embeddings.npy") as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, matrix)
    table = pa.Table.from_pandas(targets, schema=TARGETS_SCHEMA, preserve_index=False)
    with atomic_path(text_dir / "targets.parquet") as temporary:
        pq.write_table(table, temporary)
    summary = {
        "glove_source": coverage.source,
        "glove_dim": coverage.dim,
        "vocabulary_coverage": round(coverage.vocabulary, 4),
        "token_coverage": round(coverage.tokens, 4),
        "vocabulary_size": tokenizer.vocab_size,
        "words_in_glove": coverage.words_found,
        "studies": {split: int(count) for split, count in targets["split"].value_counts().sort_index().items()},
    }
    write_text(text_dir / "glove_coverage.json", json.dumps(summary, indent=2) + "\n")
