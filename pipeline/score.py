"""The score stage: generate reports for held-out studies and compute BLEU over words.

Outputs ``metrics/scores.json`` (declared as DVC metrics),
``metrics/predictions.parquet`` (study_id, reference, prediction) and ``metrics/gallery/``
(an HTML page of the first ``score.gallery_studies`` studies with their attention maps).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, write_text
from pipeline.backbone import RANDOM_WARNING
from pipeline.config import Params
from pipeline.dataset import load_split
from pipeline.decoding import greedy_decode
from pipeline.errors import StageInputError
from pipeline.gallery import score_gallery_studies, write_gallery
from pipeline.metrics import corpus_bleu_scores
from pipeline.tokenizer import Tokenizer
from pipeline.trainer import load_model

logger = logging.getLogger(__name__)

STANDIN_WARNING = "STAND-IN IMAGES: pixels do not show the reported studies; scores measure the text prior only"
PREDICTIONS_SCHEMA = pa.schema([("study_id", pa.string()), ("reference", pa.string()), ("prediction", pa.string())])


def run(
    params: Params,
    features_path: Path = Path("features/chexnet.h5"),
    text_dir: Path = Path("data/text"),
    model_dir: Path = Path("models"),
    metrics_dir: Path = Path("metrics"),
    images_dir: Path = Path("data/raw/images"),
) -> dict:
    """Decode every study of ``score.split`` greedily and write scores and predictions."""
    model = load_model(model_dir / "model.keras")
    tokenizer = Tokenizer.load(text_dir / "tokenizer.json")
    data = load_split(features_path, text_dir / "targets.parquet", params.score.split, type(model).feature_kind)
    if len(data) == 0:
        raise StageInputError(f"no {params.score.split} studies to score; check the split parameters")

    start = time.perf_counter()
    ids = greedy_decode(model, data.features, tokenizer.max_length - 1, params.score.batch_size)
    seconds = time.perf_counter() - start
    predictions = [tokenizer.decode(row) for row in ids]
    references = [text.split() for text in data.texts]

    scores = _scores(params, model_dir, data.study_ids, references, predictions, seconds)
    write_text(metrics_dir / "scores.json", json.dumps(scores, indent=2) + "\n")
    _write_predictions(metrics_dir / "predictions.parquet", data.study_ids, references, predictions)
    gallery = score_gallery_studies(model, tokenizer, data, features_path, images_dir, params.score.gallery_studies)
    write_gallery(metrics_dir / "gallery", gallery, params.model, params.score.split, scores["warnings"],
                  params.featurize.max_pixels)
    logger.info("score: %s", {name: round(value, 4) for name, value in scores["greedy"].items()})
    for warning in scores["warnings"]:
        logger.warning("score: %s", warning)
    return scores


def _scores(params, model_dir, study_ids, references, predictions, seconds) -> dict:
    info = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    features = info.get("features", {})
    warnings = []
    if features.get("random_weights"):
        warnings.append(RANDOM_WARNING)
    if features.get("standin_images"):
        warnings.append(STANDIN_WARNING)
    return {
        "model": params.model,
        "split": params.score.split,
        "studies": len(study_ids),
        "greedy": corpus_bleu_scores(references, predictions),
        "greedy_ms_per_report": round(1000 * seconds / max(len(study_ids), 1), 3),
        "weights": features.get("weights", "unknown"),
        "weights_sha256": features.get("weights_sha256", ""),
        "random_weights": bool(features.get("random_weights", False)),
        "standin_images": bool(features.get("standin_images", False)),
        "warnings": warnings,
    }


def _write_predictions(path: Path, study_ids, references, predictions) -> None:
    frame = pd.DataFrame(
        {
            "study_id": study_ids,
            "reference": [" ".join(words) for words in references],
            "prediction": [" ".join(words) for words in predictions],
        }
    )
    with atomic_path(path) as temporary:
        pq.write_table(pa.Table.from_pandas(frame, schema=PREDICTIONS_SCHEMA, preserve_index=False), temporary)
