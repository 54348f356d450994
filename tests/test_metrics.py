"""Text metrics over word tokens, rejection of plain strings, and CheXpert label scores."""

import json
import random

import numpy as np
import pytest

from pipeline.labeler import OBSERVATIONS
from pipeline.metrics import CaptionScorer, MetricsError, clinical_scores, coco_bleu_scores, corpus_bleu_scores
from pipeline.text import report_words


def test_identical_reports_score_one():
    words = "no pneumothorax or pleural effusion .".split()
    scores = corpus_bleu_scores([words], [words])
    assert scores == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0})


def test_word_level_not_character_level():
    reference = "no pneumothorax .".split()
    hypothesis = "pneumothorax no .".split()
    scores = corpus_bleu_scores([reference], [hypothesis])
    assert scores["bleu1"] == pytest.approx(1.0)
    assert scores["bleu2"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("references", "hypotheses"),
    [
        (["no effusion ."], [["no", "effusion", "."]]),
        ([["no", "effusion", "."]], ["no effusion ."]),
        ("no effusion .", [["no"]]),
    ],
)
def test_strings_are_rejected(references, hypotheses):
    with pytest.raises(TypeError, match="split reports into words first"):
        corpus_bleu_scores(references, hypotheses)


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="1 references but 2 hypotheses"):
        corpus_bleu_scores([["a"]], [["a"], ["b"]])


@pytest.fixture(scope="module")
def r2gen_reports(shared_data):
    annotation = json.loads((shared_data / "r2gen" / "annotation.json").read_text())
    return {split: [report_words(study["report"]) for study in studies] for split, studies in annotation.items()}


@pytest.fixture(scope="module")
def caption_scorer():
    with CaptionScorer() as scorer:
        yield scorer


def test_coco_bleu_equals_nltk_on_real_reports(r2gen_reports):
    references = r2gen_reports["val"]
    hypotheses = list(references)
    random.Random(0).shuffle(hypotheses)
    coco = coco_bleu_scores(references, hypotheses)
    nltk = corpus_bleu_scores(references, hypotheses)
    assert 0.05 < coco["bleu4"] < 0.5
    assert coco == pytest.approx(nltk, abs=1e-6)


def test_caption_scorer_identical_reports(caption_scorer):
    words = [["no", "pneumothorax", "."], ["mild", "cardiomegaly", ".", "no", "effusion", "."]]
    scores = caption_scorer.score(words, words)
    for name in ("bleu1", "bleu4", "meteor", "rouge_l"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert scores["cider"] > 1.0


def test_caption_scorer_empty_and_wrong_reports(caption_scorer):
    references = [["no", "pneumothorax", "."], ["mild", "cardiomegaly", "."]]
    scores = caption_scorer.score(references, [[], ["large", "effusion"]])
    assert scores["bleu1"] == pytest.approx(0.0, abs=1e-6)
    assert scores["meteor"] == pytest.approx(0.0, abs=1e-6)
    assert scores["rouge_l"] == 0.0
    assert scores["cider"] == 0.0


def test_caption_scorer_rejects_strings(caption_scorer):
    with pytest.raises(TypeError, match="split reports into words first"):
        caption_scorer.score(["no effusion ."], [["no", "effusion", "."]])


def test_caption_scorer_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MetricsError, match="java not found"):
        CaptionScorer()


def labels(*rows):
    table = np.full((len(rows), len(OBSERVATIONS)), np.nan, np.float32)
    for row, values in enumerate(rows):
        for name, value in values.items():
            table[row, OBSERVATIONS.index(name)] = value
    return table


def test_clinical_scores_counts_only_positive():
    reference = labels({"Cardiomegaly": 1}, {"Cardiomegaly": 1, "Edema": 1}, {"Edema": 0}, {"Fracture": -1})
    predicted = labels({"Cardiomegaly": 1}, {"Cardiomegaly": -1, "Edema": 1}, {"Edema": 1}, {"Fracture": -1})
    scores = clinical_scores(reference, predicted)
    cardiomegaly = scores["per_observation"]["Cardiomegaly"]
    assert (cardiomegaly["precision"], cardiomegaly["recall"], cardiomegaly["support"]) == (1.0, 0.5, 2)
    assert cardiomegaly["f1"] == pytest.approx(2 / 3)
    assert scores["per_observation"]["Edema"]["precision"] == 0.5
    assert scores["per_observation"]["Fracture"]["support"] == 0
    # Micro: TP 2 (cardiomegaly, edema), FP 1 (edema), FN 1 (cardiomegaly).
    assert scores["precision_micro"] == pytest.approx(2 / 3)
    assert scores["recall_micro"] == pytest.approx(2 / 3)
    # Cardiomegaly and Edema are both among the five competition observations.
    assert scores["f1_micro_5"] == pytest.approx(2 / 3)
    # Macro: the two observations present in some reference.
    assert scores["observations_in_macro"] == 2
    assert scores["f1_macro"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_clinical_scores_five_ignore_no_finding():
    reference = labels({"No Finding": 1}, {"Cardiomegaly": 1})
    predicted = labels({"No Finding": 1}, {"No Finding": 1})
    scores = clinical_scores(reference, predicted)
    # No Finding: one true positive, one false positive; Cardiomegaly: one false negative.
    assert scores["f1_micro"] == pytest.approx(0.5)
    assert scores["f1_micro_5"] == 0.0


def test_clinical_scores_rejects_wrong_shape():
    with pytest.raises(ValueError, match="must both be"):
        clinical_scores(np.zeros((2, 14)), np.zeros((3, 14)))
