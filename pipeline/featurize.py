"""The featurize stage: radiographs to DenseNet-121 features in HDF5, through a per-image cache.

Output ``features/chexnet.h5`` contains one row per study, in the order of ``studies.parquet``:

* ``study_id`` (studies,) string
* ``image_ids`` (studies, 2) string: the two views, frontal first when views are labelled
* ``image_sha256`` (studies, 2) string: content hash of each view's file
* ``single_view`` (studies,) bool: the study had one usable image, used for both views
* ``pooled`` (studies, 2, 1024): global average of the last DenseNet block, per view
* ``spatial`` (studies, 98, 1024): the 7x7 block of view 0 (rows 0-48), then view 1 (49-97)

Every dataset has ``description`` and ``dimensions`` attributes; file attributes name the
weights, their sha256, the input size, the normalisation, the precision and the cache key.
Features come from the per-image cache in ``features/cache`` (see
:mod:`pipeline.feature_cache`); only images missing there are computed, locally or on a
dask cluster, and the output file is assembled from the cache and renamed into place.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from pipeline import __version__, hdf5io
from pipeline.atomic import atomic_path
from pipeline.backbone import RANDOM_WARNING, BackboneInfo, build_feature_extractor
from pipeline.config import FeaturizeParams
from pipeline.extractor import CHANNELS, ExtractorSettings, FeatureExtractor
from pipeline.feature_cache import FeatureCache, FileHashes
from pipeline.image_features import pair_views
from pipeline.images import NORMALISATION, PREPROCESSING_VERSION
from pipeline.logs import log_duration

logger = logging.getLogger(__name__)

VIEWS = 2
DEFAULT_CACHE_DIR = Path("features/cache")
STUDIES_PER_BLOCK = 64  # studies assembled and written at a time; also the row count of a pooled chunk
DATASET_ATTRS = {
    "study_id": ("Open-I image series id, one row per study", "study"),
    "image_ids": ("image id of view 0 and view 1; both equal when single_view", "study, view"),
    "image_sha256": ("sha256 of each view's image file, the key of the per-image cache", "study, view"),
    "single_view": ("the study had one usable image, stored as both views", "study"),
    "pooled": ("global average of the final DenseNet-121 BN+ReLU map, per view", "study, view, channel"),
    "spatial": ("final DenseNet-121 BN+ReLU map, cells of view 0 then view 1, row-major", "study, view*cell, channel"),
}


@dataclass
class FeaturizeSummary:
    """Counts of one featurize run."""

    images: int  # distinct image ids named by the studies
    cached: int  # images whose features (or decode error) the cache already held
    computed: int  # images decoded and run through the model in this run
    failed: int  # images missing or not decodable
    studies: int  # studies in studies.parquet
    written: int  # studies written to the output


def run(
    params: FeaturizeParams,
    studies_path: Path = Path("data/interim/studies.parquet"),
    images_dir: Path = Path("data/raw/images"),
    manifest_path: Path = Path("data/raw/manifest.json"),
    output_path: Path = Path("features/chexnet.h5"),
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> FeaturizeSummary:
    """Compute features for every study in ``studies_path`` and write ``output_path``."""
    return Featurizer(params, cache_dir).run(studies_path, images_dir, manifest_path, output_path)


def cache_description(info: BackboneInfo, settings: ExtractorSettings) -> dict:
    """Describe everything that decides an image's stored features; its hash is the cache key."""
    return {
        "weights_sha256": info.sha256,
        "weights": info.weights,
        "architecture": "DenseNet-121 without top, output of layer 'relu'",
        "image_size": settings.image_size,
        "normalisation": NORMALISATION,
        "max_pixels": settings.max_pixels,
        "preprocessing_version": PREPROCESSING_VERSION,
        "precision": settings.precision,
        "storage_dtype": settings.storage_dtype,
        "batch_size": settings.batch_size,
    }


class Featurizer:
    """The featurize stage with its model built once, so that it can run more than once."""

    def __init__(self, params: FeaturizeParams, cache_dir: Path = DEFAULT_CACHE_DIR):
        self.params = params
        self.cache_dir = Path(cache_dir)
        self.backbone, self.info = build_feature_extractor(params.weights, params.image_size, self.cache_dir / "converted")
        self.settings = ExtractorSettings(
            params.image_size, params.batch_size, params.precision, params.storage_dtype, params.max_pixels
        )
        self.description = cache_description(self.info, self.settings)
        self._extractor: FeatureExtractor | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        """The local model in the configured precision, built on first use."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.backbone, self.settings, self.params.decode_threads)
        return self._extractor

    def run(
        self, studies_path: Path, images_dir: Path, manifest_path: Path, output_path: Path, cache_dir: Path | None = None
    ) -> FeaturizeSummary:
        """Bring the cache up to date for the studies' images and write ``output_path`` from it.

        ``cache_dir`` replaces the cache folder given to the constructor for this run.
        """
        cache_dir = Path(cache_dir) if cache_dir is not None else self.cache_dir
        studies = pd.read_parquet(studies_path)
        view_ids = np.array([list(ids) for ids in studies["view_image_ids"]], dtype=object).reshape(-1, VIEWS)
        image_ids = sorted(set(view_ids.ravel()))
        paths = [Path(images_dir) / f"{image_id}.png" for image_id in image_ids]
        hash_store = FileHashes(cache_dir / "file_hashes.sqlite")
        try:
            hashes = dict(zip(image_ids, hash_store.sha256_many(paths), strict=True))
        finally:
            hash_store.close()

        compression = None if self.params.compression == "none" else self.params.compression
        with FeatureCache(cache_dir, self.description, self.settings.cells, self.params.storage_dtype, compression) as cache:
            _remove_stale_outputs(Path(output_path))
            todo = _images_to_compute(cache, image_ids, paths, hashes)
            distinct = len({key for key in hashes.values() if key})
            missing = sum(1 for key in hashes.values() if not key)
            cached = distinct - len(todo)
            logger.info(
                "featurize: %d image files, %d distinct by content (sha256): %d cached, %d to compute; %d missing",
                len(image_ids), distinct, cached, len(todo), missing,
            )
            if todo:
                self._compute(cache, todo)
            status = cache.status([key for key in hashes.values() if key])
            failed = _log_failures(image_ids, paths, hashes, status)
            with log_duration(logger, f"featurize: write {output_path}"), atomic_path(output_path) as temporary:
                written = write_study_features(temporary, studies["study_id"].tolist(), view_ids, hashes, status, cache, self.params)
                _write_attrs(temporary, self.params, self.info, _standin_images(manifest_path), cache.key)
        summary = FeaturizeSummary(len(image_ids), cached, len(todo), failed, len(studies), written)
        logger.info("featurize: wrote %s; %s", output_path, json.dumps(asdict(summary)))
        if self.info.random:
            logger.warning("featurize: %s", RANDOM_WARNING)
        return summary

    def _compute(self, cache: FeatureCache, todo: list[tuple[str, Path]]) -> None:
        start = time.perf_counter()
        if self.params.scheduler:
            from pipeline.distributed import compute_on_cluster

            compute_on_cluster(self.params.scheduler, self.backbone, self.settings, todo, cache, self.params)
        else:
            self._compute_local(cache, todo)
        seconds = time.perf_counter() - start
        logger.info("featurize: computed %d images in %.1f s (%.1f images/s)", len(todo), seconds, len(todo) / seconds)

    def _compute_local(self, cache: FeatureCache, todo: list[tuple[str, Path]]) -> None:
        """Run the model here; a writer thread stores each finished batch while the next one runs."""
        batches = math.ceil(len(todo) / self.settings.batch_size)
        with ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as writer:
            pending: collections.deque = collections.deque()
            for batch in tqdm(self.extractor.run(todo), total=batches, desc="featurize", unit="batch"):
                pending.append(writer.submit(cache.write_batch, batch))
                while len(pending) > 2:
                    pending.popleft().result()
            for future in pending:
                future.result()


def _remove_stale_outputs(output_path: Path) -> None:
    """Delete temporary output files that a killed run left beside ``output_path``."""
    for stale in output_path.parent.glob(f".{output_path.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
        logger.info("featurize: removed %s, left by an interrupted run", stale)


def _images_to_compute(
    cache: FeatureCache, image_ids: list[str], paths: list[Path], hashes: dict[str, str | None]
) -> list[tuple[str, Path]]:
    """Return ``(sha256, path)`` of images not in the cache, one per content, in image id order."""
    present = cache.contains(key for key in hashes.values() if key)
    todo: dict[str, Path] = {}
    for image_id, path in zip(image_ids, paths, strict=True):
        key = hashes[image_id]
        if key and key not in present and key not in todo:
            todo[key] = path
    return list(todo.items())


def _log_failures(image_ids: list[str], paths: list[Path], hashes: dict[str, str | None], status: dict) -> int:
    """Log missing and undecodable images, each with its own path; return how many there are.

    The cache stores one decode error per content hash, so files with the same bytes share
    the reason, and the path comes from the image id.
    """
    missing = [image_id for image_id in image_ids if hashes[image_id] is None]
    broken = [
        (image_id, path, status[hashes[image_id]][3])
        for image_id, path in zip(image_ids, paths, strict=True)
        if hashes[image_id] and not status[hashes[image_id]][2]
    ]
    if missing:
        logger.warning("featurize: skipped %d image files that do not exist, e.g. %s", len(missing), missing[:5])
    if broken:
        logger.warning("featurize: skipped %d of %d images that could not be decoded", len(broken), len(image_ids))
        for image_id, path, reason in broken[:20]:
            logger.warning("featurize: skipped %s (%s): %s", image_id, path, reason)
    return len(missing) + len(broken)


def write_study_features(
    path: Path,
    study_ids: list[str],
    view_ids: np.ndarray,
    hashes: dict[str, str | None],
    status: dict[str, tuple[int, int, bool, str]],
    cache: FeatureCache,
    params: FeaturizeParams,
) -> int:
    """Write one row per study with a decodable view, reading features from ``cache``; return the row count."""
    usable = {image_id for image_id, key in hashes.items() if key and status[key][2]}
    rows, used_ids, single = _choose_views(study_ids, view_ids, usable)
    count = len(rows)
    used_hashes = [[hashes[image_id] for image_id in pair] for pair in used_ids]
    with hdf5io.create_reproducible(path) as store:
        _create_datasets(store, count, cache.cells, params)
        store["study_id"][:] = np.array([study_ids[row] for row in rows], dtype=object)
        store["image_ids"][:] = np.array(used_ids, dtype=object).reshape(count, VIEWS)
        store["image_sha256"][:] = np.array(used_hashes, dtype=object).reshape(count, VIEWS)
        store["single_view"][:] = np.array(single, dtype=bool)
        for start in tqdm(range(0, count, STUDIES_PER_BLOCK), desc="write studies", unit="block"):
            block = used_hashes[start : start + STUDIES_PER_BLOCK]
            entries = [status[key][:2] for pair in block for key in pair]
            pooled, spatial = cache.read(entries)
            store["pooled"][start : start + len(block)] = pooled.reshape(len(block), VIEWS, CHANNELS)
            store["spatial"][start : start + len(block)] = spatial.reshape(len(block), VIEWS * cache.cells, CHANNELS)
    return count


def _create_datasets(store: h5py.File, count: int, cells: int, params: FeaturizeParams) -> None:
    """Create the output datasets: one chunk contains a study's spatial block, or 64 studies' pooled rows."""
    text = h5py.string_dtype()
    compression = None if params.compression == "none" else params.compression
    shuffle = compression == "gzip"
    options = {"track_times": False}
    store.create_dataset("study_id", (count,), text, **options)
    store.create_dataset("image_ids", (count, VIEWS), text, **options)
    store.create_dataset("image_sha256", (count, VIEWS), text, **options)
    store.create_dataset("single_view", (count,), bool, **options)
    pooled_rows = max(1, min(count, STUDIES_PER_BLOCK))
    # maxshape lets a file with no studies keep the chunk shape; the files are never resized.
    store.create_dataset(
        "pooled", (count, VIEWS, CHANNELS), params.storage_dtype, chunks=(pooled_rows, VIEWS, CHANNELS),
        maxshape=(None, VIEWS, CHANNELS), compression=compression, shuffle=shuffle, **options,
    )
    store.create_dataset(
        "spatial", (count, VIEWS * cells, CHANNELS), params.storage_dtype, chunks=(1, VIEWS * cells, CHANNELS),
        maxshape=(None, VIEWS * cells, CHANNELS), compression=compression, shuffle=shuffle, **options,
    )
    for name, (description, dimensions) in DATASET_ATTRS.items():
        store[name].attrs.update({"description": description, "dimensions": dimensions})
    for name in ("pooled", "spatial"):
        store[name].attrs["units"] = "activation after ReLU, no unit; zero or above"


def _choose_views(study_ids: list[str], view_ids: np.ndarray, usable: set[str]) -> tuple[list[int], list[list[str]], list[bool]]:
    rows, used_ids, single = [], [], []
    dropped = 0
    for row, pair in enumerate(view_ids):
        decoded = [image_id for image_id in pair if image_id in usable]
        if not decoded:
            dropped += 1
            continue
        views, single_view = pair_views(decoded)
        rows.append(row)
        used_ids.append(views)
        single.append(single_view)
    if dropped:
        logger.warning("featurize: dropped %d of %d studies with no decodable image", dropped, len(study_ids))
    return rows, used_ids, single


def _standin_images(manifest_path: Path) -> bool:
    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return bool(manifest.get("standin_images", False))


def _write_attrs(path: Path, params: FeaturizeParams, info: BackboneInfo, standin: bool, cache_key: str) -> None:
    with hdf5io.open_for_writing(path, "a") as store:
        store.attrs.update(
            {
                "weights": info.weights,
                "weights_source": info.source,
                "weights_sha256": info.sha256,
                "random_weights": info.random,
                "standin_images": standin,
                "image_size": params.image_size,
                "normalisation": NORMALISATION,
                "preprocessing_version": PREPROCESSING_VERSION,
                "feature_layer": "DenseNet-121 final BN+ReLU, before global pooling",
                "precision": params.precision,
                "storage_dtype": params.storage_dtype,
                "compression": params.compression,
                "batch_size": params.batch_size,
                "cache_key": cache_key,
                "view_order": "view 0 is frontal and view 1 lateral when labelled, else image id order",
                "created_by": f"cxrgen {__version__}, tensorflow {tf.__version__}, keras {keras.__version__}",
            }
        )
        if info.random:
            store.attrs["warning"] = RANDOM_WARNING
