"""The featurize stage: radiographs to CheXNet (DenseNet-121) features in HDF5.

Output ``features/chexnet.h5`` holds one row per study, in the order of ``studies.parquet``:

* ``study_id`` (studies,) string
* ``image_ids`` (studies, 2) string: the two views, frontal first when views are labelled
* ``single_view`` (studies,) bool: the study had one usable image, used for both views
* ``pooled`` (studies, 2, 1024): global average of the last DenseNet block, per view
* ``spatial`` (studies, 98, 1024): the 7x7 block of view 0 (rows 0-48), then view 1 (49-97)

File attributes name the weights, their sha256, the input size and the normalisation.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from pipeline import __version__, hdf5io
from pipeline.atomic import atomic_path
from pipeline.backbone import RANDOM_WARNING, BackboneInfo, build_feature_extractor
from pipeline.config import FeaturizeParams
from pipeline.image_features import CHANNELS, VIEWS, compiled_forward, image_features, pair_views
from pipeline.images import NORMALISATION, ImageDecodeError, preprocess_radiograph
from pipeline.logs import log_duration

logger = logging.getLogger(__name__)


@dataclass
class ImageFeatures:
    """Features of distinct images in the storage dtype: pooled (images, 1024), spatial
    (images, cells, 1024), and ok (images,), False where the image could not be decoded."""

    pooled: np.ndarray
    spatial: np.ndarray
    ok: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)


def run(
    params: FeaturizeParams,
    studies_path: Path = Path("data/interim/studies.parquet"),
    images_dir: Path = Path("data/raw/images"),
    manifest_path: Path = Path("data/raw/manifest.json"),
    output_path: Path = Path("features/chexnet.h5"),
) -> None:
    """Compute features for every study in ``studies_path`` and write ``output_path``."""
    studies = pd.read_parquet(studies_path)
    view_ids = np.array([list(ids) for ids in studies["view_image_ids"]], dtype=object).reshape(-1, VIEWS)
    image_ids = sorted(set(view_ids.ravel()))
    logger.info("featurize: %d studies, %d distinct images", len(studies), len(image_ids))

    backbone, info = build_feature_extractor(params.weights, params.image_size)
    paths = [images_dir / f"{image_id}.png" for image_id in image_ids]
    with log_duration(logger, "featurize: forward pass"):
        features = extract_image_features(backbone, paths, params)
    _log_failures(features, paths)

    index = {image_id: row for row, image_id in enumerate(image_ids)}
    standin = _standin_images(manifest_path)
    with atomic_path(output_path) as temporary:
        kept = write_study_features(temporary, studies["study_id"].tolist(), view_ids, index, features, params)
        _write_attrs(temporary, params, info, standin)
    logger.info("featurize: wrote %s with %d of %d studies", output_path, kept, len(studies))
    if info.random:
        logger.warning("featurize: %s", RANDOM_WARNING)


def extract_image_features(backbone: tf.keras.Model, paths: list[Path], params: FeaturizeParams) -> ImageFeatures:
    """Run the backbone over images in batches; decoding overlaps the forward pass.

    Returns pooled (images, 1024) and spatial (images, s*s, 1024) in the storage dtype,
    with ``ok`` False and an error message for images that could not be decoded.
    """
    dataset, errors = _image_dataset(paths, params)
    forward = compiled_forward(backbone)
    cells = int(backbone.output.shape[1]) * int(backbone.output.shape[2])
    pooled = np.zeros((len(paths), CHANNELS), params.storage_dtype)
    spatial = np.zeros((len(paths), cells, CHANNELS), params.storage_dtype)
    ok = np.zeros(len(paths), bool)

    batches = -(-len(paths) // params.batch_size)
    for indices, pixels, decoded in tqdm(dataset, total=batches, desc="featurize", unit="batch"):
        batch_pooled, batch_spatial = image_features(forward, pixels)
        rows = indices.numpy()
        pooled[rows] = batch_pooled.astype(params.storage_dtype)
        spatial[rows] = batch_spatial.astype(params.storage_dtype)
        ok[rows] = decoded.numpy()
    return ImageFeatures(pooled, spatial, ok, dict(errors))


def _image_dataset(paths: list[Path], params: FeaturizeParams) -> tuple[tf.data.Dataset, dict[int, str]]:
    errors: dict[int, str] = {}
    lock = threading.Lock()
    size = params.image_size
    path_strings = [str(path) for path in paths]

    def load(index: np.int64) -> tuple[np.ndarray, np.bool_]:
        try:
            return preprocess_radiograph(path_strings[int(index)], size, params.max_pixels), np.True_
        except ImageDecodeError as error:
            with lock:
                errors[int(index)] = str(error)
            return np.zeros((size, size, 3), np.float32), np.False_

    def load_tensor(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        pixels, decoded = tf.numpy_function(load, [index], [tf.float32, tf.bool], stateful=False)
        pixels.set_shape((size, size, 3))
        decoded.set_shape(())
        return index, pixels, decoded

    dataset = tf.data.Dataset.range(len(paths)).map(load_tensor, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(params.batch_size).prefetch(2), errors


def _log_failures(features: ImageFeatures, paths: list[Path]) -> None:
    failed = int((~features.ok).sum())
    if not failed:
        return
    logger.warning("featurize: skipped %d of %d images that could not be decoded", failed, len(paths))
    for message in list(features.errors.values())[:20]:
        logger.warning("featurize: skipped %s", message)


def write_study_features(
    path: Path,
    study_ids: list[str],
    view_ids: np.ndarray,
    index: dict[str, int],
    features: ImageFeatures,
    params: FeaturizeParams,
) -> int:
    """Write one row per study whose views decoded; return how many studies were written."""
    rows, used_ids, single = _choose_views(study_ids, view_ids, index, features.ok)
    kept_ids = [study_ids[row] for row in rows]
    count = len(kept_ids)
    cells = features.spatial.shape[1]
    with hdf5io.open_for_writing(path, "w", track_order=True) as store:
        _dataset(store, "study_id", np.array(kept_ids, dtype=object), h5py.string_dtype())
        _dataset(store, "image_ids", np.array(used_ids, dtype=object).reshape(count, VIEWS), h5py.string_dtype())
        _dataset(store, "single_view", np.array(single, dtype=bool))
        pooled = store.create_dataset(
            "pooled", (count, VIEWS, CHANNELS), params.storage_dtype, chunks=(1, VIEWS, CHANNELS), track_times=False
        )
        spatial = store.create_dataset(
            "spatial", (count, VIEWS * cells, CHANNELS), params.storage_dtype,
            chunks=(1, VIEWS * cells, CHANNELS), track_times=False,
        )
        for out_row, image_pair in enumerate(tqdm(used_ids, desc="write studies", unit="study")):
            image_rows = [index[image_id] for image_id in image_pair]
            pooled[out_row] = features.pooled[image_rows]
            spatial[out_row] = features.spatial[image_rows].reshape(VIEWS * cells, CHANNELS)
    return count


def _choose_views(
    study_ids: list[str], view_ids: np.ndarray, index: dict[str, int], ok: np.ndarray
) -> tuple[list[int], list[list[str]], list[bool]]:
    rows, used_ids, single = [], [], []
    dropped = 0
    for row, pair in enumerate(view_ids):
        usable = [image_id for image_id in pair if ok[index[image_id]]]
        if not usable:
            dropped += 1
            continue
        views, single_view = pair_views(usable)
        rows.append(row)
        used_ids.append(views)
        single.append(single_view)
    if dropped:
        logger.warning("featurize: dropped %d of %d studies with no decodable image", dropped, len(study_ids))
    return rows, used_ids, single


def _dataset(store: h5py.File, name: str, values: np.ndarray, dtype=None) -> None:
    store.create_dataset(name, data=values, dtype=dtype, track_times=False)


def _standin_images(manifest_path: Path) -> bool:
    import json

    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return bool(manifest.get("standin_images", False))


def _write_attrs(path: Path, params: FeaturizeParams, info: BackboneInfo, standin: bool) -> None:
    with hdf5io.open_for_writing(path, "a") as store:
        store.attrs.update(
            {
                "weights": info.weights,
                "weights_source": info.source,
                "weights_sha256": info.sha256 or "",
                "random_weights": info.random,
                "standin_images": standin,
                "image_size": params.image_size,
                "normalisation": NORMALISATION,
                "feature_layer": "DenseNet-121 final BN+ReLU, before global pooling",
                "storage_dtype": params.storage_dtype,
                "view_order": "view 0 is frontal and view 1 lateral when labelled, else image id order",
                "created_by": f"cxrgen {__version__}",
            }
        )
        if info.random:
            store.attrs["warning"] = RANDOM_WARNING
