"""The constant-report and nearest-neighbour baselines."""

import json

import numpy as np
import pytest

from pipeline.baselines import (
    choose_constant_report,
    copied_share,
    distinct_reports,
    most_frequent_reports,
    nearest_neighbour_reports,
)
from pipeline.metrics import coco_bleu_scores
from pipeline.text import clean_report


def test_constant_report_chosen_on_validation():
    common = "heart size is normal ."
    rarer = "no pneumothorax or pleural effusion . the lungs are clear ."
    train = [common] * 5 + [rarer] * 3 + ["mild cardiomegaly ."]
    val = [rarer, "no pneumothorax or pleural effusion . the lungs are clear bilaterally ."]
    assert most_frequent_reports(train, 2) == [(common, 5), (rarer, 3)]
    report, bleu4 = choose_constant_report(train, val, candidates=2)
    assert report == rarer
    assert bleu4 > 0.5
    assert choose_constant_report(train, val, candidates=1)[0] == common


def test_constant_report_needs_reports():
    with pytest.raises(ValueError, match="needs training and validation reports"):
        choose_constant_report(["a ."], [], candidates=3)


def test_nearest_neighbour_uses_cosine():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(4, 2, 8)).astype(np.float16)
    texts = ["report a .", "report b .", "report c .", "report d ."]
    # Scaled and slightly perturbed copies of training studies 2 and 0.
    queries = np.stack([train[2] * 5, train[0] * 0.1]).astype(np.float32) + rng.normal(0, 1e-3, (2, 2, 8))
    assert nearest_neighbour_reports(train, texts, queries, chunk=1) == ["report c .", "report a ."]


def test_nearest_neighbour_rejects_mismatch():
    with pytest.raises(ValueError, match="3 training feature rows but 2"):
        nearest_neighbour_reports(np.zeros((3, 2, 4)), ["a", "b"], np.zeros((1, 2, 4)))


def test_copied_share_and_distinct():
    train = ["no pneumothorax .", "mild cardiomegaly ."]
    predictions = ["no pneumothorax .", "no pneumothorax .", "no effusion .", "mild cardiomegaly ."]
    assert copied_share(predictions, train) == 0.75
    assert distinct_reports(predictions) == 3
    assert copied_share([], train) == 0.0


def test_constant_report_on_r2gen_split(shared_data):
    # The R2Gen split with findings-only reports: the best frequent training report gives
    # test BLEU-4 about 0.157, close to the 0.165 that R2Gen published.
    annotation = json.loads((shared_data / "r2gen" / "annotation.json").read_text())
    texts = {split: [clean_report(study["report"]) for study in studies] for split, studies in annotation.items()}
    report, _ = choose_constant_report(texts["train"], texts["val"], candidates=20)
    references = [text.split() for text in texts["test"]]
    bleu4 = coco_bleu_scores(references, [report.split()] * len(references))["bleu4"]
    assert bleu4 == pytest.approx(0.157, abs=0.005)
