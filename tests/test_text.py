"""Report cleaning keeps negations and short words, and is idempotent."""

import pytest

from pipeline.text import clean_report, join_sections, report_words


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("No pneumothorax.", "no pneumothorax ."),
        ("Heart size is normal. No effusion", "heart size is normal . no effusion ."),
        ("There is no focal consolidation; lungs are clear.", "there is no focal consolidation . lungs are clear ."),
        ("1. No acute disease. 2. Stable nodule.", "no acute disease . stable nodule ."),
        ("XXXX XXXX are normal. XXXX-year-old", "are normal . year old ."),
        ("Nodule of 2.5 cm.", "nodule of 2 5 cm ."),
        ("Opacity at T-10, not seen before!", "opacity at t 10 not seen before ."),
        ("Élargissement médiastinal", "elargissement mediastinal ."),
        ("", ""),
        (None, ""),
        (". . .", ""),
    ],
)
def test_clean_report_cases(raw, cleaned):
    assert clean_report(raw) == cleaned


def test_clean_report_keeps_short_words():
    words = report_words("It is not in or at the base of the lung. No.")
    for short in ("it", "is", "not", "in", "or", "at", "of", "no"):
        assert short in words


def test_clean_report_idempotent():
    text = "1. XXXX PA and lateral: no  acute   cardiopulmonary abnormality... 2) Heart is normal"
    once = clean_report(text)
    assert clean_report(once) == once


def test_join_sections_skips_missing():
    sections = {"findings": "Lungs clear.", "impression": None, "indication": "  "}
    assert join_sections(sections, ["findings", "impression", "indication"]) == "Lungs clear."
    assert join_sections(sections, ["impression"]) == ""
