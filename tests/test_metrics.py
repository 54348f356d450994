"""BLEU over word tokens and rejection of plain strings."""

import pytest

from pipeline.metrics import corpus_bleu_scores


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
