"""DenseNet-121 features of radiographs, shared by the featurize stage and by prediction.

The featurize stage and ``cxrgen predict`` (and the web page) compute features with these
functions, so a study uploaded by a user is encoded exactly as the studies the model was
trained on: the same preprocessing (``pipeline.images.preprocess_radiograph``), the same
forward pass, the same choice of views and the same storage dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import keras
import numpy as np
import tensorflow as tf

from pipeline.images import preprocess_radiograph

VIEWS = 2
CHANNELS = 1024

View = TypeVar("View")
Forward = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def compiled_forward(backbone: keras.Model) -> Forward:
    """Compile the backbone's forward pass.

    The returned function maps pixels float32 (batch, size, size, 3) to the spatial grid
    (batch, s, s, 1024) and its global average (batch, 1024), with s = size / 32.
    """

    @tf.function(reduce_retracing=True)
    def forward(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        spatial = backbone(pixels, training=False)
        return spatial, tf.reduce_mean(spatial, axis=[1, 2])

    return forward


def image_features(forward: Forward, pixels: np.ndarray | tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Compute the features of a batch of preprocessed radiographs.

    ``pixels`` float32 (images, size, size, 3) from ``preprocess_radiograph``. Returns
    pooled float32 (images, 1024) and spatial float32 (images, s*s, 1024): the s x s grid
    in row-major order.
    """
    spatial, pooled = forward(tf.convert_to_tensor(pixels, tf.float32))
    spatial = spatial.numpy()
    return pooled.numpy(), spatial.reshape(spatial.shape[0], -1, spatial.shape[-1])


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
    forward: Forward,
    paths: Sequence[Path | str],
    image_size: int,
    max_pixels: int,
    feature_kind: str,
    storage_dtype: str,
) -> tuple[np.ndarray, bool]:
    """Compute one study's model input from one or two radiograph files, frontal first.

    Returns the features as ``study_features`` does, (2, 1024) or (2 * cells, 1024), and
    whether the study is single-view. Raises ImageDecodeError for an unreadable file.
    """
    views, single_view = pair_views([Path(path) for path in paths])
    distinct = list(dict.fromkeys(views))
    pixels = np.stack([preprocess_radiograph(path, image_size, max_pixels) for path in distinct])
    pooled, spatial = image_features(forward, pixels)
    rows = [distinct.index(view) for view in views]
    return study_features(pooled[rows], spatial[rows], feature_kind, storage_dtype), single_view
