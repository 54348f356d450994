"""The train stage: fit the model named by ``params.yaml`` ``model`` on cached features.

Early stopping watches the validation split; the test split is never read here.
Outputs: ``models/model.keras``, ``models/model.json`` (what the model was trained on),
``metrics/train.json`` and ``plots/learning_curve.csv``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path, write_text
from pipeline.config import Params
from pipeline.dataset import SplitData, load_split, teacher_forcing_dataset
from pipeline.errors import StageInputError
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
    """Train, keep the weights of the best validation epoch, and save the model."""
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
    model = build_model(params.model, params.train, tokenizer.vocab_size, matrix.shape[1])
    model((train.features[:1], train.token_ids[:1, :-1]))
    model.set_embedding_matrix(matrix)
    model.compile(
        optimizer=keras.optimizers.Adam(params.train.learning_rate), loss=masked_loss, metrics=[masked_accuracy]
    )

    history, seconds = _fit(model, train, val, params)
    _save(model, model_dir, params, features_path)
    _write_history(history, seconds, params, metrics_dir, plots_dir)


def _require_studies(data: SplitData, split: str, features_path: Path) -> None:
    if len(data) == 0:
        raise StageInputError(
            f"no {split} studies have both features ({features_path}) and report text; "
            "check split.val_fraction and that featurize and tokenize ran on the same studies"
        )


def _fit(model: ReportGenerator, train: SplitData, val: SplitData, params: Params) -> tuple[dict, float]:
    settings = params.train
    logger.info("train: model %s on %d studies, validating on %d", params.model, len(train), len(val))
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True)
    start = time.perf_counter()
    history = model.fit(
        teacher_forcing_dataset(train, settings.batch_size, shuffle=True, seed=settings.seed),
        validation_data=teacher_forcing_dataset(val, settings.batch_size, shuffle=False, seed=settings.seed),
        epochs=settings.epochs,
        callbacks=[stop],
        shuffle=False,  # the dataset shuffles itself, seeded
        verbose=2,
    )
    seconds = time.perf_counter() - start
    logger.info("train: %d epochs in %.1f s", len(history.history["loss"]), seconds)
    return history.history, seconds


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


def _write_history(history: dict, seconds: float, params: Params, metrics_dir: Path, plots_dir: Path) -> None:
    curve = pd.DataFrame({"epoch": range(1, len(history["loss"]) + 1), **history})
    with atomic_path(plots_dir / "learning_curve.csv") as temporary:
        curve.to_csv(temporary, index=False, float_format="%.6f")
    best = int(np.argmin(history["val_loss"]))
    summary = {
        "model": params.model,
        "epochs_run": len(history["loss"]),
        "best_epoch": best + 1,
        "best_val_loss": round(float(history["val_loss"][best]), 6),
        "train_loss_at_best": round(float(history["loss"][best]), 6),
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / len(history["loss"]), 2),
    }
    write_text(metrics_dir / "train.json", json.dumps(summary, indent=2) + "\n")


def load_model(path: Path) -> ReportGenerator:
    """Load a model saved by this stage."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: model not found; run the train stage first (dvc repro train)")
    return keras.models.load_model(path, compile=False)
