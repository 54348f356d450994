"""Baselines that every model must beat, scored by the same metric code as the models.

* Constant report: one training report given to every study, the one among the most frequent
  training reports with the highest BLEU-4 on the validation split. On IU X-ray most studies
  are normal, so such a report already reaches BLEU scores close to published models.
* Nearest neighbour: each study gets the training report of the training study whose pooled
  image features (both views concatenated, 2 x 1024) have the highest cosine similarity.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

from pipeline.errors import StageInputError
from pipeline.metrics import coco_bleu_scores

logger = logging.getLogger(__name__)


def most_frequent_reports(train_texts: Sequence[str], count: int) -> list[tuple[str, int]]:
    """Count identical training reports and return the ``count`` most frequent with their counts.

    Ties keep first-seen order.
    """
    return Counter(train_texts).most_common(count)


def choose_constant_report(train_texts: Sequence[str], val_texts: Sequence[str], candidates: int) -> tuple[str, float]:
    """Pick the frequent training report with the best validation BLEU-4.

    Returns the report and its validation BLEU-4 (pycocoevalcap). Among equal scores the more
    frequent report wins.
    """
    if not train_texts or not val_texts:
        raise StageInputError(
            f"the constant-report baseline needs training and validation reports, got {len(train_texts)} "
            f"and {len(val_texts)}; check split.val_fraction"
        )
    references = [text.split() for text in val_texts]
    best_text, best_bleu4 = "", -1.0
    for text, count in most_frequent_reports(train_texts, candidates):
        bleu4 = coco_bleu_scores(references, [text.split()] * len(references))["bleu4"]
        logger.debug("constant baseline candidate (%d training studies): val BLEU-4 %.4f", count, bleu4)
        if bleu4 > best_bleu4:
            best_text, best_bleu4 = text, bleu4
    return best_text, best_bleu4


def nearest_neighbour_reports(
    train_features: np.ndarray, train_texts: Sequence[str], query_features: np.ndarray, chunk: int = 1024
) -> list[str]:
    """Return, for each query study, the report of the most similar training study.

    ``train_features`` (train studies, views, dim) and ``query_features`` (studies, views, dim)
    are pooled features; similarity is the cosine of the flattened vectors.
    """
    if len(train_features) != len(train_texts):
        raise ValueError(f"{len(train_features)} training feature rows but {len(train_texts)} training reports")
    if len(train_features) == 0:
        raise StageInputError("the nearest-neighbour baseline needs at least one training study with features")
    train = _unit_rows(train_features)
    nearest = []
    for start in range(0, len(query_features), chunk):
        similarity = _unit_rows(query_features[start : start + chunk]) @ train.T
        nearest.extend(np.argmax(similarity, axis=1).tolist())
    return [train_texts[index] for index in nearest]


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """Flatten (studies, views, dim) to float32 (studies, views * dim) rows of unit length."""
    flat = features.reshape(len(features), -1).astype(np.float32)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norms, 1e-12)


def copied_share(predictions: Sequence[str], train_texts: Sequence[str]) -> float:
    """Share of predicted reports that equal some training report word for word."""
    if not predictions:
        return 0.0
    training = set(train_texts)
    return sum(text in training for text in predictions) / len(predictions)


def distinct_reports(predictions: Sequence[str]) -> int:
    """Number of different predicted reports."""
    return len(set(predictions))
