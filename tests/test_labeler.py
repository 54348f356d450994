"""The rule-based CheXpert labeler on hand-written report sentences."""

import math

import numpy as np
import pytest

from pipeline.labeler import OBSERVATIONS, label_report, label_reports

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0

CASES = [
    ("No pneumothorax.", {"Pneumothorax": NEGATIVE, "No Finding": POSITIVE}),
    ("No evidence of effusion.", {"Pleural Effusion": NEGATIVE}),
    ("Possible consolidation.", {"Consolidation": UNCERTAIN}),
    ("Heart size is normal.", {"Cardiomegaly": NEGATIVE}),
    ("Mild cardiomegaly.", {"Cardiomegaly": POSITIVE}),
    ("No pneumothorax or pleural effusion.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": NEGATIVE}),
    ("The heart is enlarged.", {"Cardiomegaly": POSITIVE}),
    ("The heart is normal in size.", {"Cardiomegaly": NEGATIVE}),
    ("The heart size and pulmonary vascularity appear within normal limits.", {"Cardiomegaly": NEGATIVE}),
    ("Heart size is upper limits of normal.", {"Cardiomegaly": UNCERTAIN}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": UNCERTAIN}),
    ("Stable mild cardiomegaly.", {"Cardiomegaly": POSITIVE}),
    ("No change in mild cardiomegaly.", {"Cardiomegaly": POSITIVE}),
    ("The cardiomediastinal silhouette is within normal limits.", {"Enlarged Cardiomediastinum": NEGATIVE}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": POSITIVE}),
    ("Pneumothorax is not seen.", {"Pneumothorax": NEGATIVE}),
    ("Small right pneumothorax.", {"Pneumothorax": POSITIVE}),
    ("Cannot exclude pneumonia.", {"Pneumonia": UNCERTAIN}),
    ("A small left effusion is not excluded.", {"Pleural Effusion": UNCERTAIN}),
    ("Atelectasis versus pneumonia.", {"Atelectasis": UNCERTAIN, "Pneumonia": UNCERTAIN}),
    ("Left basilar opacity may represent atelectasis.", {"Lung Opacity": POSITIVE, "Atelectasis": UNCERTAIN}),
    ("No pneumothorax, but there is a small pleural effusion.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE}),
    ("The lungs are clear without focal airspace disease, pleural effusion or pneumothorax.",
     {"Lung Opacity": NEGATIVE, "Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}),
    ("Costophrenic angles are sharp.", {"Pleural Effusion": NEGATIVE}),
    ("No pericardial effusion.", {"Pleural Effusion": math.nan}),
    ("Calcified granuloma from prior granulomatous infection.", {"Pneumonia": math.nan, "No Finding": POSITIVE}),
    ("Right upper lobe nodule.", {"Lung Lesion": POSITIVE}),
    ("Pulmonary vascular congestion.", {"Edema": POSITIVE}),
    ("Healed left rib fractures.", {"Fracture": POSITIVE}),
    ("Biapical pleural thickening.", {"Pleural Other": POSITIVE}),
    ("Left chest pacemaker with leads in the right ventricle.", {"Support Devices": POSITIVE, "No Finding": POSITIVE}),
    ("Right IJ central venous catheter tip in the SVC. Mild edema.", {"Support Devices": POSITIVE, "Edema": POSITIVE}),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[text for text, _ in CASES])
def test_sentence_labels(text, expected):
    labels = label_report(text)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(labels[name]), name
        else:
            assert labels[name] == value, name


def test_no_finding_absent_when_something_positive_or_uncertain():
    assert math.isnan(label_report("Mild cardiomegaly. No effusion.")["No Finding"])
    assert math.isnan(label_report("Possible consolidation.")["No Finding"])
    assert label_report("No acute cardiopulmonary abnormality.")["No Finding"] == POSITIVE


def test_sentences_are_labelled_separately():
    labels = label_report("No pneumothorax. Large right pleural effusion.")
    assert labels["Pneumothorax"] == NEGATIVE
    assert labels["Pleural Effusion"] == POSITIVE


def test_positive_mention_wins_over_negative():
    labels = label_report("No left effusion. Small right pleural effusion.")
    assert labels["Pleural Effusion"] == POSITIVE


def test_unmentioned_observations_are_nan():
    labels = label_report("No pneumothorax.")
    assert [name for name, value in labels.items() if not math.isnan(value)] == ["No Finding", "Pneumothorax"]


def test_empty_report_has_no_labels():
    assert all(math.isnan(value) for value in label_report("").values())
    assert all(math.isnan(value) for value in label_report(None).values())


def test_raw_and_cleaned_text_agree():
    raw = "Heart size is normal. No XXXX pneumothorax; mild cardiomegaly?"
    assert label_report(raw) == pytest.approx(label_report("heart size is normal . no pneumothorax . mild cardiomegaly ."), nan_ok=True)


def test_label_reports_array():
    table = label_reports(["Mild cardiomegaly.", "No pneumothorax."])
    assert table.shape == (2, len(OBSERVATIONS))
    assert table.dtype == np.float32
    assert table[0, OBSERVATIONS.index("Cardiomegaly")] == POSITIVE
    assert table[1, OBSERVATIONS.index("Pneumothorax")] == NEGATIVE
    assert label_reports([]).shape == (0, len(OBSERVATIONS))
