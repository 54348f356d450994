"""Shared test set-up: quiet, deterministic TensorFlow and paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# TensorFlow fixes its thread pools at the first op, so this must run before any test.
tf.config.threading.set_intra_op_parallelism_threads(os.cpu_count() or 2)
tf.config.threading.set_inter_op_parallelism_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXRGEN_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only shared data folder (../shared/data beside the checkout)."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.fail(f"shared data not found at {data}; put the shared folder beside the checkout or set CXRGEN_SHARED")
    return data


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory, shared_data) -> Path:
    """A workspace with a small trained spatial model on random-weights features of NIH radiographs."""
    from trained_artifacts import build_workspace

    return build_workspace(tmp_path_factory.mktemp("trained"), shared_data / "nih-cxr-sample")


@pytest.fixture(scope="session")
def predictor(trained_workspace):
    """The trained workspace's predictor, loaded once."""
    from pipeline.predict import load_predictor

    return load_predictor(trained_workspace)
