"""Small trained artifacts laid out as a DVC workspace, for prediction and web page tests.

Real NIH radiographs go through the featurize stage with random DenseNet-121 weights at
224 px. A small ``spatial`` model then trains on those features and the synthetic reports
of ``synthetic.py``. The workspace contains what ``cxrgen predict`` reads: models/model.keras,
models/model.json and data/text/tokenizer.json, plus the feature store and the images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from synthetic import SPLITS, STUDIES, make_workspace, raw_params

from pipeline import featurize, tokenize, trainer
from pipeline.config import FeaturizeParams, TrainParams, parse_params
from pipeline.models import build_model
from pipeline.tokenizer import START_ID, Tokenizer

IMAGE_SIZE = 224  # 7x7 DenseNet cells per view, as in the pipeline's default
SINGLE_VIEW_STUDIES = 4  # the first studies use one radiograph for both views
SPATIAL_TRAIN = {"epochs": 20, "batch_size": 8, "learning_rate": 0.01, "patience": 20,
                 "spatial": {"units": 16, "attention_units": 8, "dropout": 0.0}}


def build_workspace(root: Path, nih_images: Path) -> Path:
    """Featurize NIH radiographs, tokenize the synthetic reports and train a spatial model under ``root``."""
    work = root / "work"
    work.mkdir(parents=True)
    make_workspace(work)
    images = root / "data" / "raw" / "images"
    _write_studies(work / "studies.parquet", images, nih_images)
    (work / "manifest.json").write_text(json.dumps({"standin_images": True}))
    featurize.run(FeaturizeParams(weights="random", image_size=IMAGE_SIZE, batch_size=16),
                  work / "studies.parquet", images, work / "manifest.json", root / "features" / "chexnet.h5")

    params = parse_params({**raw_params(work, SPATIAL_TRAIN), "model": "spatial"})
    tokenize.run(params.tokenize, work / "interim" / "reports.parquet", work / "interim" / "splits.parquet",
                 root / "data" / "text")
    trainer.run(params, root / "features" / "chexnet.h5", root / "data" / "text", root / "models",
                work / "metrics", work / "plots")
    return root


def _write_studies(path: Path, images: Path, nih_images: Path) -> None:
    """Link two NIH radiographs per synthetic study into ``images`` and list them as its views."""
    images.mkdir(parents=True)
    sources = sorted(nih_images.glob("*.png"))[: 2 * STUDIES]
    for source in sources:
        (images / source.name).symlink_to(source)
    view_ids = [[sources[2 * row].stem, sources[2 * row + (row >= SINGLE_VIEW_STUDIES)].stem] for row in range(STUDIES)]
    study_ids = [f"CXR{row}_IM-{row:04d}" for row in range(STUDIES)]
    assert len(SPLITS) == STUDIES
    pd.DataFrame({"study_id": study_ids, "report_id": range(STUDIES), "view_image_ids": view_ids}).to_parquet(path)


def save_untrained(root: Path, trained: Path, model: str, settings: dict) -> Path:
    """Lay out ``trained``'s tokenizer and model.json under ``root`` with an untrained ``model``."""
    shutil.copytree(trained / "data" / "text", root / "data" / "text")
    tokenizer = Tokenizer.load(root / "data" / "text" / "tokenizer.json")
    keras.utils.set_random_seed(0)
    generator = build_model(model, TrainParams.model_validate({model: settings}), tokenizer.vocab_size, 8)
    regions = 2 if type(generator).feature_kind == "pooled" else 2 * (IMAGE_SIZE // 32) ** 2
    generator((np.zeros((1, regions, 1024), np.float32), np.full((1, 4), START_ID, np.int32)))
    (root / "models").mkdir(parents=True)
    generator.save(root / "models" / "model.keras")
    info = json.loads((trained / "models" / "model.json").read_text())
    (root / "models" / "model.json").write_text(json.dumps({**info, "model": model, "feature_kind": type(generator).feature_kind}))
    return root
