"""Report text cleaning.

The cleaner keeps every real word, whatever its length: negations such as "no" and
"not" decide what a finding means, so "no pneumothorax" must never become
"pneumothorax". It lower-cases, removes Open-I's ``XXXX`` anonymisation tokens, keeps
the period as a sentence token, and drops other punctuation.
"""

from __future__ import annotations

import re
import unicodedata

_ANONYMISED = re.compile(r"x{2,}", re.IGNORECASE)
_LIST_NUMBER = re.compile(r"(?:(?<=^)|(?<=[\s.]))\d{1,2}[.)](?=\s|$)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_SENTENCE_END = re.compile(r"[.;!?]")
_NOT_WORD = re.compile(r"[^a-z0-9.\s]")
_SPACES = re.compile(r"\s+")
_REPEATED_PERIOD = re.compile(r"(?:\.\s*){2,}")


def clean_report(text: str | None) -> str:
    """Return lower-case words and periods separated by single spaces.

    ``None`` and empty text give "". Numbered list markers ("1.", "2)") are removed,
    decimal numbers keep their digits ("2.5 cm" becomes "2 5 cm"), and every sentence
    ends with " .". Cleaning twice gives the same result as cleaning once.
    """
    if not text:
        return ""
    text = _ascii_letters(text)
    text = _ANONYMISED.sub(" ", text)
    text = _LIST_NUMBER.sub(" ", text)
    text = text.lower()
    text = _DECIMAL_POINT.sub(" ", text)
    text = _SENTENCE_END.sub(" . ", text)
    text = _NOT_WORD.sub(" ", text)
    text = _REPEATED_PERIOD.sub(" . ", text)
    words = _SPACES.sub(" ", text).strip()
    words = words.removeprefix(". ").removeprefix(".").strip()
    if words and not words.endswith("."):
        words += " ."
    return words


def _ascii_letters(text: str) -> str:
    """Fold accented letters to ASCII ("é" to "e") so they are not split into pieces."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def report_words(text: str | None) -> list[str]:
    """Split a report into cleaned word tokens, periods included."""
    cleaned = clean_report(text)
    return cleaned.split() if cleaned else []


def join_sections(sections: dict[str, str | None], names: list[str]) -> str:
    """Join the named report sections in order with spaces; missing (None, NaN) and blank ones are skipped."""
    parts = [sections.get(name) for name in names]
    return " ".join(part.strip() for part in parts if isinstance(part, str) and part.strip())
