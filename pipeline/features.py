"""Read ``features/chexnet.h5``: random access by study id, and the tf.data input for training.

>>> with open_features("features/chexnet.h5") as store:
...     study = store["CXR1_1_IM-0001"]        # StudyFeatures: pooled (2, 1024), spatial (98, 1024)
...     train = store.tf_dataset(ids, "pooled")  # float32 (2, 1024) per study, streamed from the file
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tensorflow as tf

from pipeline.errors import PipelineError

FEATURE_KINDS = ("pooled", "spatial")
READ_BLOCK = 64  # studies per read when streaming; one pooled chunk contains 64 studies


class FeatureStoreError(PipelineError, ValueError):
    """Raised for a features file that is missing or lacks the expected datasets."""


@dataclass(frozen=True)
class StudyFeatures:
    """One study's features: pooled (2, 1024) and spatial (2 * cells, 1024), in the stored dtype.

    ``image_ids`` and ``single_view`` are None for files written before those datasets existed.
    """

    study_id: str
    image_ids: tuple[str, str] | None
    single_view: bool | None
    pooled: np.ndarray
    spatial: np.ndarray


def open_features(path: Path | str) -> FeatureStore:
    """Open a features file for reading; use it as a context manager or call ``close()``."""
    return FeatureStore(path)


class FeatureStore:
    """Read-only access to the studies of one features file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureStoreError(f"{self.path}: features file not found; run 'dvc repro featurize' first")
        self._file = h5py.File(self.path, "r")
        if "study_id" not in self._file:
            self._file.close()
            raise FeatureStoreError(f"{self.path}: no 'study_id' dataset; rerun the featurize stage")
        self.study_ids: list[str] = [_text(value) for value in self._file["study_id"][:]]
        self._rows = {study_id: row for row, study_id in enumerate(self.study_ids)}

    @property
    def attrs(self) -> dict:
        """The file attributes (weights, sha256, input size ...) as plain Python values."""
        return {key: _plain(value) for key, value in self._file.attrs.items()}

    def dataset_attrs(self, name: str) -> dict:
        """Return the attributes of one dataset, such as ``description`` and ``dimensions``."""
        return {key: _plain(value) for key, value in self._file[name].attrs.items()}

    def __len__(self) -> int:
        return len(self.study_ids)

    def __contains__(self, study_id: object) -> bool:
        return study_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.study_ids)

    def __getitem__(self, study_id: str) -> StudyFeatures:
        row = self._row(study_id)
        image_ids = tuple(_text(value) for value in self._file["image_ids"][row]) if "image_ids" in self._file else None
        single_view = bool(self._file["single_view"][row]) if "single_view" in self._file else None
        pooled, spatial = (self._dataset(kind)[row] for kind in FEATURE_KINDS)
        return StudyFeatures(study_id, image_ids, single_view, pooled, spatial)

    def get(self, study_id: str, default: StudyFeatures | None = None) -> StudyFeatures | None:
        """Return the study's features, or ``default`` when the file does not hold the study."""
        return self[study_id] if study_id in self._rows else default

    def read(self, study_ids: Sequence[str], kind: str) -> np.ndarray:
        """Read ``kind`` features of many studies: (studies, regions, 1024) in ``study_ids`` order."""
        dataset = self._dataset(kind)
        rows = np.array([self._row(study_id) for study_id in study_ids], dtype=np.int64)
        return _read_rows(dataset, rows)

    def tf_dataset(self, study_ids: Sequence[str], kind: str) -> tf.data.Dataset:
        """Stream float32 (regions, 1024) features per study, in ``study_ids`` order.

        Reads blocks of READ_BLOCK studies through its own file handle, so memory does
        not grow with the number of studies and the store may be closed meanwhile.
        """
        rows = np.array([self._row(study_id) for study_id in study_ids], dtype=np.int64)
        shape = self._dataset(kind).shape[1:]
        path = str(self.path)

        def generate() -> Iterator[np.ndarray]:
            with h5py.File(path, "r") as handle:
                for start in range(0, len(rows), READ_BLOCK):
                    yield from _read_rows(handle[kind], rows[start : start + READ_BLOCK]).astype(np.float32)

        return tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec(shape, tf.float32))

    def _dataset(self, kind: str) -> h5py.Dataset:
        if kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
        if kind not in self._file:
            raise FeatureStoreError(f"{self.path}: no {kind!r} dataset; rerun the featurize stage")
        return self._file[kind]

    def _row(self, study_id: str) -> int:
        row = self._rows.get(study_id)
        if row is None:
            raise KeyError(f"{study_id!r} is not in {self.path} ({len(self)} studies)")
        return row

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read rows in any order; h5py needs increasing unique indices, so read those and reorder."""
    if rows.size == 0:
        return np.zeros((0, *dataset.shape[1:]), dataset.dtype)
    unique_rows, inverse = np.unique(rows, return_inverse=True)
    return dataset[unique_rows][inverse]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value
