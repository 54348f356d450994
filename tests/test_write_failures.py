"""A write that fails (full disk, read-only folder) leaves the previous artifact byte-identical.

Each case runs a real stage through `cxrgen` in a child process. A file size limit
(RLIMIT_FSIZE) makes writes fail with EFBIG, as a full disk fails with ENOSPC, and a
folder without write permission makes creating the temporary file fail.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT
from PIL import Image
from test_extract import make_raw_tree

FILE_SIZE_LIMIT = 4096  # bytes, smaller than every artifact that the two stages write here
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
EXTRACT_OUTPUTS = ["reports.parquet", "images.parquet", "studies.parquet", "splits.parquet", "exclusions.csv"]


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def drop_root_file_access() -> None:
    """Make root obey file permissions in the child, as every other user does.

    Removing CAP_DAC_OVERRIDE from the bounding set takes effect at the child's exec.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_child(args: list[str], cwd: Path, limit: Callable[[], None]) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
        preexec_fn=limit,
    )


def make_read_only(folder: Path) -> None:
    folder.chmod(0o555)
    probe = run_child(["-c", f"open({str(folder / 'probe')!r}, 'w')"], folder, drop_root_file_access)
    if probe.returncode == 0:
        (folder / "probe").unlink()
        folder.chmod(0o755)
        pytest.skip("this user can write into a folder without write permission")


def write_previous(folder: Path, names: list[str]) -> dict[str, bytes]:
    """Write stand-in artifacts of an earlier run and return their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    previous = {name: f"previous {name}\n".encode() for name in names}
    for name, data in previous.items():
        (folder / name).write_bytes(data)
    return previous


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Bytes of the files directly in ``folder``; subfolders such as the feature cache are left out."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def check_failed_cleanly(result: subprocess.CompletedProcess, stage: str, reason: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"Error: {stage}: "), last
    assert reason in last, last


@pytest.fixture
def extract_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    secret = tmp_path / "secret.txt"
    secret.write_text("not used here")
    make_raw_tree(project / "data" / "raw", secret)
    shutil.copy(REPO_ROOT / "params.yaml", project / "params.yaml")
    return project


@pytest.fixture
def featurize_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    images = project / "data" / "raw" / "images"
    images.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (80, 96), dtype=np.uint8)
    for image_id in ("CXR1_IM-0001-1001", "CXR1_IM-0001-2001", "CXR2_IM-0002-1001"):
        Image.fromarray(pixels).save(images / f"{image_id}.png")
    interim = project / "data" / "interim"
    interim.mkdir(parents=True)
    pd.DataFrame({
        "study_id": ["CXR1_IM-0001", "CXR2_IM-0002"],
        "view_image_ids": [["CXR1_IM-0001-1001", "CXR1_IM-0001-2001"], ["CXR2_IM-0002-1001"] * 2],
    }).to_parquet(interim / "studies.parquet")
    (project / "data" / "raw" / "manifest.json").write_text(json.dumps({"standin_images": True}))
    shutil.copy(REPO_ROOT / "params.yaml", project / "params.yaml")
    settings = ["featurize.weights=random", "featurize.image_size=64", "featurize.storage_dtype=float32"]
    subprocess.run([sys.executable, "-m", "pipeline.cli", "params", "set", *settings], cwd=project, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True)
    return project


def test_extract_full_disk_keeps_previous(extract_project: Path) -> None:
    interim = extract_project / "data" / "interim"
    previous = write_previous(interim, EXTRACT_OUTPUTS)

    result = run_child(["-m", "pipeline.cli", "extract"], extract_project, limit_file_size)

    check_failed_cleanly(result, "extract", "File too large")
    assert "free disk space" in result.stderr
    assert folder_bytes(interim) == previous


def test_extract_read_only_keeps_previous(extract_project: Path) -> None:
    interim = extract_project / "data" / "interim"
    previous = write_previous(interim, EXTRACT_OUTPUTS)
    make_read_only(interim)

    result = run_child(["-m", "pipeline.cli", "extract"], extract_project, drop_root_file_access)
    interim.chmod(0o755)

    check_failed_cleanly(result, "extract", "Permission denied")
    assert "make the output folder writable" in result.stderr
    assert folder_bytes(interim) == previous


def test_featurize_full_disk_keeps_previous(featurize_project: Path) -> None:
    features = featurize_project / "features"
    previous = write_previous(features, ["chexnet.h5"])

    result = run_child(["-m", "pipeline.cli", "featurize"], featurize_project, limit_file_size)

    # The feature cache's SQLite index is the first write; SQLite reports the full disk as an I/O error.
    check_failed_cleanly(result, "featurize", "disk I/O error")
    assert "free disk space" in result.stderr
    assert folder_bytes(features) == previous


def test_featurize_read_only_keeps_previous(featurize_project: Path) -> None:
    features = featurize_project / "features"
    previous = write_previous(features, ["chexnet.h5"])
    make_read_only(features)

    result = run_child(["-m", "pipeline.cli", "featurize"], featurize_project, drop_root_file_access)
    features.chmod(0o755)

    check_failed_cleanly(result, "featurize", "Permission denied")
    assert folder_bytes(features) == previous
