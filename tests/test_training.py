"""Training mechanics: early stopping, per-epoch checkpoints, resuming after SIGKILL, and
the mirrored strategy over two logical CPU devices."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT
from synthetic import make_workspace, raw_params, tokenized

from pipeline import trainer
from pipeline.checkpoints import CheckpointStore, TrainingState
from pipeline.dataset import SplitData, TrainingBatches

# Runs the train stage in a fresh process: argv[1] is JSON with root, out, params and
# optionally logical_cpus, the number of logical CPU devices to create first.
TRAIN_SCRIPT = """
import json, sys
from pathlib import Path
import tensorflow as tf
config = json.loads(sys.argv[1])
if config.get("logical_cpus"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * config["logical_cpus"])
from pipeline import trainer
from pipeline.config import parse_params
from pipeline.logs import setup_logging
setup_logging()
root, out = Path(config["root"]), Path(config["out"])
trainer.run(parse_params(config["params"]), root / "chexnet.h5", root / "text", out / "models", out / "metrics", out / "plots")
"""
RESUME_TRAIN = {
    "epochs": 12, "batch_size": 8, "learning_rate": 0.003, "patience": 12,
    "attention": {"units": 16, "attention_units": 8, "dropout": 0.3},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training")
    make_workspace(root)
    tokenized(root, {})
    return root


def _start(workspace: Path, out: Path, train: dict, model: str, logical_cpus: int = 0) -> subprocess.Popen:
    config = {
        "root": str(workspace), "out": str(out), "logical_cpus": logical_cpus,
        "params": {**raw_params(workspace, train), "model": model},
    }
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, json.dumps(config)],
        cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _epochs_done(state_path: Path) -> int:
    try:
        return json.loads(state_path.read_text())["epochs_done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_after_epoch(process: subprocess.Popen, state_path: Path, epoch: int) -> None:
    while process.poll() is None:
        if _epochs_done(state_path) >= epoch:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            return
        time.sleep(0.005)
    pytest.fail(f"training finished before epoch {epoch} could be interrupted; raise epochs in RESUME_TRAIN")


def test_killed_run_resumes_to_same_result(workspace, tmp_path):
    uninterrupted = _start(workspace, tmp_path / "whole", RESUME_TRAIN, "attention")
    _finish(uninterrupted)

    interrupted = _start(workspace, tmp_path / "killed", RESUME_TRAIN, "attention")
    state_path = tmp_path / "killed" / "models" / "checkpoints" / "state.json"
    _kill_after_epoch(interrupted, state_path, 2)
    killed_at = _epochs_done(state_path)
    assert not (tmp_path / "killed" / "models" / "model.keras").exists()
    assert 2 <= killed_at < RESUME_TRAIN["epochs"]

    output = _finish(_start(workspace, tmp_path / "killed", RESUME_TRAIN, "attention"))
    assert f"resuming attention after epoch {killed_at}" in output
    summary = json.loads((tmp_path / "killed" / "metrics" / "train.json").read_text())
    assert summary["resumed_at_epoch"] == killed_at
    assert summary["epochs_run"] == RESUME_TRAIN["epochs"]

    whole = pd.read_csv(tmp_path / "whole" / "plots" / "learning_curve.csv")
    resumed = pd.read_csv(tmp_path / "killed" / "plots" / "learning_curve.csv")
    assert resumed["epoch"].tolist() == whole["epoch"].tolist()
    np.testing.assert_allclose(resumed["loss"], whole["loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed["val_loss"], whole["val_loss"], rtol=1e-5)
    expected = trainer.load_model(tmp_path / "whole" / "models" / "model.keras").get_weights()
    actual = trainer.load_model(tmp_path / "killed" / "models" / "model.keras").get_weights()
    for left, right in zip(actual, expected, strict=True):
        np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6)


def test_mirrored_strategy_uses_two_devices(workspace, tmp_path):
    train = {"epochs": 2, "batch_size": 8, "strategy": "mirrored", "simple": {"units": 16}}
    output = _finish(_start(workspace, tmp_path, train, "simple", logical_cpus=2))
    assert "mirrored strategy over 2 devices" in output
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert summary["epochs_run"] == 2
    assert math.isfinite(summary["best_val_loss"])
    assert (tmp_path / "models" / "model.keras").is_file()


def test_early_stopping_counts_like_keras():
    state = TrainingState(fingerprint="f")
    for loss in (3.0, 2.0, 2.5, 2.1):
        state.record({"loss": 1.0, "val_loss": loss}, patience=2)
    assert state.best_epoch == 2
    assert state.best_val_loss == 2.0
    assert state.wait == 2
    assert state.stopped_early


def test_checkpoint_of_other_run_is_ignored(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    store = CheckpointStore(tmp_path)
    state = TrainingState(fingerprint="run-a")
    state.record({"loss": 1.0, "val_loss": 1.0}, patience=3)
    store.save(model, state)

    assert store.load_state("run-a").epochs_done == 1
    assert store.load_state("run-b") is None
    store.mark_complete(state)
    assert store.load_state("run-a") is None


def _strict_json(text: str):
    """Parse JSON as the standard defines it, rejecting NaN, Infinity and -Infinity."""

    def reject(constant: str):
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(text, parse_constant=reject)


def test_state_json_is_strict_without_finite_val_loss(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    store = CheckpointStore(tmp_path)
    state = TrainingState(fingerprint="run")
    state.record({"loss": math.nan, "val_loss": math.inf}, patience=5)
    store.save(model, state)

    written = _strict_json((tmp_path / "state.json").read_text())
    assert written["best_val_loss"] is None
    assert written["history"]["loss"] == [None]
    assert store.load_state("run").best_val_loss == math.inf

    store.mark_complete(TrainingState(fingerprint="run"))
    assert _strict_json((tmp_path / "state.json").read_text())["best_val_loss"] is None


def test_checkpoint_keeps_last_and_best_epochs(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    store = CheckpointStore(tmp_path)
    state = TrainingState(fingerprint="run")
    for loss in (2.0, 1.0, 1.5, 1.8):
        state.record({"loss": 1.0, "val_loss": loss}, patience=5)
        store.save(model, state)
    assert sorted(path.name for path in tmp_path.glob("*.weights.h5")) == ["epoch-0002.weights.h5", "epoch-0004.weights.h5"]


def test_epoch_order_depends_only_on_seed_and_epoch():
    data = SplitData([f"s{i}" for i in range(10)], np.zeros((10, 2, 4), np.float16), np.zeros((10, 5), np.int32), [""] * 10)
    batches = TrainingBatches(data, batch_size=4, seed=7)
    again = TrainingBatches(data, batch_size=4, seed=7)
    assert sorted(batches.order(3)) == list(range(10))
    np.testing.assert_array_equal(batches.order(3), again.order(3))
    assert not np.array_equal(batches.order(3), batches.order(4))
    assert [len(inputs[0]) for inputs, _ in batches.epoch(0)] == [4, 4, 2]
