"""Text and clinical metrics, computed over word tokens, never over characters.

Text metrics are pycocoevalcap 1.2's MS-COCO caption scorers, which the evaluation code of IU
X-ray papers such as R2Gen (Chen et al. 2020) calls:

* BLEU-1..4 at corpus level: n-gram matches and lengths are summed over all studies before the
  ratios are taken, and the brevity penalty uses the closest reference length. Each n-gram
  precision is smoothed by 1e-15 / 1e-9, so a corpus with no 4-gram match gets a tiny positive
  BLEU-4 instead of exactly 0. With one reference per study this equals NLTK's ``corpus_bleu``
  without smoothing whenever every order has a match (``corpus_bleu_scores``, kept as a check).
* METEOR 1.5 (the Java jar that pycocoevalcap ships, run with ``-l en -norm``), ROUGE-L
  (LCS F-measure with beta 1.2, averaged over studies) and CIDEr-D (n = 1..4, sigma 6, document
  frequencies from the references being scored).

The reports are our cleaned, space-separated words: pycocoevalcap's PTB tokenizer is not run.

Clinical metrics compare CheXpert labels (``pipeline.labeler``) of references and predictions.
An observation counts as present only when its label is 1 (positive): uncertain (-1), negative
(0) and not mentioned (NaN) all count as absent.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence

import numpy as np
from nltk.translate.bleu_score import corpus_bleu

from pipeline.errors import PipelineError
from pipeline.labeler import OBSERVATIONS, POSITIVE

BLEU_WEIGHTS = {
    "bleu1": (1.0, 0.0, 0.0, 0.0),
    "bleu2": (0.5, 0.5, 0.0, 0.0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3, 0.0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}
TEXT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
# The five CheXpert competition observations; micro F1 over them ignores "No Finding", which a
# constant normal report gets right for most IU X-ray studies.
FIVE_OBSERVATIONS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


class MetricsError(PipelineError, RuntimeError):
    """A metric cannot be computed on this machine, e.g. METEOR without Java."""


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


def _check_pairs(references: Sequence[list[str]], hypotheses: Sequence[list[str]]) -> None:
    require_token_lists("references", references)
    require_token_lists("hypotheses", hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("cannot score an empty set of reports")


def corpus_bleu_scores(references: Sequence[list[str]], hypotheses: Sequence[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 (NLTK, one reference per study, no smoothing) over word tokens."""
    _check_pairs(references, hypotheses)
    wrapped = [[reference] for reference in references]
    with warnings.catch_warnings():
        # NLTK warns whenever an n-gram order has no match, and the score of 0 already shows it.
        warnings.simplefilter("ignore", UserWarning)
        return {
            name: float(corpus_bleu(wrapped, list(hypotheses), weights=weights))
            for name, weights in BLEU_WEIGHTS.items()
        }


def coco_bleu_scores(references: Sequence[list[str]], hypotheses: Sequence[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 as pycocoevalcap computes it, over word tokens."""
    from pycocoevalcap.bleu.bleu import Bleu

    references_by_id, hypotheses_by_id = _coco_inputs(references, hypotheses)
    scores, _ = Bleu(4).compute_score(references_by_id, hypotheses_by_id, verbose=0)
    return {f"bleu{order}": float(score) for order, score in enumerate(scores, start=1)}


def _coco_inputs(references, hypotheses) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """pycocoevalcap's input: {study index: [space-joined report]} for references and hypotheses."""
    _check_pairs(references, hypotheses)
    references_by_id = {index: [" ".join(words)] for index, words in enumerate(references)}
    hypotheses_by_id = {index: [" ".join(words)] for index, words in enumerate(hypotheses)}
    return references_by_id, hypotheses_by_id


class CaptionScorer:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D from pycocoevalcap over word tokens.

    METEOR runs in one Java process that starts with the scorer and serves every ``score``
    call, because loading its paraphrase table takes seconds. Close the scorer, or use it as
    a context manager, to stop the process.
    """

    def __init__(self) -> None:
        if shutil.which("java") is None:
            raise MetricsError(
                "java not found on PATH; METEOR runs the Java jar that pycocoevalcap ships. "
                "Install a Java runtime (Debian/Ubuntu: apt-get install default-jre-headless) and rerun"
            )
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()

    def score(self, references: Sequence[list[str]], hypotheses: Sequence[list[str]]) -> dict[str, float]:
        """Return {bleu1..bleu4, meteor, rouge_l, cider} for one hypothesis per reference."""
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        scores = coco_bleu_scores(references, hypotheses)
        references_by_id, hypotheses_by_id = _coco_inputs(references, hypotheses)
        scores["meteor"] = self._meteor_score(references_by_id, hypotheses_by_id)
        scores["rouge_l"] = float(Rouge().compute_score(references_by_id, hypotheses_by_id)[0])
        scores["cider"] = float(Cider().compute_score(references_by_id, hypotheses_by_id)[0])
        return scores

    def _meteor_score(self, references_by_id, hypotheses_by_id) -> float:
        try:
            return float(self._meteor.compute_score(references_by_id, hypotheses_by_id)[0])
        except (ValueError, OSError) as error:
            # pycocoevalcap leaves its lock held on errors, and its __del__ would wait for it forever.
            if self._meteor.lock.locked():
                self._meteor.lock.release()
            self.close()
            stderr = self._meteor.meteor_p.stderr.read().decode(errors="replace")[-2000:]
            raise MetricsError(f"METEOR (java) failed: {error}; its stderr ends with: {stderr}") from None

    def close(self) -> None:
        """Stop the METEOR Java process."""
        process = self._meteor.meteor_p
        if process.poll() is None:
            process.kill()
            process.wait()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def precision_recall_f1(true_positives: int, false_positives: int, false_negatives: int) -> tuple[float, float, float]:
    """Precision, recall and F1, each 0.0 where its denominator is 0."""
    predicted = true_positives + false_positives
    actual = true_positives + false_negatives
    precision = float(true_positives / predicted) if predicted else 0.0
    recall = float(true_positives / actual) if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def clinical_scores(reference_labels: np.ndarray, predicted_labels: np.ndarray) -> dict:
    """CheXpert precision, recall and F1 of predicted reports against their references.

    Both arrays are float (reports, 14) labels in ``OBSERVATIONS`` order; only 1 counts as
    present. Returns micro scores (counts summed over observations), the micro F1 over the
    five ``FIVE_OBSERVATIONS``, macro scores (the mean
    over the observations present in at least one reference, so that every system on the
    same studies is averaged over the same observations; false positives of the other
    observations count in the micro scores only) and ``per_observation`` {name: {precision,
    recall, f1, support}}, where support counts the references in which the observation is
    present.
    """
    if reference_labels.shape != predicted_labels.shape or reference_labels.shape[1:] != (len(OBSERVATIONS),):
        raise ValueError(f"label arrays must both be (reports, {len(OBSERVATIONS)}), got "
                         f"{reference_labels.shape} and {predicted_labels.shape}")
    actual = reference_labels == POSITIVE
    predicted = predicted_labels == POSITIVE
    true_positives = (actual & predicted).sum(axis=0)
    false_positives = (~actual & predicted).sum(axis=0)
    false_negatives = (actual & ~predicted).sum(axis=0)

    per_observation = {}
    for index, name in enumerate(OBSERVATIONS):
        precision, recall, f1 = precision_recall_f1(true_positives[index], false_positives[index], false_negatives[index])
        per_observation[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual[:, index].sum())}
    micro = precision_recall_f1(true_positives.sum(), false_positives.sum(), false_negatives.sum())
    five = [OBSERVATIONS.index(name) for name in FIVE_OBSERVATIONS]
    micro_five = precision_recall_f1(true_positives[five].sum(), false_positives[five].sum(), false_negatives[five].sum())
    observed = [per_observation[name] for index, name in enumerate(OBSERVATIONS) if actual[:, index].any()]
    return {
        "precision_micro": micro[0],
        "recall_micro": micro[1],
        "f1_micro": micro[2],
        "f1_micro_5": micro_five[2],
        "precision_macro": _mean([value["precision"] for value in observed]),
        "recall_macro": _mean([value["recall"] for value in observed]),
        "f1_macro": _mean([value["f1"] for value in observed]),
        "observations_in_macro": len(observed),
        "per_observation": per_observation,
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
