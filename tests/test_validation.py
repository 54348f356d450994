"""Non-finite cached features and losses stop training and scoring with the cause named."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import score, tokenize, trainer
from pipeline.config import parse_params
from pipeline.errors import PipelineError
from pipeline.tokenizer import START_ID
from pipeline.validation import NonFiniteFeaturesError, require_finite

STUDIES = [f"CXR{i}_IM-{i:04d}" for i in range(12)]
SPLITS = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
WORDS = "no acute disease . heart size is normal . small effusion"


def test_finite_features_pass() -> None:
    require_finite(np.zeros((3, 2, 4), np.float16), ["a", "b", "c"], "features.h5")


def test_bad_rows_named_in_every_block() -> None:
    values = np.zeros((600, 2, 4), np.float32)
    values[5, 1, 2] = np.nan
    values[300, 0, 0] = np.inf
    values[599, 1, 3] = -np.inf
    ids = [f"S{row}" for row in range(600)]

    with pytest.raises(NonFiniteFeaturesError) as caught:
        require_finite(values, ids, "features/chexnet.h5")

    message = str(caught.value)
    assert message.startswith("features/chexnet.h5: the features of 3 studies")
    for study_id in ("S5,", "S300,", "S599."):
        assert study_id in message
    assert "dvc repro -f featurize" in message


def test_many_bad_rows_listed_briefly() -> None:
    values = np.full((25, 2), np.nan, np.float16)

    with pytest.raises(NonFiniteFeaturesError, match=r"S0, S1, .*S9 and 15 more"):
        require_finite(values, [f"S{row}" for row in range(25)], "f.h5")


def test_row_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="3 feature rows for 2 study ids"):
        require_finite(np.zeros((3, 2)), ["a", "b"], "f.h5")


def write_features(path: Path, poison: dict[str, float]) -> None:
    """Write pooled and spatial features for STUDIES, with ``poison`` values in the named studies."""
    rng = np.random.default_rng(0)
    pooled = rng.normal(0, 1, (len(STUDIES), 2, 1024)).astype(np.float16)
    for study_id, value in poison.items():
        pooled[STUDIES.index(study_id), 1, 7] = value
    with h5py.File(path, "w") as store:
        store["study_id"] = np.array(STUDIES, dtype=object).astype("S")
        store["pooled"] = pooled
        store["spatial"] = np.repeat(pooled, 49, axis=1)
        store.attrs.update({"weights": "random", "random_weights": True, "standin_images": False})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenised reports for STUDIES and a model trained on finite features."""
    root = tmp_path_factory.mktemp("nonfinite")
    (root / "interim").mkdir()
    pd.DataFrame({"report_id": range(len(STUDIES)), "findings": [WORDS] * len(STUDIES), "impression": None,
                  "indication": None, "comparison": None}).to_parquet(root / "interim" / "reports.parquet")
    pd.DataFrame({"study_id": STUDIES, "report_id": range(len(STUDIES)), "split": SPLITS}).to_parquet(
        root / "interim" / "splits.parquet"
    )
    glove = root / "glove.txt"
    glove.write_text("".join(f"{word} {index} 1 0 1\n" for index, word in enumerate(set(WORDS.split()))))
    params = small_params(glove)
    tokenize.run(params.tokenize, root / "interim" / "reports.parquet", root / "interim" / "splits.parquet", root / "text")
    write_features(root / "clean.h5", {})
    trainer.run(params, root / "clean.h5", root / "text", root / "models", root / "metrics", root / "plots")
    return root


def small_params(glove: Path):
    return parse_params({
        "tokenize": {"glove": str(glove), "max_length": 16, "min_count": 1},
        "train": {"epochs": 1, "batch_size": 4, "simple": {"units": 8}},
    })


@pytest.mark.parametrize(("study_id", "value"), [(STUDIES[2], np.nan), (STUDIES[7], np.inf)], ids=["nan_train", "inf_val"])
def test_training_stops_on_nonfinite(workspace: Path, study_id: str, value: float) -> None:
    features = workspace / f"poisoned-{study_id}.h5"
    write_features(features, {study_id: value})
    models = workspace / f"models-{study_id}"
    params = small_params(workspace / "glove.txt")

    with pytest.raises(NonFiniteFeaturesError) as caught:
        trainer.run(params, features, workspace / "text", models, workspace / "metrics", workspace / "plots")

    assert str(caught.value).startswith(f"{features}: the features of 1 studies")
    assert study_id in str(caught.value)
    assert not models.exists()


def test_scoring_stops_on_nonfinite(workspace: Path) -> None:
    features = workspace / "poisoned-test.h5"
    write_features(features, {STUDIES[10]: -np.inf})
    metrics = workspace / "score-metrics"

    with pytest.raises(NonFiniteFeaturesError, match=STUDIES[10]):
        score.run(small_params(workspace / "glove.txt"), features, workspace / "text", workspace / "models", metrics)

    assert not metrics.exists()


def test_training_stops_at_nonfinite_loss(workspace: Path) -> None:
    text = workspace / "text-nan-embedding"
    shutil.copytree(workspace / "text", text)
    matrix = np.load(text / "embeddings.npy")
    matrix[START_ID] = np.nan  # every decoder input starts with <start>, so the first epoch's loss is NaN
    np.save(text / "embeddings.npy", matrix)
    models = workspace / "models-nan-embedding"

    with pytest.raises(PipelineError) as caught:
        trainer.run(small_params(workspace / "glove.txt"), workspace / "clean.h5", text, models,
                    workspace / "metrics-nan", workspace / "plots-nan")

    message = str(caught.value)
    assert message.startswith("epoch 1: loss is NaN or inf")
    assert "embeddings.npy" in message
    assert "train.learning_rate" in message
    assert not (models / "checkpoints" / "state.json").exists()
    assert not (models / "model.keras").exists()
