"""`dvc repro` from download to scores on a mirror of 20 real Open-I studies.

The project is copied into a temporary git repository, so the test runs what a user
gets from a clone: dvc.yaml, params.yaml, the stage entry points and the package.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from dvc_project import command as _command
from dvc_project import make_project

pytestmark = pytest.mark.slow

STUDIES_IN_MIRROR = 20
MODEL_NAMES = ("simple", "attention", "spatial", "bigru", "transformer")
# Small sizes keep each experiment to seconds; the models' own tests cover their behaviour.
TINY_MODELS = [
    "train.attention.units=16", "train.attention.attention_units=8",
    "train.spatial.units=16", "train.spatial.attention_units=8",
    "train.bigru.units=16",
    "train.transformer.units=16", "train.transformer.heads=2", "train.transformer.layers=1",
    "train.transformer.feed_forward_units=32",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    settings = ["featurize.weights=random", "train.epochs=3", "train.simple.units=32", *TINY_MODELS]
    project = make_project(root, shared_data, STUDIES_IN_MIRROR, settings)
    _command(["dvc", "repro"], project)
    return project


def test_extract_tables(project):
    reports = pd.read_parquet(project / "data/interim/reports.parquet")
    images = pd.read_parquet(project / "data/interim/images.parquet")
    studies = pd.read_parquet(project / "data/interim/studies.parquet")
    splits = pd.read_parquet(project / "data/interim/splits.parquet")
    assert len(reports) == 3955
    assert {"findings", "impression", "indication", "comparison", "mesh_major", "image_ids"} <= set(reports.columns)
    assert len(images) == 7470
    assert images["exists"].sum() == 2 * STUDIES_IN_MIRROR
    assert STUDIES_IN_MIRROR - 2 <= len(studies) <= STUDIES_IN_MIRROR + 1
    assert all(len(pair) == 2 for pair in studies["view_image_ids"])
    assert set(splits["split"]) == {"train", "val", "test"}
    exclusions = pd.read_csv(project / "data/interim/exclusions.csv")
    assert exclusions["rule"].tolist()[0] == "all_reports"


def test_feature_store(project):
    studies = pd.read_parquet(project / "data/interim/studies.parquet")
    with h5py.File(project / "features/chexnet.h5", "r") as store:
        count = len(store["study_id"])
        assert count == len(studies)
        assert store["pooled"].shape == (count, 2, 1024)
        assert store["spatial"].shape == (count, 98, 1024)
        assert store.attrs["weights"] == "random"
        assert store.attrs["random_weights"]
        assert store.attrs["standin_images"]
        assert np.isfinite(store["spatial"][:]).all()
    assert list((project / "features/cache").glob("*/shards/*.h5"))


def test_text_artifacts(project):
    tokenizer = json.loads((project / "data/text/tokenizer.json").read_text())
    embeddings = np.load(project / "data/text/embeddings.npy")
    assert embeddings.shape == (len(tokenizer["tokens"]), 50)
    assert embeddings.dtype == np.float32
    assert "no" in tokenizer["tokens"]
    coverage = json.loads((project / "data/text/glove_coverage.json").read_text())
    assert 0.5 < coverage["vocabulary_coverage"] <= 1.0


def test_scores_and_predictions(project):
    scores = json.loads((project / "metrics/scores.json").read_text())
    predictions = pd.read_parquet(project / "metrics/predictions.parquet")
    systems = ("greedy", "beam", "baseline_constant", "baseline_nearest")
    for system in systems:
        assert {"bleu1", "bleu4", "meteor", "rouge_l", "cider", "chexpert_f1_micro", "distinct_reports"} <= set(scores[system])
    assert scores["beam"]["ms_per_report"] > 0
    assert isinstance(scores["beats_baselines"], bool)
    assert "bleu4" in scores["beam_minus_best_baseline"]
    assert scores["random_weights"] is True
    assert scores["standin_images"] is True
    assert len(scores["warnings"]) >= 2
    assert len(predictions) == scores["studies"] > 0
    assert {"study_id", "reference", *systems, "labels_reference", "labels_beam"} <= set(predictions.columns)
    plot = pd.read_csv(project / "plots/chexpert_f1.csv")
    assert len(plot) == 14
    assert (project / "metrics/chexpert.json").is_file()
    assert (project / "models/model.keras").is_file()
    state = json.loads((project / "models/checkpoints/state.json").read_text())
    assert state["complete"] is True
    assert state["epochs_done"] == 3
    curve = pd.read_csv(project / "plots/learning_curve.csv")
    assert curve["epoch"].tolist() == [1, 2, 3]


def test_repro_again_is_up_to_date(project):
    status = _command(["dvc", "status"], project)
    assert "up to date" in status.stdout


PLOT_FILES = ("images_per_report.csv", "report_words.csv", "learning_curve.csv", "chexpert_f1.csv")


def test_plots_show_each_plot_once(project):
    shown = json.loads(_command(["dvc", "plots", "show", "--json"], project).stdout)
    assert not shown.get("errors")
    for name in PLOT_FILES:
        drawn = [plot_id for plot_id in shown["data"] if plot_id.endswith(f"plots/{name}")]
        assert len(drawn) == 1, f"{name} is drawn as {drawn}"
    assert len(shown["data"]) == len(PLOT_FILES), sorted(shown["data"])
    curve = shown["data"]["plots/learning_curve.csv"][0]
    assert len(curve["content"]["data"]["values"]) >= 3


def test_forced_featurize_reuses_cache(project):
    before = (project / "features/chexnet.h5").read_bytes()
    result = _command(["dvc", "repro", "-f", "-s", "featurize"], project)
    assert "0 to compute" in result.stdout + result.stderr
    assert (project / "features/chexnet.h5").read_bytes() == before
    assert "up to date" in _command(["dvc", "status"], project).stdout


def test_experiment_run_with_model_param(project):
    _command(["dvc", "exp", "run", "-S", "model=simple", "-S", "train.epochs=2"], project)
    shown = json.loads(_command(["dvc", "exp", "show", "--json"], project).stdout)
    assert any(
        experiment.get("experiments") for experiment in shown
    ), "dvc exp show lists no experiment after dvc exp run"
    table = _command(["dvc", "exp", "show", "--csv", "--no-pager"], project).stdout
    assert "beats_baselines" in table
    assert "baseline_constant.bleu4" in table


def _experiments(shown: list[dict]) -> list[dict]:
    """The ``data`` entries of every experiment in ``dvc exp show --json`` output."""
    found = []
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            found.extend(rev["data"] for rev in experiment.get("revs", []) if rev.get("data"))
    return found


def test_every_model_trains_and_scores_as_experiment(project):
    for name in MODEL_NAMES[1:]:
        _command(["dvc", "exp", "run", "-S", f"model={name}", "-S", "train.epochs=1"], project)
        scores = json.loads((project / "metrics/scores.json").read_text())
        assert scores["model"] == name
    shown = json.loads(_command(["dvc", "exp", "show", "--json"], project).stdout)

    scored = {}
    for data in _experiments(shown):
        model = data["params"]["params.yaml"]["data"]["model"]
        scored[model] = data["metrics"]["metrics/scores.json"]["data"]
    assert set(scored) == set(MODEL_NAMES), f"dvc exp show lists scores for {sorted(scored)}"
    for name, scores in scored.items():
        for system in ("greedy", "beam"):
            assert {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "chexpert_f1_micro"} <= set(scores[system]), name
            assert 0.0 <= scores[system]["bleu1"] <= 1.0, name
        assert "beats_baselines" in scores, name


def _experiment_names(project: Path) -> dict[str, str]:
    """Map each model to the name of an experiment that trained it."""
    shown = json.loads(_command(["dvc", "exp", "show", "--json"], project).stdout)
    names = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs", []):
                if rev.get("data") and rev.get("name"):
                    names[rev["data"]["params"]["params.yaml"]["data"]["model"]] = rev["name"]
    return names


def _study_images(project: Path, row: int) -> tuple[list[Path], np.ndarray]:
    with h5py.File(project / "features/chexnet.h5", "r") as store:
        image_ids = [value.decode() for value in store["image_ids"][row]]
        spatial = store["spatial"][row]
    return [project / "data/raw/images" / f"{image_id}.png" for image_id in image_ids], spatial


def test_predict_features_equal_stage_features(project):
    from pipeline.image_features import radiograph_study_features
    from pipeline.predict import load_predictor

    predictor = load_predictor(project)
    paths, stored = _study_images(project, 0)
    features, _ = radiograph_study_features(predictor.extractor, paths, predictor.max_pixels, "spatial")
    # Both pad every batch to featurize.batch_size with the same extractor, so the bits agree.
    np.testing.assert_array_equal(features, stored)


def test_predict_from_workspace_and_experiment(project, shared_data, tmp_path):
    names = _experiment_names(project)
    for model in {"spatial", "simple"} - set(names):
        _command(["dvc", "exp", "run", "-S", f"model={model}", "-S", "train.epochs=1"], project)
    names = _experiment_names(project)
    workspace_model = json.loads((project / "models/model.json").read_text())["model"]
    if workspace_model == "spatial":
        _command(["dvc", "exp", "run", "-S", "model=simple", "-S", "train.epochs=1"], project)
        workspace_model = "simple"
    image = sorted((shared_data / "nih-cxr-sample").glob("*.png"))[0]
    tracked = {name: (project / name).read_bytes() for name in ("params.yaml", "dvc.lock", "models/model.json")}

    cli = [sys.executable, "-m", "pipeline.cli", "predict", str(image), "--json"]
    from_workspace = json.loads(_command(cli, project).stdout)
    maps = tmp_path / "maps"
    result = _command([*cli, "--experiment", names["spatial"], "--attention", str(maps)], project)
    from_experiment = json.loads(result.stdout)

    assert from_workspace["model"] == workspace_model
    assert from_experiment["model"] == "spatial"
    assert "WARNING: RANDOM WEIGHTS" in result.stderr
    assert len(list(maps.glob("*.png"))) == len(from_experiment["tokens"])
    assert {name: (project / name).read_bytes() for name in tracked} == tracked, "the workspace must not change"

    simple = _command([*cli, "--experiment", names["simple"], "--attention", str(maps)], project, check=False)
    assert simple.returncode != 0
    assert f"experiment {names['simple']!r}: models/model.json: the simple model has no attention" in simple.stderr
    assert "cxrgen-experiment-" not in simple.stderr


def test_score_gallery(project):
    gallery = project / "metrics/gallery"
    page = (gallery / "index.html").read_text()
    scores = json.loads((project / "metrics/scores.json").read_text())
    assert page.count("<section") == min(8, scores["studies"])
    assert len(list(gallery.glob("*/view-1.png"))) == page.count("<section")
    assert "RANDOM WEIGHTS" in page
    if scores["model"] in ("attention", "spatial", "transformer"):
        assert list(gallery.glob("*/01_*.png"))


@pytest.fixture
def restore_params(project):
    """Put params.yaml back after a failed experiment has left its change in the workspace."""
    saved = (project / "params.yaml").read_text()
    yield
    (project / "params.yaml").write_text(saved)


def test_appended_unknown_key_stops_experiment(project, restore_params):
    # DVC refuses "-S train.epoch=2" itself but adds the key when it is written "+train.epoch=2".
    result = _command(["dvc", "exp", "run", "-S", "+train.epoch=2"], project, check=False)
    assert result.returncode != 0
    assert "did you mean 'epochs'" in result.stdout + result.stderr


def test_unknown_model_stops_experiment(project, restore_params):
    result = _command(["dvc", "exp", "run", "-S", "model=simpel"], project, check=False)
    assert result.returncode != 0
    assert "valid models: simple, attention, spatial, bigru, transformer" in result.stdout + result.stderr
