"""A rule-based labeler for the 14 CheXpert observations, with NegEx-style negation and uncertainty.

The rules follow the design of the CheXpert labeler (Irvin et al. 2019): find mentions of each
observation in a sentence, then classify every mention as negated, uncertain or positive by cue
phrases around it. The mention and cue lists here are our own, written for the wording of
Open-I chest X-ray reports. They are smaller than CheXpert's, and no dependency parse is used.

Labels per observation: 1.0 positive, 0.0 negative, -1.0 uncertain, NaN not mentioned. A
report's label is positive if any mention is positive, else uncertain if any is uncertain, else
negative if any is negative. "No Finding" is 1.0 when no observation other than Support Devices
is positive or uncertain, and NaN otherwise. An empty report gets NaN everywhere.

Cue scope (as in NegEx, Chapman et al. 2001): a cue before a mention applies across at most
``PRE_WINDOW`` words, a cue after it across at most ``POST_WINDOW`` words, and neither crosses a
sentence end or a scope terminator such as "but" or "however". Cues are checked in the order
negated uncertainty ("cannot exclude", "not ruled out"), negation, uncertainty. Explicit normal
statements ("heart size is normal", "costophrenic angles are sharp") label their observation
negative directly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from pipeline.text import clean_report

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
PRE_WINDOW = 10
POST_WINDOW = 4

_IS = r"(?:is|are|appears?|appear to be|remains?|looks?|seems?)"
_NORMAL = r"(?:grossly |otherwise |overall |essentially |also )?(?:normal|within normal limits|unremarkable)"
_DEGREE = r"(?:(?:very |somewhat )?(?:mildly|mild|moderately|moderate|markedly|marked|severely|severe|slightly|massively|minimally|significantly) )?"
_HEART = r"(?:heart|heart size|cardiac silhouette|cardiac size|cardiac shadow|heart shadow)"
_MEDIASTINUM = r"(?:cardio ?mediastinal|mediastinal|cardiac and mediastinal|heart and mediastinal)\s(?:silhouettes?|contours?|structures|shadows?|borders?)"
_AND_MORE = r"(?: and (?:\w+ ){0,3}?\w+)?"


def _words(*patterns: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


MENTIONS: dict[str, re.Pattern] = {
    "Enlarged Cardiomediastinum": _words(
        r"(?:enlarged|widened|widening of the|prominent|enlargement of the) (?:cardio ?)?mediastin(?:um|al \w+)",
        r"mediastinal (?:widening|enlargement)",
        rf"{_MEDIASTINUM} {_IS}? ?{_DEGREE}(?:enlarged|widened|prominent)",
        rf"mediastinum {_IS}? ?{_DEGREE}(?:enlarged|widened)",
    ),
    "Cardiomegaly": _words(
        r"cardiomegaly",
        rf"{_DEGREE}(?:enlarged|large|enlargement of the) (?:heart|cardiac silhouette|cardiac shadow)",
        rf"{_HEART} {_IS}? ?(?:at the )?{_DEGREE}(?:enlarged|large|increased)",
        r"cardiac enlargement|heart enlargement",
        rf"{_HEART} {_IS}? ?(?:at the |at )?(?:upper limits? of normal|top normal|borderline)",
    ),
    "Lung Opacity": _words(
        r"opacit(?:y|ies)",
        r"opacification",
        r"infiltrat(?:e|es|ion|ive)",
        r"air ?space (?:disease|process)",
        r"(?:increased|patchy|hazy|ill defined|parenchymal) densit(?:y|ies)",
        r"interstitial (?:markings?|pattern|prominence|thickening|disease|process|changes)",
        r"reticular \w+|reticulation",
        r"(?<!pleural )(?<!pleural parenchymal )(?<!apical )scar(?:ring)?",
        r"peribronchial (?:thickening|cuffing)|bronchial wall thickening",
    ),
    "Lung Lesion": _words(
        r"nodules?|nodular (?:densit(?:y|ies)|opacit(?:y|ies)|opacification)",
        r"mass(?:es)?",
        r"(?:cavitary |pulmonary |lung )?lesions?",
        r"tumou?rs?|neoplasms?|carcinoma|malignancy|metasta(?:sis|ses|tic disease)",
    ),
    "Edema": _words(
        r"(?<!soft tissue )edema",
        r"(?:pulmonary|vascular|venous|interstitial) congestion",
        r"congestive heart failure|heart failure|chf",
        r"fluid overload|cephalization|kerley b? ?lines",
    ),
    "Consolidation": _words(r"consolidat(?:ion|ions|ive|ed)"),
    # Calcified granulomas are common sequelae of old infection, not pneumonia.
    "Pneumonia": _words(
        r"(?:broncho)?pneumonias?", r"pneumonitis",
        r"(?<!granulomatous )(?<!prior )(?<!old )(?<!remote )(?<!tuberculosis )infection",
        r"infectious (?:process|disease)",
    ),
    "Atelectasis": _words(r"atelecta(?:sis|ses|tic)", r"(?<!vertebral )(?<!body )(?<!compression )collapse"),
    "Pneumothorax": _words(r"(?:hydro)?pneumothora(?:x|ces)"),
    "Pleural Effusion": _words(
        r"(?<!pericardial )(?<!joint )effusions?",
        r"pleural fluid|fluid in the (?:\w+ )?(?:fissure|pleural space)",
        r"(?:blunting|blunted) (?:of )?(?:the )?(?:\w+ )?costophrenic",
        r"costophrenic (?:angle |sulcus )?blunting",
    ),
    "Pleural Other": _words(
        r"pleural (?:thickening|plaques?|calcifications?|scarring|scar|fibrosis|reaction)",
        r"pleural parenchymal (?:scarring|scar|thickening|opacit(?:y|ies))",
        r"fibrothorax",
        r"apical (?:pleural )?(?:thickening|capping|caps?|scarring)",
    ),
    "Fracture": _words(r"fractures?|fractured"),
    "Support Devices": _words(
        r"pacemakers?|pacer|defibrillators?|aicd|loop recorder",
        r"(?:central venous |venous |central |picc |dialysis |swan ganz |pulmonary artery )?catheters?",
        r"picc(?: line)?|port ?a ?cath|portacath|(?:chest|power|mediport) port",
        r"(?:chest|endotracheal|et|tracheostomy|nasogastric|ng|og|orogastric|feeding|enteric|dobhoff|gastric) tubes?",
        r"(?:central|central venous|picc|jugular|subclavian|venous|arterial) lines?",
        r"(?:sternotomy|sternal|surgical) (?:wires?|sutures)|median sternotomy",
        r"(?:surgical|vascular|metallic|cholecystectomy) clips?",
        r"stents?|(?:prosthetic|mechanical|artificial) (?:heart )?valves?|valve (?:replacement|prosthesis)",
        r"(?:pacemaker|pacer|cardiac|transvenous) (?:leads?|wires?|generator|device)",
        r"(?:fixation|orthopedic|surgical|spinal) hardware|shunt|electrodes",
    ),
}

NORMAL_STATEMENTS: dict[str, re.Pattern] = {
    "Enlarged Cardiomediastinum": _words(
        rf"{_MEDIASTINUM}{_AND_MORE} {_IS}? ?{_NORMAL}",
        rf"normal (?:appearing )?{_MEDIASTINUM}",
        rf"(?:heart and )?mediastinum{_AND_MORE} {_IS}? ?{_NORMAL}",
    ),
    "Cardiomegaly": _words(
        rf"{_HEART}{_AND_MORE} {_IS}? ?{_NORMAL}(?: in size)?",
        r"normal (?:sized? )?(?:heart|cardiac)(?: size| silhouette)?",
        rf"cardio ?mediastinal (?:silhouette|contours?){_AND_MORE} {_IS}? ?{_NORMAL}",
        r"heart size (?:is )?(?:not|no longer) enlarged",
    ),
    "Lung Opacity": _words(rf"lungs{_AND_MORE} {_IS}? ?(?:grossly |otherwise )?clear"),
    "Pleural Effusion": _words(r"(?:sharp|clear) costophrenic (?:angles|sulci)", rf"costophrenic (?:angles|sulci) {_IS}? ?(?:sharp|clear)"),
}

NEGATED_UNCERTAINTY_BEFORE = _words(
    r"cannot exclude", r"can not exclude", r"cannot rule out", r"can not rule out", r"cannot be excluded",
    r"difficult to exclude", r"not be excluded", r"no definite evidence to exclude",
)
NEGATED_UNCERTAINTY_AFTER = _words(
    r"cannot be excluded", r"can not be excluded", r"not be excluded", r"(?:is |are )?not excluded",
    r"(?:is |are )?not (?:be )?ruled out", r"cannot be ruled out",
)
NEGATION_BEFORE = _words(
    r"no", r"not", r"without", r"negative for", r"free of", r"absence of", r"clear of", r"resolution of",
    r"resolved", r"removal of", r"rather than", r"nor", r"none", r"never", r"ruled out", r"rules out",
)
NEGATION_AFTER = _words(
    r"not", r"absent", r"(?:has |have )?resolved", r"(?:has |have )?(?:been )?removed", r"no longer",
    r"(?:has |have )?cleared", r"negative",
)
UNCERTAINTY_BEFORE = _words(
    r"possible", r"possibly", r"probable", r"probably", r"may", r"might", r"could", r"likely", r"suspicious",
    r"suspected", r"concerning for", r"concern for", r"suggestive of", r"suggests?", r"suggesting",
    r"question of", r"questionable", r"questioned", r"versus", r"vs", r"differential", r"consider",
    r"considered", r"borderline", r"equivocal", r"indeterminate", r"uncertain", r"presumed", r"presumably",
    r"favou?r", r"favou?red", r"compatible with", r"to exclude", r"rule out", r"evaluate for", r"evaluation for",
)
UNCERTAINTY_AFTER = _words(
    r"(?:is |are )?(?:possible|suspected|questioned|questionable|likely|probable)", r"versus", r"vs",
    r"(?:at the )?upper limits? of normal", r"top normal", r"borderline",
)
# Phrases that contain a negation word but negate nothing: "no change in mild cardiomegaly".
PSEUDO_NEGATION = _words(
    r"no (?:significant |substantial |appreciable |definite )?(?:interval )?change", r"not (?:significantly )?changed",
    r"without (?:significant |interval )?change", r"not only", r"no increase", r"not necessarily", r"unchanged",
)
SCOPE_TERMINATOR = _words(
    r"but", r"however", r"although", r"though", r"except", r"aside from", r"apart from", r"which", r"whereas",
    r"while", r"otherwise", r"there is", r"there are", r"there has been", r"there have been", r"consistent with",
)


def label_report(text: str | None) -> dict[str, float]:
    """Label one report (raw or cleaned text) for the 14 CheXpert observations.

    Returns {observation: 1.0, 0.0, -1.0 or NaN} in ``OBSERVATIONS`` order.
    """
    cleaned = clean_report(text)
    labels = dict.fromkeys(OBSERVATIONS, np.nan)
    if not cleaned:
        return labels
    found: dict[str, list[float]] = {name: [] for name in OBSERVATIONS[1:]}
    for sentence in cleaned.split(" ."):
        sentence = sentence.strip()
        if sentence:
            for name, values in _label_sentence(sentence).items():
                found[name].extend(values)
    for name, values in found.items():
        labels[name] = _aggregate(values)
    labels["No Finding"] = _no_finding(labels)
    return labels


def label_reports(texts: Iterable[str | None]) -> np.ndarray:
    """Label many reports: float32 (reports, 14) with columns in ``OBSERVATIONS`` order."""
    rows = [[label_report(text)[name] for name in OBSERVATIONS] for text in texts]
    return np.array(rows, dtype=np.float32).reshape(-1, len(OBSERVATIONS))


def _label_sentence(sentence: str) -> dict[str, list[float]]:
    """Labels of every mention in one sentence (lower-case words without the final period)."""
    masked = PSEUDO_NEGATION.sub(lambda match: "_" * len(match.group()), sentence)
    values: dict[str, list[float]] = {}
    for name, mention in MENTIONS.items():
        normal_spans = []
        normal = NORMAL_STATEMENTS.get(name)
        if normal is not None:
            normal_spans = [match.span() for match in normal.finditer(sentence)]
        labels = [NEGATIVE] * len(normal_spans)
        for match in mention.finditer(sentence):
            if not any(start <= match.start() < end for start, end in normal_spans):
                labels.append(_classify_mention(masked[: match.start()], match.group(), masked[match.end() :]))
        if labels:
            values[name] = labels
    return values


def _classify_mention(before: str, mention: str, after: str) -> float:
    """Label one mention from the text before and after it in its sentence.

    The mention itself can carry the uncertainty, as in "heart size is borderline".
    """
    before = " ".join(SCOPE_TERMINATOR.split(before)[-1].split()[-PRE_WINDOW:])
    after = " ".join(SCOPE_TERMINATOR.split(after)[0].split()[:POST_WINDOW])
    if NEGATED_UNCERTAINTY_BEFORE.search(before) or NEGATED_UNCERTAINTY_AFTER.search(after):
        return UNCERTAIN
    if NEGATION_BEFORE.search(before) or NEGATION_AFTER.search(after):
        return NEGATIVE
    if UNCERTAINTY_BEFORE.search(before) or UNCERTAINTY_AFTER.search(f"{mention} {after}"):
        return UNCERTAIN
    return POSITIVE


def _aggregate(values: list[float]) -> float:
    for label in (POSITIVE, UNCERTAIN, NEGATIVE):
        if label in values:
            return label
    return np.nan


def _no_finding(labels: dict[str, float]) -> float:
    pathologies = [name for name in OBSERVATIONS if name not in ("No Finding", "Support Devices")]
    abnormal = any(labels[name] in (POSITIVE, UNCERTAIN) for name in pathologies)
    return np.nan if abnormal else POSITIVE
