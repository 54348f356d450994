"""HDF5 writes through pipeline.hdf5io: normal files, and a clean OSError when a write fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO_ROOT

from pipeline.hdf5io import open_for_writing


def test_write_then_append_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "features.h5"
    values = np.arange(2 * 1024, dtype=np.float16).reshape(2, 1024)

    with open_for_writing(path, "w", track_order=True) as store:
        store.create_dataset("pooled", data=values, chunks=(1, 1024))
    with open_for_writing(path, "a") as store:
        store.attrs["weights"] = "random"

    with h5py.File(path, "r") as store:
        np.testing.assert_array_equal(store["pooled"][:], values)
        assert store.attrs["weights"] == "random"


def test_read_mode_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'w' or 'a'"), open_for_writing(tmp_path / "x.h5", "r"):
        pass


def test_failed_write_raises_oserror(tmp_path: Path) -> None:
    # A file size limit makes the OS refuse writes past 16 KiB, as a full disk does.
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        from pipeline.hdf5io import open_for_writing

        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
        try:
            with open_for_writing({str(tmp_path / "big.h5")!r}, "w") as store:
                dataset = store.create_dataset("x", (64, 1024), "float32", chunks=(1, 1024))
                for row in range(64):
                    dataset[row] = np.ones(1024)
        except OSError as error:
            print("OSError", error.errno)
    """)

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["OSError", "27"]
