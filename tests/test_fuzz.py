"""Property-based tests of the report XML parser and the text cleaner (hypothesis)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.openi import OpenIReports
from pipeline.text import clean_report

# No example database, so the suite writes nothing into the checkout. A failure prints its example.
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CLEANED = re.compile(r"(?:[a-z0-9.]+(?: [a-z0-9.]+)*)?")

# Characters XML 1.0 allows in text, less carriage returns, which parsers turn into line feeds.
xml_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn"), whitelist_characters="\n\t"), max_size=80)
labels = st.sampled_from(["FINDINGS", "IMPRESSION", "INDICATION", "COMPARISON", "findings", "HISTORY", "", "Impression "])
image_ids = st.one_of(st.from_regex(r"CXR[0-9]{1,4}_IM-[0-9]{4}-[0-9]{4}", fullmatch=True), st.text(max_size=20))
report_words = st.lists(
    st.sampled_from(["XXXX", "xx", "1.", "2)", "10.", "2.5", ".", ";", "!", "é", "Œ", "no", "T-10", " ", "\n", "..."]),
    max_size=30,
).map("".join)
SECRET = "SECRET-e41b7d-do-not-leak"


def doctypes(secret_uri: str) -> st.SearchStrategy[str]:
    """DOCTYPEs that declare internal, external, parameter and nested entities, or none."""
    return st.sampled_from([
        "",
        '<!DOCTYPE eCitation [<!ENTITY x "y">]>',
        f'<!DOCTYPE eCitation [<!ENTITY leak SYSTEM "{secret_uri}">]>',
        f'<!DOCTYPE eCitation [<!ENTITY % p SYSTEM "{secret_uri}"> %p;]>',
        '<!DOCTYPE eCitation SYSTEM "http://127.0.0.1:9/evil.dtd">',
        '<!DOCTYPE eCitation [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>',
    ])


@st.composite
def report_documents(draw, secret_uri: str) -> bytes:
    """An Open-I style report with drawn ids, sections, images and DOCTYPE, possibly cut short.

    Section text may reference the entities that the DOCTYPE declares.
    """
    digits = st.text(st.characters(whitelist_categories=("Nd", "No")), min_size=1, max_size=25)
    report_id = draw(st.one_of(st.integers(0, 10**6).map(str), st.text(max_size=8), digits))
    entity_text = st.sampled_from(["&leak;", "&b;", "&x;", "&undeclared;"])
    sections = draw(st.lists(st.tuples(labels, st.one_of(xml_text.map(escape), entity_text)), max_size=6))
    abstract = "".join(f"<AbstractText Label={quoteattr(label)}>{text}</AbstractText>" for label, text in sections)
    parents = "".join(f"<parentImage id={quoteattr(image_id)}><caption>{escape(caption)}</caption></parentImage>"
                      for image_id, caption in draw(st.lists(st.tuples(image_ids, xml_text), max_size=4)))
    body = (f'<?xml version="1.0" encoding="utf-8"?>\n{draw(doctypes(secret_uri))}<eCitation><IUXRId id={quoteattr(report_id)}/>'
            f"<Abstract>{abstract}</Abstract>{parents}</eCitation>").encode()
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return body


def parse_one(data: bytes) -> OpenIReports:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ecgen-radiology" / "1.xml"
        path.parent.mkdir()
        path.write_bytes(data)
        return OpenIReports(folder)


@FUZZ
@given(st.binary(max_size=400))
def test_parser_survives_any_bytes(data: bytes) -> None:
    reports = parse_one(data)

    assert len(reports) + len(reports.skipped) == 1


@pytest.fixture(scope="module")
def secret_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    secret = tmp_path_factory.mktemp("secret") / "secret.txt"
    secret.write_text(SECRET, encoding="utf-8")
    return secret.as_uri()


@FUZZ
@given(data=st.data())
def test_parser_survives_report_like_xml(secret_uri: str, data: st.DataObject) -> None:
    document = data.draw(report_documents(secret_uri))

    reports = parse_one(document)

    assert len(reports) + len(reports.skipped) == 1
    for report in reports:
        assert 0 <= report.report_id < 2**63
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", image_id) for image_id in report.image_ids)
        assert len(report.captions) == len(report.image_ids)
        assert b"<!ENTITY" not in document
    assert SECRET not in repr(list(reports)) + repr(reports.skipped)


@FUZZ
@given(st.one_of(st.text(st.characters(whitelist_categories=("Nd", "No")), min_size=1, max_size=25), xml_text))
def test_parser_survives_any_report_id(report_id: str) -> None:
    data = f"<eCitation><IUXRId id={quoteattr(report_id)}/><Abstract/></eCitation>".encode()

    reports = parse_one(data)

    assert len(reports) + len(reports.skipped) == 1
    assert all(0 <= report.report_id < 2**63 for report in reports)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["FINDINGS", "IMPRESSION"]), xml_text), min_size=1, max_size=2, unique_by=lambda pair: pair[0]))
def test_parser_keeps_section_text(sections: list[tuple[str, str]]) -> None:
    abstract = "".join(f'<AbstractText Label="{label}">{escape(text)}</AbstractText>' for label, text in sections)
    data = f'<eCitation><IUXRId id="1"/><Abstract>{abstract}</Abstract></eCitation>'.encode()

    [report] = parse_one(data)

    for label, text in sections:
        assert getattr(report, label.lower()) == (text if text.strip() else None)


@FUZZ
@given(st.one_of(st.none(), st.text(max_size=300), report_words))
def test_clean_report_idempotent(text: str | None) -> None:
    once = clean_report(text)

    assert clean_report(once) == once
    assert CLEANED.fullmatch(once), once
    assert once == "" or once.endswith(" .")
    assert not once.startswith(".")
