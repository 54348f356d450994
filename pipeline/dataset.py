"""Training and scoring inputs: cached image features joined with tokenised reports."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline.features import open_features

logger = logging.getLogger(__name__)


@dataclass
class SplitData:
    """One split's studies: features (studies, regions, 1024), token_ids int32 (studies, max_length)."""

    study_ids: list[str]
    features: np.ndarray
    token_ids: np.ndarray
    texts: list[str]

    def __len__(self) -> int:
        return len(self.study_ids)


def load_split(features_path: Path, targets_path: Path, split: str, feature_kind: str) -> SplitData:
    """Load the studies of ``split`` that have both features and report text.

    ``feature_kind`` is "pooled" (2 regions, one per view) or "spatial" (98 regions).
    Studies are returned in study id order.
    """
    targets = pd.read_parquet(targets_path)
    targets = targets.loc[targets["split"] == split]
    with open_features(features_path) as store:
        has_features = targets["study_id"].isin(store.study_ids)
        missing = int((~has_features).sum())
        targets = targets.loc[has_features].sort_values("study_id")
        features = store.read(targets["study_id"].tolist(), feature_kind)
    if missing:
        logger.warning("%s split: %d studies have text but no features and are left out", split, missing)
    token_ids = np.stack(targets["token_ids"].to_numpy()).astype(np.int32) if len(targets) else np.zeros((0, 0), np.int32)
    logger.info("%s split: %d studies with features and text", split, len(targets))
    return SplitData(targets["study_id"].tolist(), features, token_ids, targets["text"].tolist())


def teacher_forcing_dataset(data: SplitData, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Yield ((features, input tokens), target tokens) batches; targets are inputs shifted by one."""
    inputs = data.token_ids[:, :-1]
    targets = data.token_ids[:, 1:]
    dataset = tf.data.Dataset.from_tensor_slices(((data.features, inputs), targets))
    if shuffle:
        dataset = dataset.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class TrainingBatches:
    """Teacher-forcing batches in a shuffled order that depends only on (seed, epoch).

    An epoch's order does not depend on earlier epochs, so a run resumed at epoch k trains
    on the same batches as an uninterrupted run. The split is copied into TensorFlow once and
    each batch is gathered from it by index.
    """

    def __init__(self, data: SplitData, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = len(data), batch_size, seed
        self.features = tf.constant(data.features)
        self.inputs = tf.constant(data.token_ids[:, :-1])
        self.targets = tf.constant(data.token_ids[:, 1:])

    def order(self, epoch: int) -> np.ndarray:
        """Study indices int64 (studies,) for 0-based ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def epoch(self, epoch: int) -> tf.data.Dataset:
        """Yield ((features, input tokens), target tokens) batches for 0-based ``epoch``."""

        def gather(indices):
            return (tf.gather(self.features, indices), tf.gather(self.inputs, indices)), tf.gather(self.targets, indices)

        indices = tf.data.Dataset.from_tensor_slices(self.order(epoch)).batch(self.batch_size)
        return indices.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
