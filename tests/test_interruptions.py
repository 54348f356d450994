"""`kill -9` during each stage, and two `dvc repro` at once, on a mirror of 8 real studies.

Each stage runs under `dvc repro` in a temporary git repository. tests/faults/sitecustomize.py
pauses the stage's Python process at one atomic artifact rename (the earlier artifacts of
the stage already replaced, the next one complete in its temporary file), and the test
sends SIGKILL to that process from outside. A plain `dvc repro` must then finish and leave
DVC up to date with the same artifacts as the uninterrupted run. Besides the declared
outputs, only git-ignored temporaries of the killed process may remain: DVC restores some
outputs from its run cache without running the stage, and the stage's next run deletes them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT
from dvc_project import command, environment, make_project

pytestmark = pytest.mark.slow

STUDIES_IN_MIRROR = 8
SETTINGS = [
    "featurize.weights=random", "featurize.image_size=64", "train.epochs=1", "train.simple.units=16",
    "split.val_fraction=0.25", "split.test_fraction=0.25", "tokenize.min_count=1",
]
FAULTS = REPO_ROOT / "tests" / "faults"
PAUSE_TIMEOUT_S = 300
# Stages whose artifacts are byte-identical from run to run. The HDF5 features file records
# when its root group was written, and the model file when it was saved.
DETERMINISTIC_STAGES = ("download", "extract", "tokenize")
FEATURES = "features/chexnet.h5"
# The atomic rename to pause at: later than the first where the stage writes several artifacts.
PAUSE_AT = {"download": 2, "extract": 3, "featurize": 1, "tokenize": 2, "train": 2, "score": 2}


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("interruptions")
    project = make_project(root, shared_data, STUDIES_IN_MIRROR, SETTINGS)
    command(["dvc", "repro"], project)
    command(["git", "add", "-A"], project)
    command(["git", "commit", "-qm", "uninterrupted run"], project)
    return project


@pytest.fixture(scope="module")
def baseline(project, tmp_path_factory) -> dict:
    """The uninterrupted run's dvc.lock stages and a copy of its features file."""
    copy = tmp_path_factory.mktemp("baseline") / "chexnet.h5"
    copy.write_bytes((project / FEATURES).read_bytes())
    return {"lock": read_lock(project), "features": copy}


def read_lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))["stages"]


def output_hashes(lock: dict, stage: str) -> dict[str, str]:
    return {out["path"]: out.get("md5", "") for out in lock[stage].get("outs", [])}


def start_paused(project: Path, args: list[str], pause_dir: Path, pause_at: int) -> subprocess.Popen:
    """Start ``dvc args`` with the pause hook and return it once a stage process is paused."""
    pause_dir.mkdir(parents=True)
    extra = {"PYTHONPATH": str(FAULTS), "CXRGEN_TEST_PAUSE_DIR": str(pause_dir), "CXRGEN_TEST_PAUSE_AT": str(pause_at)}
    log = (pause_dir / "dvc.log").open("w")
    process = subprocess.Popen(["dvc", *args], cwd=project, env=environment(extra), stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    while not (pause_dir / "paused").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"dvc {' '.join(args)} did not pause:\n{(pause_dir / 'dvc.log').read_text()[-4000:]}")
        time.sleep(0.1)
    return process


def paused_pid(pause_dir: Path) -> int:
    return int((pause_dir / "paused").read_text().split()[0])


def stray_paths(project: Path, allowed: list[str]) -> list[str]:
    """Return the untracked or ignored paths that no stage declares, DVC's folder and ``allowed`` excepted."""
    declared = set()
    for definition in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for entry in definition.get("outs", []) + definition.get("metrics", []) + definition.get("plots", []):
            declared.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    listed = command(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], project).stdout
    paths = [line[3:].rstrip("/") for line in listed.splitlines() if line[:2] in ("??", "!!")]
    return [path for path in paths
            if not any(path == out or path.startswith(f"{out}/") for out in [*declared, *allowed])
            and not path.startswith(".dvc/") and "__pycache__" not in path]


def temporary_leftovers(project: Path) -> list[Path]:
    return [path for path in project.rglob("*")
            if ".git" not in path.parts and (".tmp" in path.name or path.name.endswith(".old"))]


def check_leftover(project: Path, path: Path) -> None:
    """Check that ``path`` is a git-ignored temporary of a writer that has exited."""
    match = re.search(r"\.(\d+)\.[^.]+\.tmp", path.name)
    assert match is not None, f"{path} is not a temporary of pipeline.atomic"
    with pytest.raises(ProcessLookupError):
        os.kill(int(match.group(1)), 0)
    command(["git", "check-ignore", "-q", str(path.relative_to(project))], project)


def check_recovered(project: Path, baseline: dict) -> None:
    status = command(["dvc", "status"], project)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    leftovers = temporary_leftovers(project)
    for path in leftovers:
        check_leftover(project, path)
    assert stray_paths(project, [str(path.relative_to(project)) for path in leftovers]) == []
    lock = read_lock(project)
    for stage in DETERMINISTIC_STAGES:
        assert output_hashes(lock, stage) == output_hashes(baseline["lock"], stage), stage
    check_same_features(project / FEATURES, baseline["features"])
    check_model_and_scores(project)


def check_same_features(path: Path, expected: Path) -> None:
    with h5py.File(path, "r") as store, h5py.File(expected, "r") as reference:
        assert list(store) == list(reference)
        for name in reference:
            np.testing.assert_array_equal(store[name][:], reference[name][:], err_msg=name)
        assert dict(store.attrs) == dict(reference.attrs)


def check_model_and_scores(project: Path) -> None:
    from pipeline.trainer import load_model

    load_model(project / "models" / "model.keras")
    scores = json.loads((project / "metrics" / "scores.json").read_text())
    predictions = pd.read_parquet(project / "metrics" / "predictions.parquet")
    assert scores["studies"] == len(predictions) > 0
    assert {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "chexpert_f1_micro"} <= set(scores["greedy"])


@pytest.mark.parametrize("stage", list(PAUSE_AT))
def test_kill_stage_then_repro(project, baseline, tmp_path, stage) -> None:
    pause_dir = tmp_path / "pause"
    process = start_paused(project, ["repro", "-f", "-s", stage], pause_dir, PAUSE_AT[stage])

    os.kill(paused_pid(pause_dir), signal.SIGKILL)
    returncode = process.wait(timeout=120)

    output = (pause_dir / "dvc.log").read_text()
    assert returncode != 0, output[-3000:]
    # -9 when DVC's shell execs the stage command, 137 (128 + SIGKILL) when the shell reports it.
    assert re.search(r"exited with (-9|137)\b", output), output[-3000:]
    command(["dvc", "repro"], project)
    check_recovered(project, baseline)


def test_second_repro_blocked_by_lock(project, baseline, tmp_path) -> None:
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = project / "features" / f".chexnet.h5.{int(exited.stdout)}.abc123.tmp.h5"
    stale.write_bytes(b"left by a killed run")
    pause_dir = tmp_path / "pause"
    first = start_paused(project, ["repro", "-f", "-s", "featurize"], pause_dir, 1)

    second = command(["dvc", "repro"], project, check=False)
    (pause_dir / "resume").touch()
    first_returncode = first.wait(timeout=300)

    assert second.returncode != 0
    assert "is busy, it is being blocked by" in second.stderr
    assert ".dvc/tmp/rwlock" in second.stderr
    assert first_returncode == 0, (pause_dir / "dvc.log").read_text()[-3000:]
    command(["dvc", "repro"], project)  # train and score, whose input features file was rewritten
    check_recovered(project, baseline)
    # featurize has run to the end, so it has deleted what killed earlier runs left beside its output.
    assert [path for path in temporary_leftovers(project) if path.parent.name == "features"] == []


def test_pause_hook_inactive_without_setting() -> None:
    result = subprocess.run([sys.executable, "-c", "import os, sitecustomize; print(os.replace.__module__)"],
                            env=environment({"PYTHONPATH": str(FAULTS)}), capture_output=True, text=True)
    assert result.stdout.strip() == "posix"
