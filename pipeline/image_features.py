"""DenseNet-121 features of radiographs, shared by the featurize stage and by prediction.

The featurize stage and ``cxrgen predict`` (and the web page) compute features with the
same code, so a study uploaded by a user is encoded exactly as the studies the model was
trained on: the same preprocessing (``pipeline.images.preprocess_radiograph``), the same
``FeatureExtractor`` (precision and batch shape included), the same choice of views and
the same storage dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipeline.extractor import CHANNELS, FeatureExtractor
from pipeline.images import preprocess_radiograph

VIEWS = 2

View = TypeVar("View")


def image_features(extractor: FeatureExtractor, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute the features of preprocessed radiographs with the featurize stage's extractor.

    ``pixels`` float32 (images, size, size, 3) from ``preprocess_radiograph``. Returns
    pooled (images, 1024) and spatial (images, s*s, 1024) in the storage dtype, the s x s
    grid in row-major order. The extractor pads every batch to its batch size, so the
    features equal those the stage stores for the same images.
    """
    batch_size = extractor.settings.batch_size
    parts = [extractor.forward(pixels[start : start + batch_size]) for start in range(0, len(pixels), batch_size)]
    return np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts])


def pair_views(usable: Sequence[View]) -> tuple[list[View], bool]:
    """Choose a study's two views from its usable images, listed frontal first when known.

    Returns (view 0, view 1) and whether the study is single-view. A study with one usable
    image uses it for both views; with more than two, the first and the last are used.
    Raises ValueError when no image is usable.
    """
    distinct = list(dict.fromkeys(usable))
    if not distinct:
        raise ValueError("a study needs at least one usable image")
    if len(distinct) == 1:
        return [distinct[0], distinct[0]], True
    return [distinct[0], distinct[-1]], False


def study_features(pooled: np.ndarray, spatial: np.ndarray, feature_kind: str, storage_dtype: str) -> np.ndarray:
    """Assemble one study's model input from its two views' features.

    ``pooled`` (2, 1024) and ``spatial`` (2, cells, 1024), view 0 first. Returns
    (2, 1024) for ``feature_kind`` "pooled" or (2 * cells, 1024) for "spatial", with view
    0's cells before view 1's, rounded to ``storage_dtype`` as the feature store keeps them.
    """
    if feature_kind == "pooled":
        features = pooled
    elif feature_kind == "spatial":
        features = spatial.reshape(VIEWS * spatial.shape[1], CHANNELS)
    else:
        raise ValueError(f"unknown feature kind {feature_kind!r}; expected 'pooled' or 'spatial'")
    return features.astype(storage_dtype)


def radiograph_study_features(
    extractor: FeatureExtractor, paths: Sequence[Path | str], max_pixels: int, feature_kind: str
) -> tuple[np.ndarray, bool]:
    """Compute one study's model input from one or two radiograph files, frontal first.

    Returns the features as ``study_features`` does, (2, 1024) or (2 * cells, 1024), and
    whether the study is single-view. Raises ImageDecodeError for an unreadable file.
    """
    settings = extractor.settings
    views, single_view = pair_views([Path(path) for path in paths])
    distinct = list(dict.fromkeys(views))
    pixels = np.stack([preprocess_radiograph(path, settings.image_size, max_pixels) for path in distinct])
    pooled, spatial = image_features(extractor, pixels)
    rows = [distinct.index(view) for view in views]
    return study_features(pooled[rows], spatial[rows], feature_kind, settings.storage_dtype), single_view
