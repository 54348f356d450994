"""The score stage: generate reports for held-out studies and score them next to two baselines.

Every system (greedy and beam-search decoding of the trained model, the constant-report and
nearest-neighbour baselines) is scored by the same code: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
from pycocoevalcap over words, and CheXpert label precision, recall and F1 from
``pipeline.labeler``. Outputs:

* ``metrics/scores.json`` (DVC metrics): one section per system, the beam's margin over the
  best baseline per metric and ``beats_baselines``;
* ``metrics/chexpert.json``: per-observation precision, recall, F1 and support per system;
* ``metrics/predictions.parquet``: per study, the reference, every system's report and the
  CheXpert labels of each;
* ``plots/chexpert_f1.csv``: per-observation F1 of every system.
* ``metrics/gallery/``: an HTML page of the first ``score.gallery_studies`` studies with both
  views, the reference, greedy and beam reports, their CheXpert labels and attention maps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import baselines
from pipeline.atomic import atomic_path, write_text
from pipeline.backbone import RANDOM_WARNING
from pipeline.config import Params
from pipeline.dataset import SplitData, load_split
from pipeline.decoding import Decoded, beam_search_decode, greedy_decode
from pipeline.errors import StageInputError
from pipeline.gallery import score_gallery_studies, write_gallery
from pipeline.labeler import OBSERVATIONS, label_report, label_reports
from pipeline.metrics import CaptionScorer, clinical_scores, corpus_bleu_scores
from pipeline.tokenizer import Tokenizer
from pipeline.trainer import load_model
from pipeline.validation import require_finite

logger = logging.getLogger(__name__)

STANDIN_WARNING = "STAND-IN IMAGES: pixels do not show the reported studies; scores measure the text prior only"
# The metrics on which the beam-search report is compared with the best baseline.
COMPARED_METRICS = (
    "bleu4", "meteor", "rouge_l", "cider", "chexpert_f1_micro", "chexpert_f1_micro_5", "chexpert_f1_macro",
)


@dataclass
class System:
    """One way of producing a report per study, and its scores."""

    name: str
    reports: list[str]
    extra: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    log_probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    clinical: dict = field(default_factory=dict)


def run(
    params: Params,
    features_path: Path = Path("features/chexnet.h5"),
    text_dir: Path = Path("data/text"),
    model_dir: Path = Path("models"),
    metrics_dir: Path = Path("metrics"),
    plots_dir: Path = Path("plots"),
    images_dir: Path = Path("data/raw/images"),
) -> dict:
    """Decode the ``score.split`` studies greedily and by beam search, score them and the baselines."""
    model = load_model(model_dir / "model.keras")
    tokenizer = Tokenizer.load(text_dir / "tokenizer.json")
    data = load_split(features_path, text_dir / "targets.parquet", params.score.split, type(model).feature_kind)
    if len(data) == 0:
        raise StageInputError(f"no {params.score.split} studies to score; check the split parameters")
    require_finite(data.features, data.study_ids, features_path)
    targets = pd.read_parquet(text_dir / "targets.parquet", columns=["study_id", "split", "text"])
    train_texts = targets.loc[targets["split"] == "train", "text"].tolist()

    systems = _model_systems(model, tokenizer, data, params)
    systems += _baseline_systems(params, features_path, text_dir, data, targets, model)
    references = [text.split() for text in data.texts]
    reference_labels = label_reports(data.texts)
    with CaptionScorer() as scorer:
        for system in systems:
            _score_system(system, scorer, references, reference_labels, train_texts)

    # The gallery renders images and may fail on one, so it is written first, and scores.json,
    # which dvc exp show reads, last: a failed run leaves no scores that look finished.
    scores = _summary(params, model_dir, data, systems)
    _write_gallery(metrics_dir / "gallery", params, model, tokenizer, data, features_path, images_dir, systems, scores)
    _write_predictions(metrics_dir / "predictions.parquet", data, reference_labels, systems)
    _write_f1_plot(plots_dir / "chexpert_f1.csv", systems, reference_labels)
    per_observation = {system.name: system.clinical["per_observation"] for system in systems}
    write_text(metrics_dir / "chexpert.json", json.dumps(per_observation, indent=2) + "\n")
    write_text(metrics_dir / "scores.json", json.dumps(scores, indent=2) + "\n")
    _log_summary(scores)
    return scores


def _write_gallery(out_dir, params, model, tokenizer, data, features_path, images_dir, systems, scores) -> None:
    """Write the HTML gallery with greedy attention, the beam report and CheXpert labels per study."""
    studies = score_gallery_studies(model, tokenizer, data, features_path, images_dir, params.score.gallery_studies)
    by_name = {system.name: system for system in systems}
    for row, study in enumerate(studies):
        study.beam = by_name["beam"].reports[row]
        study.labels = {
            "reference": _label_names(label_report(study.reference)),
            "greedy": _label_names(by_name["greedy"].labels[row]),
            "beam": _label_names(by_name["beam"].labels[row]),
        }
    write_gallery(out_dir, studies, params.model, params.score.split, scores["warnings"], params.featurize.max_pixels)


def _label_names(labels) -> dict[str, str]:
    """Map CheXpert labels (a dict by observation, or a row in OBSERVATIONS order) to words."""
    values = labels if isinstance(labels, dict) else dict(zip(OBSERVATIONS, labels, strict=True))
    words = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
    return {name: words[float(value)] for name, value in values.items() if value == value and value is not None}


def _model_systems(model, tokenizer: Tokenizer, data: SplitData, params: Params) -> list[System]:
    settings = params.score
    max_steps = tokenizer.max_length - 1
    greedy = greedy_decode(model, data.features, max_steps, settings.batch_size)
    beam = beam_search_decode(
        model, data.features, max_steps, settings.beam_width, settings.length_penalty, settings.batch_size
    )
    return [
        System("greedy", _texts(tokenizer, greedy), _decode_facts(greedy, len(data)), log_probs=greedy.log_probs),
        System(
            "beam",
            _texts(tokenizer, beam),
            {**_decode_facts(beam, len(data)), "beam_width": settings.beam_width, "length_penalty": settings.length_penalty},
            log_probs=beam.log_probs,
        ),
    ]


def _texts(tokenizer: Tokenizer, decoded: Decoded) -> list[str]:
    return [" ".join(tokenizer.decode(row)) for row in decoded.token_ids]


def _decode_facts(decoded: Decoded, studies: int) -> dict:
    logger.info("score: decoded %d studies in %.1f s, up to %d steps", studies, decoded.seconds, decoded.steps)
    return {"ms_per_report": round(1000 * decoded.seconds / studies, 3), "max_steps_run": decoded.steps}


def _baseline_systems(params: Params, features_path, text_dir, data: SplitData, targets, model) -> list[System]:
    val_texts = targets.loc[targets["split"] == "val", "text"].tolist()
    train_texts = targets.loc[targets["split"] == "train", "text"].tolist()
    constant, val_bleu4 = baselines.choose_constant_report(train_texts, val_texts, params.score.constant_candidates)
    logger.info("score: constant baseline report (val BLEU-4 %.4f): %s", val_bleu4, constant)

    train = load_split(features_path, text_dir / "targets.parquet", "train", "pooled")
    query = data.features if type(model).feature_kind == "pooled" else _pooled(features_path, text_dir, params)
    nearest = baselines.nearest_neighbour_reports(train.features, train.texts, query)
    return [
        System("baseline_constant", [constant] * len(data), {"val_bleu4": round(val_bleu4, 6)}),
        System("baseline_nearest", nearest),
    ]


def _pooled(features_path: Path, text_dir: Path, params: Params) -> np.ndarray:
    return load_split(features_path, text_dir / "targets.parquet", params.score.split, "pooled").features


def _score_system(system: System, scorer: CaptionScorer, references, reference_labels, train_texts) -> None:
    hypotheses = [text.split() for text in system.reports]
    text_scores = scorer.score(references, hypotheses)
    system.labels = label_reports(system.reports)
    system.clinical = clinical_scores(reference_labels, system.labels)
    system.scores = {
        **text_scores,
        "bleu4_nltk": corpus_bleu_scores(references, hypotheses)["bleu4"],
        "chexpert_precision_micro": system.clinical["precision_micro"],
        "chexpert_recall_micro": system.clinical["recall_micro"],
        "chexpert_f1_micro": system.clinical["f1_micro"],
        "chexpert_f1_micro_5": system.clinical["f1_micro_5"],
        "chexpert_f1_macro": system.clinical["f1_macro"],
    }
    system.scores = {name: round(float(value), 6) for name, value in system.scores.items()}
    system.scores["distinct_reports"] = baselines.distinct_reports(system.reports)
    system.scores["copied_training_share"] = round(baselines.copied_share(system.reports, train_texts), 6)
    system.scores.update(system.extra)


def _summary(params: Params, model_dir: Path, data: SplitData, systems: list[System]) -> dict:
    by_name = {system.name: system.scores for system in systems}
    margins = {
        metric: round(by_name["beam"][metric] - max(by_name["baseline_constant"][metric], by_name["baseline_nearest"][metric]), 6)
        for metric in COMPARED_METRICS
    }
    beats = all(margin > 0 for margin in margins.values())
    info = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    features = info.get("features", {})
    return {
        "model": params.model,
        "split": params.score.split,
        "studies": len(data),
        "beats_baselines": beats,
        "beam_minus_best_baseline": margins,
        **by_name,
        "weights": features.get("weights", "unknown"),
        "weights_sha256": features.get("weights_sha256", ""),
        "random_weights": bool(features.get("random_weights", False)),
        "standin_images": bool(features.get("standin_images", False)),
        "warnings": _warnings(params, features, margins),
    }


def _warnings(params: Params, features: dict, margins: dict) -> list[str]:
    warnings = []
    if features.get("random_weights"):
        warnings.append(RANDOM_WARNING)
    if features.get("standin_images"):
        warnings.append(STANDIN_WARNING)
    behind = [metric for metric, margin in margins.items() if margin <= 0]
    if behind:
        warnings.append(f"NO BETTER THAN A BASELINE: beam search does not beat the best baseline on {', '.join(behind)}")
    if params.score.split == "val":
        warnings.append("the constant-report baseline was chosen on the val split that is scored here")
    return warnings


def _write_predictions(path: Path, data: SplitData, reference_labels: np.ndarray, systems: list[System]) -> None:
    """Write one row per study: reports, log-probabilities and CheXpert labels (null: not mentioned)."""
    columns = {"study_id": pa.array(data.study_ids, pa.string()), "reference": pa.array(data.texts, pa.string())}
    for system in systems:
        columns[system.name] = pa.array(system.reports, pa.string())
    for system in systems:
        if system.log_probs is not None:
            columns[f"{system.name}_log_prob"] = pa.array(system.log_probs, pa.float32())
    columns["labels_reference"] = _label_struct(reference_labels)
    for system in systems:
        columns[f"labels_{system.name}"] = _label_struct(system.labels)
    with atomic_path(path) as temporary:
        pq.write_table(pa.table(columns), temporary)


def _label_struct(labels: np.ndarray) -> pa.StructArray:
    fields = [pa.array(labels[:, index], pa.float32(), from_pandas=True) for index in range(len(OBSERVATIONS))]
    return pa.StructArray.from_arrays(fields, names=list(OBSERVATIONS))


def _write_f1_plot(path: Path, systems: list[System], reference_labels: np.ndarray) -> None:
    table = pd.DataFrame({"observation": OBSERVATIONS, "support": (reference_labels == 1).sum(axis=0)})
    for system in systems:
        table[system.name] = [round(system.clinical["per_observation"][name]["f1"], 6) for name in OBSERVATIONS]
    with atomic_path(path) as temporary:
        table.to_csv(temporary, index=False)


def _log_summary(scores: dict) -> None:
    for name in ("greedy", "beam", "baseline_constant", "baseline_nearest"):
        headline = {metric: scores[name][metric] for metric in COMPARED_METRICS}
        logger.info("score: %s %s", name, headline)
    for warning in scores["warnings"]:
        logger.warning("score: %s", warning)
