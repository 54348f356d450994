"""Compute features on a dask.distributed cluster; the calling process stores the results.

The client broadcasts the model (its Keras JSON config and weight arrays) to every worker
once. Each task is a shard of ``task_batches * batch_size`` images. A worker builds the
model for its first task, keeps it for later tasks, and returns the features of each
batch. The client writes every returned batch into the per-image cache as it
arrives, so a run stopped half-way resumes from the finished shards, as a local run does.

Workers read images by path: the image folder must be visible to every worker at the
same absolute path (a shared file system), and the paths are resolved on the client.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from pipeline.config import FeaturizeParams
from pipeline.errors import PipelineError
from pipeline.extractor import ExtractorSettings, FeatureExtractor, ImageBatch

logger = logging.getLogger(__name__)

# Per worker process: models built so far, by model key, and counts for worker_stats().
_MODELS: dict[str, FeatureExtractor] = {}
_MODELS_LOCK = threading.Lock()
_STATS = {"models_built": 0, "shards": 0, "images": 0}
CONNECT_TIMEOUT_S = 30


class SchedulerError(PipelineError, ConnectionError):
    """Raised when the dask scheduler cannot be reached."""


@dataclass
class ModelPayload:
    """Everything a worker needs to rebuild the float32 backbone: Keras JSON and weights."""

    key: str
    config_json: str
    weights: list[np.ndarray]


def compute_on_cluster(
    address: str,
    backbone: keras.Model,
    settings: ExtractorSettings,
    todo: list[tuple[str, Path]],
    cache,
    params: FeaturizeParams,
) -> None:
    """Compute ``(sha256, path)`` items on the cluster at ``address`` and write them into ``cache``."""
    from dask.distributed import Client, as_completed

    try:
        client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as error:
        raise SchedulerError(
            f"featurize.scheduler {address}: could not connect to the dask scheduler ({error}); start it with "
            "'dask scheduler' and workers with 'dask worker ADDRESS', or set featurize.scheduler to null"
        ) from None
    with client:
        workers = len(client.scheduler_info()["workers"])
        payload = ModelPayload(cache.key, backbone.to_json(), backbone.get_weights())
        payload_future = client.scatter(payload, broadcast=True, hash=False)
        images_per_task = settings.batch_size * params.task_batches
        shards = [[(key, str(Path(path).resolve())) for key, path in todo[start : start + images_per_task]]
                  for start in range(0, len(todo), images_per_task)]
        logger.info("featurize: sending %d tasks of up to %d images to %d dask workers at %s",
                    len(shards), images_per_task, workers, address)
        futures = client.map(
            featurize_shard, shards, payload=payload_future, settings=settings,
            decode_threads=params.decode_threads, pure=False,
        )
        for future in tqdm(as_completed(futures), total=len(futures), desc="featurize (dask)", unit="task"):
            for batch in future.result():
                cache.write_batch(batch)
            future.release()


def featurize_shard(
    items: list[tuple[str, str]], payload: ModelPayload, settings: ExtractorSettings, decode_threads: int
) -> list[ImageBatch]:
    """Run on a worker: return the features of ``(sha256, path)`` items, batch by batch."""
    extractor = _worker_extractor(payload, settings, decode_threads)
    batches = list(extractor.run([(key, Path(path)) for key, path in items]))
    with _MODELS_LOCK:
        _STATS["shards"] += 1
        _STATS["images"] += len(items)
    return batches


def _worker_extractor(payload: ModelPayload, settings: ExtractorSettings, decode_threads: int) -> FeatureExtractor:
    model_key = f"{payload.key}/{settings}"
    with _MODELS_LOCK:
        if model_key not in _MODELS:
            backbone = keras.models.model_from_json(payload.config_json)
            backbone.set_weights(payload.weights)
            _MODELS[model_key] = FeatureExtractor(backbone, settings, decode_threads)
            _STATS["models_built"] += 1
            logger.info("worker: built the model %s", payload.key)
        return _MODELS[model_key]


def worker_stats() -> dict[str, int]:
    """Return this worker process's counts: models built, shards and images computed."""
    with _MODELS_LOCK:
        return dict(_STATS)
