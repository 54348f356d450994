"""Tokenize, train and score on a small synthetic corpus whose features predict the report."""

import json

import numpy as np
import pandas as pd
import pytest
from synthetic import make_workspace, tokenized

from pipeline import score, trainer
from pipeline.dataset import load_split
from pipeline.decoding import beam_search_decode, greedy_decode


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
def scored(workspace, trained):
    metrics_dir, plots_dir = workspace / "metrics", workspace / "plots"
    scores = score.run(
        trained, workspace / "chexnet.h5", workspace / "text", workspace / "models", metrics_dir, plots_dir,
        workspace / "images",
    )
    return scores, pd.read_parquet(metrics_dir / "predictions.parquet")


def test_score_recovers_reports(scored):
    scores, predictions = scored
    assert scores["studies"] == 6
    assert scores["greedy"]["bleu4"] > 0.9
    assert scores["beam"]["bleu4"] > 0.9
    assert (predictions["reference"] == predictions["greedy"]).all()
    assert (predictions["reference"] == predictions["beam"]).all()


def test_score_references_are_full_texts(workspace, scored):
    _, predictions = scored
    targets = pd.read_parquet(workspace / "text" / "targets.parquet").set_index("study_id")
    assert predictions["reference"].tolist() == targets.loc[predictions["study_id"], "text"].tolist()


def test_score_summary_keys(scored):
    scores, _ = scored
    metrics = {"bleu1", "bleu2", "bleu3", "bleu4", "bleu4_nltk", "meteor", "rouge_l", "cider",
               "chexpert_f1_micro", "chexpert_f1_micro_5", "chexpert_f1_macro", "distinct_reports",
               "copied_training_share"}
    for system in ("greedy", "beam", "baseline_constant", "baseline_nearest"):
        assert metrics <= set(scores[system]), system
    assert scores["beam"]["beam_width"] == 3
    assert scores["greedy"]["ms_per_report"] > 0
    assert set(scores["beam_minus_best_baseline"]) == set(score.COMPARED_METRICS)
    assert scores["random_weights"] is True
    assert any("RANDOM WEIGHTS" in warning for warning in scores["warnings"])


def test_score_baselines(scored):
    scores, predictions = scored
    # Half the training reports are each kind, so a constant report is right for half the studies.
    assert scores["baseline_constant"]["distinct_reports"] == 1
    assert scores["baseline_constant"]["copied_training_share"] == 1.0
    assert predictions["baseline_constant"].iloc[0] in set(predictions["reference"])
    # The features separate the two kinds, so the nearest training study has the same report.
    assert (predictions["baseline_nearest"] == predictions["reference"]).all()
    assert scores["baseline_nearest"]["bleu4"] == pytest.approx(1.0)
    assert scores["beam"]["bleu4"] > scores["baseline_constant"]["bleu4"]


def test_score_clinical_labels(workspace, scored):
    scores, predictions = scored
    cardiomegaly = [labels["Cardiomegaly"] for labels in predictions["labels_reference"]]
    assert set(cardiomegaly) == {0.0, 1.0}
    assert scores["beam"]["chexpert_f1_micro"] == pytest.approx(1.0)
    assert scores["baseline_constant"]["chexpert_f1_micro"] < 1.0
    plot = pd.read_csv(workspace / "plots" / "chexpert_f1.csv")
    assert plot.loc[plot["observation"] == "Cardiomegaly", "beam"].item() == pytest.approx(1.0)
    per_observation = json.loads((workspace / "metrics" / "chexpert.json").read_text())
    assert per_observation["beam"]["Pleural Effusion"]["support"] == 3


def test_trained_beam_width_one_equals_greedy(workspace, trained):
    model = trainer.load_model(workspace / "models" / "model.keras")
    data = load_split(workspace / "chexnet.h5", workspace / "text" / "targets.parquet", "test", "pooled")
    greedy = greedy_decode(model, data.features, max_steps=23)
    beam = beam_search_decode(model, data.features, max_steps=23, beam_width=1)
    np.testing.assert_array_equal(beam.token_ids, greedy.token_ids)
    np.testing.assert_allclose(beam.log_probs, greedy.log_probs, rtol=1e-4)


def test_score_writes_gallery(workspace, scored):
    _, predictions = scored
    page = (workspace / "metrics" / "gallery" / "index.html").read_text()
    assert page.count("<section") == 6
    for study_id, greedy, beam in zip(predictions["study_id"], predictions["greedy"], predictions["beam"], strict=True):
        assert f"<dt>Greedy</dt><dd>{greedy}</dd>" in page, study_id
        assert f"<dt>Beam search</dt><dd>{beam}</dd>" in page, study_id
    assert "RANDOM WEIGHTS" in page
    assert "The simple model has no attention" in page
    assert "Cardiomegaly" in page
