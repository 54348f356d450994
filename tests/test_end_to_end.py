"""`dvc repro` from download to scores on a mirror of 20 real Open-I studies.

The project is copied into a temporary git repository, so the test runs what a user
gets from a clone: dvc.yaml, params.yaml, the stage entry points and the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

STUDIES_IN_MIRROR = 20


def _command(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    result = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def _copy_checkout(target: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith("tests/"):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    project, mirror = root / "project", root / "mirror"
    project.mkdir()
    _copy_checkout(project)
    _command(["git", "init", "-q"], project)
    _command(["git", "add", "-A"], project)
    _command(["git", "commit", "-qm", "clone"], project)
    _command([str(shared_data.parent / "tools" / "make-openi-mirror"), str(mirror), "--studies", str(STUDIES_IN_MIRROR)], root)
    _command(
        [sys.executable, "-m", "pipeline.cli", "params", "set", f"download.mirror={mirror}",
         "featurize.weights=random", "train.epochs=3", "train.simple.units=32"],
        project,
    )
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
    assert set(scores["greedy"]) == {"bleu1", "bleu2", "bleu3", "bleu4"}
    assert scores["random_weights"] is True
    assert scores["standin_images"] is True
    assert len(scores["warnings"]) == 2
    assert len(predictions) == scores["studies"] > 0
    assert list(predictions.columns) == ["study_id", "reference", "prediction"]
    assert (project / "models/model.keras").is_file()


def test_repro_again_is_up_to_date(project):
    status = _command(["dvc", "status"], project)
    assert "up to date" in status.stdout


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
    assert "valid models: simple" in result.stdout + result.stderr
