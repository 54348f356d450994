"""Open-I Indiana University chest X-ray reports (IU X-ray), parsed from their XML files."""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

from lxml import etree
from tqdm import tqdm

from pipeline.config import REPORT_SECTIONS
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

STUDY_ID_PATTERN = re.compile(r"^(CXR\d+(?:_\d+)?_IM-\d{4})")
# Image ids become file names downstream, so anything that could leave the images folder is rejected.
IMAGE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# ASCII digits only (str.isdigit accepts "²", which int() rejects), and few enough for int64 columns.
REPORT_ID_PATTERN = re.compile(r"[0-9]{1,18}")
_DIGIT_RUN = re.compile(r"(\d+)")
_STRING_VALUE = etree.XPath("string()")


def study_id_of(image_id: str) -> str | None:
    """Return the study (image series) id that starts ``image_id``, or None if it has none.

    ``CXR1_1_IM-0001-3001`` belongs to ``CXR1_1_IM-0001`` and ``CXR2199_IM-0809-0001-0002``
    to ``CXR2199_IM-0809``.
    """
    match = STUDY_ID_PATTERN.match(image_id)
    return match.group(1) if match else None


def natural_key(text: str) -> tuple[str | int, ...]:
    """Return a sort key that compares digit runs by value, so ``-3001`` sorts before ``-22001``."""
    parts = _DIGIT_RUN.split(text)
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts))


class ReportXMLError(PipelineError, ValueError):
    """Raised for a report file that cannot be used. The message gives the reason."""


@dataclasses.dataclass(frozen=True)
class OpenIReport:
    """One radiology report with the ids of the images it lists.

    Text fields are raw: ``XXXX`` anonymisation tokens, case and spacing are kept. A section
    that is missing, empty or only whitespace is None.
    """

    report_id: int
    uid: str | None
    findings: str | None
    impression: str | None
    indication: str | None
    comparison: str | None
    mesh_major: list[str]
    mesh_automatic: list[str]
    image_ids: list[str]
    captions: list[str | None]
    source_file: str


class OpenIReports:
    """The Open-I Indiana University chest X-ray report collection (IU X-ray, NLMCXR_reports.tgz).

    ``reports_dir`` is the folder that the archive was extracted into. Every ``*.xml`` below it
    is parsed once, at construction, in natural file-name order. Quirks of the collection:

    - Ids: ``<IUXRId id="1015"/>`` is the report id (``report_id``), with the file stem as the
      fallback when it is missing, and ``<uId id="CXR1015"/>`` is its string form (``uid``).
    - Series and report: an image id such as ``CXR1015_IM-0001-1001`` starts with its study
      (series) id ``CXR1015_IM-0001``, see ``study_id_of``. Odd ids such as
      ``CXR2199_IM-0809-0001-0002`` belong to ``CXR2199_IM-0809``, although R2Gen's split
      names that series ``CXR2199_IM-0809-0001``. One report may list two series of the same
      patient (``1015.xml`` lists ``CXR1015_IM-0001-*`` and ``CXR1015_IM-0013-*``), so the
      report, not the series, is the unit of one patient. Reports list 0 to 5 images and 104
      list none. No image id or series appears in two reports.
    - Views: the XML has no per-image view label. A caption describes the whole examination
      ("Xray Chest PA and Lateral", "2 views Chest") and is the same for every image of a
      report, so it cannot tell a frontal from a lateral image.
    - Sections: ``<AbstractText Label=...>`` contains COMPARISON, INDICATION, FINDINGS and
      IMPRESSION, often empty (530 reports have no findings, 34 no impression, 28 neither).
      Other labels are counted in ``unknown_labels`` and otherwise ignored.
    - Text is kept raw, including the ``XXXX`` tokens that replaced identifying words.

    A file is skipped when it is malformed, empty or wrongly encoded, declares or uses XML
    entities, has a root element other than ``<eCitation>``, repeats a report id or has no
    report id. Each one is logged as a warning and recorded in ``skipped`` (source file to
    reason). A ``parentImage`` whose id is not a plain file name is dropped with a warning.
    Parsing never resolves entities, loads a DTD or touches the network, so the content of an
    external entity cannot reach the output.
    """

    def __init__(self, reports_dir: Path | str) -> None:
        self.reports_dir = Path(reports_dir)
        self.skipped: dict[str, str] = {}
        self.unknown_labels: collections.Counter[str] = collections.Counter()
        self._parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
        self.reports: list[OpenIReport] = self._read_all()

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, index: int) -> OpenIReport:
        return self.reports[index]

    def __iter__(self) -> Iterator[OpenIReport]:
        return iter(self.reports)

    def xml_files(self) -> list[Path]:
        """List the report files below ``reports_dir`` in natural order of their relative paths."""
        if not self.reports_dir.is_dir():
            raise FileNotFoundError(f"{self.reports_dir}: report folder not found; run the download stage first")
        files = [path for path in self.reports_dir.rglob("*.xml") if path.is_file()]
        return sorted(files, key=lambda path: natural_key(path.relative_to(self.reports_dir).as_posix()))

    def parse_file(self, path: Path) -> OpenIReport:
        """Parse one report file, raising ReportXMLError with the reason when it cannot be used."""
        source_file = path.relative_to(self.reports_dir).as_posix()
        root = self._parse_root(path)
        image_ids, captions = _read_images(root, source_file)
        sections = self._read_sections(root, source_file)
        return OpenIReport(
            report_id=_read_report_id(root, path),
            uid=_attribute(root, "uId"),
            mesh_major=_texts(root.findall("MeSH/major")),
            mesh_automatic=_texts(root.findall("MeSH/automatic")),
            image_ids=image_ids,
            captions=captions,
            source_file=source_file,
            **sections,
        )

    def _read_all(self) -> list[OpenIReport]:
        start = time.perf_counter()
        files = self.xml_files()
        logger.info("parsing %d report files in %s", len(files), self.reports_dir)
        reports: dict[int, OpenIReport] = {}
        for path in tqdm(files, desc="parse reports", unit="file"):
            report = self._parse_or_skip(path)
            if report is None:
                continue
            if report.report_id in reports:
                first = reports[report.report_id].source_file
                self._skip(report.source_file, f"report id {report.report_id} is also in {first}")
                continue
            reports[report.report_id] = report
        self._log_summary(len(files), len(reports), time.perf_counter() - start)
        return sorted(reports.values(), key=lambda report: report.report_id)

    def _parse_or_skip(self, path: Path) -> OpenIReport | None:
        try:
            return self.parse_file(path)
        except ReportXMLError as error:
            self._skip(path.relative_to(self.reports_dir).as_posix(), str(error))
            return None

    def _skip(self, source_file: str, reason: str) -> None:
        self.skipped[source_file] = reason
        logger.warning("skipped report file %s: %s", source_file, reason)

    def _log_summary(self, n_files: int, n_reports: int, seconds: float) -> None:
        logger.info(
            "parsed %d reports from %d files in %.1f s; skipped %d files",
            n_reports,
            n_files,
            seconds,
            len(self.skipped),
        )
        if self.unknown_labels:
            logger.warning("ignored AbstractText sections with unknown labels: %s", dict(self.unknown_labels))

    def _parse_root(self, path: Path) -> etree._Element:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ReportXMLError(f"unreadable: {error.strerror}") from None
        # Parsing bytes, not the path, turns a wrong encoding into XMLSyntaxError, not OSError.
        try:
            root = etree.fromstring(data, self._parser)
        except etree.XMLSyntaxError as error:
            raise ReportXMLError(f"invalid XML: {error}") from None
        if root is None:
            raise ReportXMLError("invalid XML: no root element")
        _reject_entities(root)
        if root.tag != "eCitation":
            raise ReportXMLError(f"root element is <{root.tag}>, expected <eCitation>")
        return root

    def _read_sections(self, root: etree._Element, source_file: str) -> dict[str, str | None]:
        sections: dict[str, str | None] = dict.fromkeys(REPORT_SECTIONS)
        for node in root.iter("AbstractText"):
            label = (node.get("Label") or "").strip().lower()
            if label not in sections:
                self.unknown_labels[label.upper() or "<no label>"] += 1
                logger.debug("%s: ignored AbstractText with unknown label %r", source_file, node.get("Label"))
                continue
            text = _text(node)
            if sections[label] is not None and text is not None:
                logger.warning("%s: kept the first of two %s sections", source_file, label.upper())
                continue
            sections[label] = sections[label] or text
        return sections


def _reject_entities(root: etree._Element) -> None:
    """Raise ReportXMLError if the document declares or references an entity.

    The parser leaves entities unresolved, but their names would still show up as text, and
    Open-I reports never use them, so such a file is treated as hostile.
    """
    dtd = root.getroottree().docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        raise ReportXMLError("declares XML entities, which Open-I reports never do")
    if any(True for _ in root.iter(etree.Entity)):
        raise ReportXMLError("references undeclared XML entities")


def _read_report_id(root: etree._Element, path: Path) -> int:
    for candidate in (_attribute(root, "IUXRId"), path.stem):
        if candidate is not None and REPORT_ID_PATTERN.fullmatch(candidate):
            return int(candidate)
    raise ReportXMLError("no numeric report id of at most 18 digits in <IUXRId> or in the file name")


def _read_images(root: etree._Element, source_file: str) -> tuple[list[str], list[str | None]]:
    """Return the listed image ids in document order and the caption of each one."""
    image_ids: list[str] = []
    captions: list[str | None] = []
    for node in root.iter("parentImage"):
        image_id = (node.get("id") or "").strip()
        if not IMAGE_ID_PATTERN.fullmatch(image_id):
            logger.warning("%s: skipped parentImage with invalid id %r", source_file, image_id)
            continue
        if image_id in image_ids:
            logger.warning("%s: skipped repeated parentImage %s", source_file, image_id)
            continue
        image_ids.append(image_id)
        caption = node.find("caption")
        captions.append(None if caption is None else _text(caption))
    return image_ids, captions


def _attribute(root: etree._Element, tag: str) -> str | None:
    node = root.find(tag)
    if node is None:
        return None
    value = (node.get("id") or "").strip()
    return value or None


def _text(node: etree._Element) -> str | None:
    """Return the raw text of ``node`` and its descendants, or None when it is blank."""
    text = str(_STRING_VALUE(node))
    return text if text.strip() else None


def _texts(nodes: list[etree._Element]) -> list[str]:
    return [text for text in map(_text, nodes) if text is not None]
