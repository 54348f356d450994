"""A small synthetic corpus whose features predict the report, for training tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from pipeline import tokenize
from pipeline.config import Params, parse_params

REPORTS = {
    0: ("No pneumothorax. Heart size is normal.", "No acute disease."),
    1: ("Mild cardiomegaly. Small left pleural effusion.", "Cardiomegaly with effusion."),
}
STUDIES = 40
SPLITS = ["train"] * 28 + ["val"] * 6 + ["test"] * 6


def make_workspace(root: Path) -> None:
    """Write interim/reports.parquet, interim/splits.parquet and chexnet.h5 under ``root``."""
    rng = np.random.default_rng(0)
    kinds = np.arange(STUDIES) % 2
    reports = pd.DataFrame(
        {
            "report_id": np.arange(STUDIES),
            "findings": [REPORTS[k][0] for k in kinds],
            "impression": [REPORTS[k][1] for k in kinds],
            "indication": None,
            "comparison": None,
        }
    )
    splits = pd.DataFrame(
        {"study_id": [f"CXR{i}_IM-{i:04d}" for i in range(STUDIES)], "report_id": np.arange(STUDIES), "split": SPLITS}
    )
    (root / "interim").mkdir(parents=True)
    reports.to_parquet(root / "interim" / "reports.parquet")
    splits.to_parquet(root / "interim" / "splits.parquet")
    _write_features(root / "chexnet.h5", splits["study_id"].tolist(), kinds, rng)


def _write_features(path: Path, study_ids: list[str], kinds: np.ndarray, rng: np.random.Generator) -> None:
    pooled = rng.normal(0, 0.01, (len(study_ids), 2, 1024)).astype(np.float16)
    pooled[:, :, :16] += (kinds[:, None, None] * 2 - 1).astype(np.float16)
    with h5py.File(path, "w") as store:
        store["study_id"] = np.array(study_ids, dtype=object).astype("S")
        store["pooled"] = pooled
        store["spatial"] = np.repeat(pooled, 49, axis=1)
        store.attrs.update({"weights": "random", "weights_sha256": "", "random_weights": True, "standin_images": False})


def raw_params(root: Path, train: dict) -> dict:
    """Params as a plain mapping: an 8-d GloVe file of the corpus words and the given train section."""
    glove = root / "glove.txt"
    words = "no pneumothorax heart size is normal . acute disease mild cardiomegaly small left pleural effusion with"
    glove.write_text("".join(f"{w} {' '.join(str((i + j) % 7 / 7) for j in range(8))}\n" for i, w in enumerate(words.split())))
    return {"tokenize": {"glove": str(glove), "max_length": 24, "min_count": 1}, "train": train}


def tokenized(root: Path, train: dict) -> Params:
    """Run the tokenize stage into ``root/text`` and return the params."""
    params = parse_params(raw_params(root, train))
    tokenize.run(params.tokenize, root / "interim" / "reports.parquet", root / "interim" / "splits.parquet", root / "text")
    return params
