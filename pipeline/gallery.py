"""An HTML gallery of scored studies: both views, reference and generated reports, attention maps.

The score stage writes ``metrics/gallery/``: ``index.html`` plus one folder of PNGs per
study, with no external files, scripts or fonts. Open ``index.html`` in a browser.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import jinja2
import numpy as np
from PIL import Image

from pipeline.atomic import atomic_directory
from pipeline.attention_maps import load_views, map_file_name, render_word_map
from pipeline.dataset import SplitData
from pipeline.decoding import DetailedGreedyDecoder, word_positions
from pipeline.images import ImageDecodeError
from pipeline.models import ReportGenerator
from pipeline.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

VIEW_NAMES = ("view 1", "view 2")
IMAGE_SIZE = 256  # side of the radiographs shown per study, in pixels
MAP_VIEW_SIZE = 112  # side of each view in an attention map, in pixels


@dataclass
class GalleryStudy:
    """One study of the gallery.

    ``image_paths``: the two view files, view 0 first; None where the file is unknown.
    ``attention`` float32 (words, regions): row t contains the weights with which greedy word t
    was chosen, or None for a model without attention. ``beam`` is the beam-search report
    and ``labels`` maps a report name ("reference", "greedy", "beam") to clinical labels by
    condition; the gallery shows each when it is set.
    """

    study_id: str
    image_paths: list[Path | None]
    single_view: bool
    reference: str
    greedy_words: list[str]
    attention: np.ndarray | None
    beam: str | None = None
    labels: dict[str, dict[str, str]] | None = None


def write_gallery(
    out_dir: Path,
    studies: Sequence[GalleryStudy],
    model: str,
    split: str,
    warnings: Sequence[str] = (),
    max_pixels: int = 50_000_000,
) -> Path:
    """Replace ``out_dir`` with ``index.html`` and the PNGs of ``studies``; return the index path."""
    has_attention = any(study.attention is not None for study in studies)
    missing = 0
    with atomic_directory(out_dir) as temporary:
        entries = []
        for index, study in enumerate(studies):
            entry, study_missing = _write_study(temporary, index, study, max_pixels)
            entries.append(entry)
            missing += study_missing
        html = _template().render(
            model=model, split=split, studies=entries, warnings=list(warnings),
            has_attention=has_attention, view_size=IMAGE_SIZE,
        )
        (temporary / "index.html").write_text(html, encoding="utf-8")
    if missing:
        logger.warning("gallery: %d view images were not found or not readable and are not shown", missing)
    logger.info("gallery: wrote %d studies to %s", len(studies), out_dir / "index.html")
    return out_dir / "index.html"


def _write_study(root: Path, index: int, study: GalleryStudy, max_pixels: int) -> tuple[dict, int]:
    """Write one study's PNGs under ``root`` and return its template entry and how many views were missing."""
    folder = f"{index:02d}-{re.sub(r'[^A-Za-z0-9_-]+', '-', study.study_id)}"
    (root / folder).mkdir()
    images, views, missing = [], [], 0
    for position, path in enumerate(study.image_paths, start=1):
        view = _load_view(path, max_pixels)
        missing += view is None
        views.append(view)
        if view is not None:
            Image.fromarray((view * 255).astype(np.uint8), mode="L").save(root / folder / f"view-{position}.png", optimize=True)
        images.append(f"{folder}/view-{position}.png" if view is not None else None)

    maps = []
    if study.attention is not None and all(view is not None for view in views):
        small = [np.asarray(Image.fromarray(view, mode="F").resize((MAP_VIEW_SIZE, MAP_VIEW_SIZE))) for view in views]
        for position, word in enumerate(study.greedy_words, start=1):
            name = f"{folder}/{map_file_name(position, word)}"
            image = render_word_map(small, study.attention[position - 1], f"{position}. {word}", VIEW_NAMES)
            # A 128-colour palette makes each map about a third of its RGB size.
            image.quantize(colors=128, dither=Image.Dither.NONE).save(root / name, optimize=True)
            maps.append({"file": name, "word": word})

    labels = study.labels or {}
    conditions = sorted({condition for by_condition in labels.values() for condition in by_condition})
    entry = {
        "folder": folder, "study_id": study.study_id, "single_view": study.single_view, "images": images,
        "reference": study.reference, "greedy": " ".join(study.greedy_words), "beam": study.beam,
        "labels": labels, "conditions": conditions, "maps": maps,
    }
    return entry, missing


def _load_view(path: Path | None, max_pixels: int) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        return load_views([path], IMAGE_SIZE, max_pixels)[0]
    except ImageDecodeError as error:
        logger.warning("gallery: skipped %s", error)
        return None


def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return environment.get_template("gallery.html")


def score_gallery_studies(
    model: ReportGenerator,
    tokenizer: Tokenizer,
    data: SplitData,
    features_path: Path,
    images_dir: Path,
    count: int,
) -> list[GalleryStudy]:
    """Decode the first ``count`` studies of a split greedily, with attention, for the gallery.

    View files are ``images_dir/<image id>.png`` with the image ids that the feature store
    records for each study.
    """
    count = min(count, len(data))
    details = DetailedGreedyDecoder(model, tokenizer.max_length - 1)(data.features[:count])
    views = _study_views(features_path, data.study_ids[:count])
    studies = []
    for row in range(count):
        positions = word_positions(details.token_ids[row])
        image_ids, single_view = views.get(data.study_ids[row], ([], False))
        studies.append(
            GalleryStudy(
                study_id=data.study_ids[row],
                image_paths=[images_dir / f"{image_id}.png" for image_id in image_ids] or [None, None],
                single_view=single_view,
                reference=data.texts[row],
                greedy_words=tokenizer.decode(details.token_ids[row, positions]),
                attention=details.attention[row, positions] if details.attention is not None else None,
            )
        )
    return studies


def _study_views(features_path: Path, study_ids: Sequence[str]) -> dict[str, tuple[list[str], bool]]:
    """Map each study id to its two view image ids and single_view flag from the feature store."""
    requested = set(study_ids)
    with h5py.File(features_path, "r") as store:
        if "image_ids" not in store:
            logger.warning("gallery: %s records no image ids, so the gallery shows no images", features_path)
            return {}
        stored = [_text(value) for value in store["study_id"][:]]
        rows = [row for row, study_id in enumerate(stored) if study_id in requested]
        image_ids = store["image_ids"][rows] if rows else np.zeros((0, 2), object)
        single = store["single_view"][rows] if rows else np.zeros(0, bool)
    return {stored[row]: ([_text(value) for value in ids], bool(flag))
            for row, ids, flag in zip(rows, image_ids, single, strict=True)}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
