"""Text metrics computed over word tokens, never over characters."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nltk.translate.bleu_score import corpus_bleu

BLEU_WEIGHTS = {
    "bleu1": (1.0, 0.0, 0.0, 0.0),
    "bleu2": (0.5, 0.5, 0.0, 0.0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3, 0.0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}


def require_token_lists(name: str, reports: Sequence) -> None:
    """Raise TypeError unless ``reports`` is a sequence of word lists.

    A plain string passed to NLTK is scored character by character, which inflates BLEU.
    """
    if isinstance(reports, str):
        raise TypeError(f"{name}: expected a list of token lists, got one string; split reports into words first")
    for position, report in enumerate(reports):
        if isinstance(report, str) or not all(isinstance(word, str) for word in report):
            raise TypeError(
                f"{name}[{position}]: expected a list of word strings, got {type(report).__name__}; "
                "split reports into words first"
            )


def corpus_bleu_scores(references: Sequence[list[str]], hypotheses: Sequence[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (NLTK, one reference per study, no smoothing) over word tokens."""
    require_token_lists("references", references)
    require_token_lists("hypotheses", hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("cannot score an empty set of reports")
    wrapped = [[reference] for reference in references]
    with warnings.catch_warnings():
        # NLTK warns whenever an n-gram order has no match; a score of 0 says the same.
        warnings.simplefilter("ignore", UserWarning)
        return {
            name: float(corpus_bleu(wrapped, list(hypotheses), weights=weights))
            for name, weights in BLEU_WEIGHTS.items()
        }
