"""The train stage: fit the model named by ``params.yaml`` ``model`` on cached features.

Early stopping watches the validation split; the test split is never read here. Each epoch
writes a checkpoint to ``models/checkpoints``, and a run that was killed resumes from the
last one when its settings and data are unchanged (see ``pipeline.checkpoints``).
Outputs: ``models/model.keras``, ``models/model.json`` (what the model was trained on),
``metrics/train.json`` and ``plots/learning_curve.csv``, which is rewritten every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline.atomic import atomic_path, write_text
from pipeline.checkpoints import CheckpointStore, TrainingState
from pipeline.config import Params
from pipeline.dataset import SplitData, TrainingBatches, load_split, teacher_forcing_dataset
from pipeline.errors import PipelineError, StageInputError
from pipeline.models import MODELS, ReportGenerator, build_model, masked_accuracy, masked_loss
from pipeline.tokenizer import Tokenizer
from pipeline.validation import require_finite

logger = logging.getLogger(__name__)


def run(
    params: Params,
    features_path: Path = Path("features/chexnet.h5"),
    text_dir: Path = Path("data/text"),
    model_dir: Path = Path("models"),
    metrics_dir: Path = Path("metrics"),
    plots_dir: Path = Path("plots"),
) -> None:
    """Train (or resume), keep the weights of the best validation epoch, and save the model."""
    keras.utils.set_random_seed(params.train.seed)
    feature_kind = MODELS[params.model].feature_kind
    train = load_split(features_path, text_dir / "targets.parquet", "train", feature_kind)
    val = load_split(features_path, text_dir / "targets.parquet", "val", feature_kind)
    _require_studies(train, "train", features_path)
    _require_studies(val, "val", features_path)
    for data in (train, val):
        require_finite(data.features, data.study_ids, features_path)

    tokenizer = Tokenizer.load(text_dir / "tokenizer.json")
    matrix = np.load(text_dir / "embeddings.npy")

    strategy = make_strategy(params.train.strategy)
    with strategy.scope():
        model = compile_model(params, train, tokenizer.vocab_size, matrix)
        store = CheckpointStore(model_dir / "checkpoints")
        state = _start_state(model, store, params, _fingerprint(params, train, val, matrix))
        _fit(model, train, val, params, store, state, plots_dir)
        store.restore_best(model, state)

    _save(model, model_dir, params, features_path)
    # A run resumed after its last epoch trains nothing, and DVC has deleted the curve by then.
    _write_learning_curve(state, plots_dir)
    _write_summary(state, params, metrics_dir)
    store.mark_complete(state)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Return the tf.distribute strategy for ``train.strategy``.

    ``mirrored`` replicates the model on every visible GPU, or on every logical CPU device
    when there is no GPU, and splits each batch between the replicas.

    NOTE: with several replicas the loss is the mean of each replica's per-token mean, which
    weights tokens slightly differently from one device when replicas hold different
    numbers of real tokens.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    logger.info("train: mirrored strategy over %d devices", strategy.num_replicas_in_sync)
    return strategy


class NonFiniteLossError(PipelineError, FloatingPointError):
    """Raised when an epoch ends with a NaN or infinite loss, before its checkpoint is written."""


def _require_studies(data: SplitData, split: str, features_path: Path) -> None:
    if len(data) == 0:
        raise StageInputError(
            f"no {split} studies have both features ({features_path}) and report text; "
            "check split.val_fraction and that featurize and tokenize ran on the same studies"
        )


def compile_model(params: Params, train: SplitData, vocab_size: int, matrix: np.ndarray) -> ReportGenerator:
    """Build ``params.model`` with the GloVe ``matrix`` (vocab, dim), compiled with the masked loss
    and a built optimizer; call it inside the strategy's scope."""
    model = build_model(params.model, params.train, vocab_size, matrix.shape[1])
    model((train.features[:1], train.token_ids[:1, :-1]))
    model.set_embedding_matrix(matrix)
    model.compile(
        optimizer=keras.optimizers.Adam(params.train.learning_rate), loss=masked_loss, metrics=[masked_accuracy]
    )
    # Resuming loads optimizer variables, which Keras only restores into a built optimizer.
    model.optimizer.build(model.trainable_variables)
    return model


def _fingerprint(params: Params, train: SplitData, val: SplitData, matrix: np.ndarray) -> str:
    """Hash of everything that determines the training run, so a checkpoint is reused only for the same run."""
    digest = hashlib.sha256()
    settings = params.train.model_dump(exclude={"resume"})
    digest.update(json.dumps({"model": params.model, "train": settings}, sort_keys=True).encode())
    for array in (train.features, train.token_ids, val.features, val.token_ids, matrix):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _start_state(model: ReportGenerator, store: CheckpointStore, params: Params, fingerprint: str) -> TrainingState:
    state = store.load_state(fingerprint) if params.train.resume else None
    if state is None:
        return TrainingState(fingerprint=fingerprint)
    store.restore(model, state)
    state.resumed_at_epoch = state.epochs_done
    logger.info("train: resuming %s after epoch %d from %s", params.model, state.epochs_done, store.directory)
    return state


def _fit(
    model: ReportGenerator,
    train: SplitData,
    val: SplitData,
    params: Params,
    store: CheckpointStore,
    state: TrainingState,
    plots_dir: Path,
) -> None:
    """Run the remaining epochs one ``fit`` call at a time, checkpointing after each."""
    settings = params.train
    logger.info("train: model %s on %d studies, validating on %d", params.model, len(train), len(val))
    batches = TrainingBatches(train, settings.batch_size, settings.seed)
    val_batches = teacher_forcing_dataset(val, settings.batch_size, shuffle=False, seed=settings.seed)

    while state.epochs_done < settings.epochs and not state.stopped_early:
        start = time.perf_counter()
        history = model.fit(
            batches.epoch(state.epochs_done), validation_data=val_batches, epochs=1, shuffle=False, verbose=0
        )
        logs = {name: values[-1] for name, values in history.history.items()}
        logs["seconds"] = time.perf_counter() - start
        _require_finite_loss(logs, state.epochs_done + 1, settings.learning_rate)
        improved = state.record(logs, settings.patience)
        store.save(model, state)
        _write_learning_curve(state, plots_dir)
        logger.info(
            "train: epoch %d/%d loss %.4f val_loss %.4f%s (%.1f s)",
            state.epochs_done, settings.epochs, logs["loss"], logs["val_loss"], " best" if improved else "", logs["seconds"],
        )
    if state.stopped_early:
        logger.info("train: stopped early after epoch %d; best epoch %d", state.epochs_done, state.best_epoch)


def _require_finite_loss(logs: dict[str, float], epoch: int, learning_rate: float) -> None:
    """Raise NonFiniteLossError when the epoch's loss or val_loss is NaN or infinite."""
    losses = {name: float(logs[name]) for name in ("loss", "val_loss")}
    if all(np.isfinite(value) for value in losses.values()):
        return
    values = ", ".join(f"{name} {value}" for name, value in losses.items())
    raise NonFiniteLossError(
        f"epoch {epoch}: loss is NaN or inf ({values}); training stopped and the checkpoint of the last "
        "finite epoch is kept. Check data/text/embeddings.npy and features/chexnet.h5 for NaN or infinite "
        f"values, and try a lower train.learning_rate (now {learning_rate})"
    )


def _write_learning_curve(state: TrainingState, plots_dir: Path) -> None:
    curve = pd.DataFrame({"epoch": range(1, state.epochs_done + 1), **state.history})
    with atomic_path(plots_dir / "learning_curve.csv") as temporary:
        curve.to_csv(temporary, index=False, float_format="%.6f")


def _save(model: ReportGenerator, model_dir: Path, params: Params, features_path: Path) -> None:
    with atomic_path(model_dir / "model.keras") as temporary:
        model.save(temporary)
    with h5py.File(features_path, "r") as store:
        feature_attrs = {key: _plain(value) for key, value in store.attrs.items()}
    info = {
        "model": params.model,
        "feature_kind": type(model).feature_kind,
        "hyperparameters": getattr(params.train, params.model).model_dump(),
        "features": feature_attrs,
    }
    write_text(model_dir / "model.json", json.dumps(info, indent=2) + "\n")
    logger.info("train: saved %s", model_dir / "model.keras")


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _write_summary(state: TrainingState, params: Params, metrics_dir: Path) -> None:
    best = state.best_epoch - 1
    seconds = sum(state.history["seconds"])
    summary = {
        "model": params.model,
        "epochs_run": state.epochs_done,
        "best_epoch": state.best_epoch,
        "best_val_loss": round(state.best_val_loss, 6),
        "train_loss_at_best": round(state.history["loss"][best], 6),
        "resumed_at_epoch": state.resumed_at_epoch,
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / state.epochs_done, 2),
    }
    write_text(metrics_dir / "train.json", json.dumps(summary, indent=2) + "\n")


class ModelFileError(PipelineError, ValueError):
    """A saved model file that exists but cannot be loaded: empty, truncated or not a Keras archive."""


def load_model(path: Path) -> ReportGenerator:
    """Load a model saved by this stage; raise ModelFileError naming the file when it is unreadable."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: model not found; run the train stage first (dvc repro train)")
    fix = "restore it with `dvc checkout models/model.keras` or retrain it with `dvc repro train`"
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a .keras archive (a zip file); it is empty or truncated, so {fix}")
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split())[:200]
        raise ModelFileError(f"{path}: cannot load the model ({type(error).__name__}: {reason}); {fix}") from None
