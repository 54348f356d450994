"""Batched DenseNet-121 inference over radiograph files, with decoding overlapped.

:class:`FeatureExtractor` compiles one forward function for a fixed batch shape. Every
batch, the last one included, is padded to ``batch_size`` images. oneDNN picks its kernels
by input shape, and a smaller batch can round differently in the last bit, so the padding
makes an image's features independent of the other images in its batch.

Threads decode and resize the next batches while the model runs on the current one.
Pillow and NumPy release the GIL for that work, and so does TensorFlow while it runs.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.images import ImageDecodeError, preprocess_radiograph

logger = logging.getLogger(__name__)

CHANNELS = 1024
PRECISIONS = ("float32", "bfloat16")
# Decode threads run at this nice value, so the model's threads keep their cores and
# decoding fills the moments when they wait for each other.
DECODE_NICENESS = 10


@dataclass(frozen=True)
class ExtractorSettings:
    """Everything besides the weights that decides the features of one image."""

    image_size: int
    batch_size: int
    precision: str
    storage_dtype: str
    max_pixels: int

    @property
    def cells(self) -> int:
        """Spatial cells per image: (image_size / 32) squared, 49 at 224 px."""
        side = self.image_size // 32
        return side * side


@dataclass
class ImageBatch:
    """Features of up to ``batch_size`` images, in the order they were given.

    ``pooled`` is (images, 1024) and ``spatial`` (images, cells, 1024), both in the
    storage dtype. Rows whose ``ok`` is False contain zeros, and ``errors`` contains the
    decode error of each image without its path (empty when it decoded).
    """

    keys: list[str]
    ok: np.ndarray
    errors: list[str]
    pooled: np.ndarray
    spatial: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


class FeatureExtractor:
    """A DenseNet-121 feature model in one precision, compiled for one batch shape."""

    def __init__(self, backbone: keras.Model, settings: ExtractorSettings, decode_threads: int = 2):
        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {settings.precision!r}")
        self.settings = settings
        self.decode_threads = decode_threads
        self.model = cast_model(backbone, settings.precision)
        self._forward = _compile_forward(self.model, settings)

    def forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on up to ``batch_size`` preprocessed images.

        ``pixels`` is float32 (images, size, size, 3) as :func:`preprocess_radiograph`
        returns. Returns pooled (images, 1024) and spatial (images, cells, 1024) in the
        storage dtype; pooled is the float32 mean of the spatial cells, rounded once.
        """
        count = len(pixels)
        batch_size = self.settings.batch_size
        if count > batch_size:
            raise ValueError(f"{count} images exceed batch_size {batch_size}")
        if count < batch_size:
            padded = np.zeros((batch_size, *pixels.shape[1:]), np.float32)
            padded[:count] = pixels
            pixels = padded
        pooled, spatial = self._forward(pixels)
        return pooled.numpy()[:count], spatial.numpy()[:count]

    def run(self, items: Sequence[tuple[str, Path]]) -> Iterator[ImageBatch]:
        """Yield the features of ``(key, path)`` items batch by batch, in order."""
        paths = [path for _, path in items]
        for start, stop, pixels, errors in decode_batches(paths, self.settings, self.decode_threads):
            pooled, spatial = self.forward(pixels[: stop - start])
            ok = np.array([not error for error in errors], bool)
            pooled[~ok] = 0
            spatial[~ok] = 0
            keys = [key for key, _ in items[start:stop]]
            yield ImageBatch(keys, ok, errors, pooled, spatial)


def cast_model(backbone: keras.Model, precision: str) -> keras.Model:
    """Return ``backbone`` itself for float32, or a copy whose layers compute in bfloat16."""
    if precision == "float32":
        return backbone

    def to_bfloat16(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        config["dtype"] = "bfloat16"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(backbone, clone_function=to_bfloat16)
    copy.set_weights(backbone.get_weights())
    return copy


def _compile_forward(model: keras.Model, settings: ExtractorSettings):
    size, batch_size, cells = settings.image_size, settings.batch_size, settings.cells
    compute_dtype = tf.bfloat16 if settings.precision == "bfloat16" else tf.float32
    storage_dtype = tf.as_dtype(settings.storage_dtype)

    @tf.function(input_signature=[tf.TensorSpec((batch_size, size, size, 3), tf.float32)])
    def forward(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        spatial = tf.cast(model(tf.cast(pixels, compute_dtype), training=False), tf.float32)
        pooled = tf.reduce_mean(spatial, axis=[1, 2])
        spatial = tf.reshape(spatial, (batch_size, cells, CHANNELS))
        return tf.cast(pooled, storage_dtype), tf.cast(spatial, storage_dtype)

    return forward


def decode_batches(
    paths: Sequence[Path], settings: ExtractorSettings, threads: int, prefetch_batches: int = 2
) -> Iterator[tuple[int, int, np.ndarray, list[str]]]:
    """Decode ``paths`` in batches on a thread pool, ``prefetch_batches`` ahead of the consumer.

    Yields ``(start, stop, pixels, errors)``: pixels is float32 (batch_size, size, size, 3)
    with zeros after row ``stop - start`` and in rows that failed. ``errors`` contains one
    reason per image, without the path, empty when it decoded.
    """
    batch_size = settings.batch_size
    pending: collections.deque[tuple[int, int, np.ndarray, list[Future]]] = collections.deque()
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode", initializer=_lower_priority)

    def submit(start: int) -> None:
        stop = min(start + batch_size, len(paths))
        pixels = np.zeros((batch_size, settings.image_size, settings.image_size, 3), np.float32)
        futures = [pool.submit(_decode_into, pixels, slot, paths[index], settings) for slot, index in enumerate(range(start, stop))]
        pending.append((start, stop, pixels, futures))

    try:
        starts = iter(range(0, len(paths), batch_size))
        for start in starts:
            submit(start)
            if len(pending) > prefetch_batches:
                break
        while pending:
            start, stop, pixels, futures = pending.popleft()
            errors = [future.result() for future in futures]
            next_start = next(starts, None)
            if next_start is not None:
                submit(next_start)
            yield start, stop, pixels, errors
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_into(pixels: np.ndarray, slot: int, path: Path, settings: ExtractorSettings) -> str:
    try:
        preprocess_radiograph(path, settings.image_size, settings.max_pixels, out=pixels[slot])
    except ImageDecodeError as error:
        # The cache stores errors by content hash, so the reason must not name this one path.
        return error.reason
    return ""


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
    except OSError:  # not permitted in some sandboxes; decoding then competes at equal priority
        logger.debug("could not lower the priority of decode threads")
