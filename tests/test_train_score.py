"""Tokenize, train and score on a small synthetic corpus whose features predict the report."""

import json

import numpy as np
import pandas as pd
import pytest
from synthetic import make_workspace, tokenized

from pipeline import score, trainer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    make_workspace(root)
    return root


@pytest.fixture(scope="module")
def trained(workspace):
    train = {"epochs": 40, "batch_size": 8, "learning_rate": 0.01, "patience": 40, "simple": {"units": 32, "dropout": 0.0}}
    params = tokenized(workspace, train)
    trainer.run(params, workspace / "chexnet.h5", workspace / "text", workspace / "models", workspace / "metrics", workspace / "plots")
    return params


def test_tokenize_outputs(workspace, trained):
    targets = pd.read_parquet(workspace / "text" / "targets.parquet")
    assert len(targets) == 40
    assert targets.loc[0, "text"].startswith("no pneumothorax .")
    assert np.load(workspace / "text" / "embeddings.npy").shape[1] == 8
    coverage = json.loads((workspace / "text" / "glove_coverage.json").read_text())
    assert coverage["vocabulary_coverage"] == 1.0


def test_training_learns_and_saves(workspace, trained):
    summary = json.loads((workspace / "metrics" / "train.json").read_text())
    curve = pd.read_csv(workspace / "plots" / "learning_curve.csv")
    assert summary["best_val_loss"] < curve["val_loss"].iloc[0] / 4
    assert (workspace / "models" / "model.keras").is_file()
    assert json.loads((workspace / "models" / "model.json").read_text())["features"]["random_weights"] is True


@pytest.fixture(scope="module")
def scores(workspace, trained):
    return score.run(trained, workspace / "chexnet.h5", workspace / "text", workspace / "models", workspace / "metrics",
                     workspace / "images")


def test_score_recovers_reports(workspace, scores):
    assert scores["studies"] == 6
    assert scores["greedy"]["bleu4"] > 0.9
    assert scores["random_weights"] is True
    assert any("RANDOM WEIGHTS" in warning for warning in scores["warnings"])
    predictions = pd.read_parquet(workspace / "metrics" / "predictions.parquet")
    assert list(predictions.columns) == ["study_id", "reference", "prediction"]
    assert (predictions["reference"] == predictions["prediction"]).all()


def test_score_writes_gallery(workspace, scores):
    predictions = pd.read_parquet(workspace / "metrics" / "predictions.parquet")
    page = (workspace / "metrics" / "gallery" / "index.html").read_text()
    assert page.count("<section") == 6
    for study_id, prediction in zip(predictions["study_id"], predictions["prediction"], strict=True):
        assert f"<dt>Greedy</dt><dd>{prediction}</dd>" in page, study_id
    assert "RANDOM WEIGHTS" in page
    assert "The simple model has no attention" in page
