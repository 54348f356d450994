"""Attention maps: where an attention model looked in each view when it chose each word.

Spatial models (``spatial``, ``transformer``) attend over 2 * s * s regions: view 0's
s x s DenseNet grid in row-major order, then view 1's (s = 7 at 224 px input). The grid
is upsampled bilinearly onto the radiograph, squashed to a square as featurize squashes
it, and drawn as a colour overlay. The ``attention`` model attends over 2 regions, one per
view, so each view gets a uniform tint. Under each view a bar shows that view's share of
the word's attention.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.atomic import atomic_path
from pipeline.image_features import VIEWS
from pipeline.images import read_radiograph

# Anchor colours of matplotlib's "inferno" colour map at 0, 0.25, 0.5, 0.75 and 1.
INFERNO_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)
OVERLAY_OPACITY = 0.6  # opacity of the colour where attention is highest
CAPTION_HEIGHT = 22
LABEL_HEIGHT = 24  # under each view: its name and share, then a bar of that length
BAR_TOP, BAR_BOTTOM = 17, 21  # rows of the share bar within the label strip
BAR_COLOUR = (249, 142, 9)
GAP = 6
VIEW_SIZE = 256  # default side of each view in a map, in pixels


def view_weights(weights: np.ndarray) -> np.ndarray:
    """Split one step's weights (regions,) into (2, cells), view 0 first."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 1 or weights.size % VIEWS:
        raise ValueError(f"attention weights of shape {weights.shape} do not split into {VIEWS} views")
    return weights.reshape(VIEWS, -1)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values (height, width) in [0, 1] to uint8 RGB (height, width, 3) with the inferno map."""
    positions = np.clip(values, 0.0, 1.0) * (len(INFERNO_ANCHORS) - 1)
    anchors = np.arange(len(INFERNO_ANCHORS))
    channels = [np.interp(positions, anchors, INFERNO_ANCHORS[:, channel]) for channel in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def heat_map(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample one view's cell weights (cells,) to float32 (height, width).

    A single cell (the pooled ``attention`` model) fills the view uniformly. Otherwise the
    cells must form a square s x s grid in row-major order.
    """
    if cells.size == 1:
        return np.full((height, width), float(cells[0]), np.float32)
    side = math.isqrt(cells.size)
    if side * side != cells.size:
        raise ValueError(f"{cells.size} attention cells per view do not form a square grid")
    grid = Image.fromarray(cells.reshape(side, side).astype(np.float32), mode="F")
    return np.asarray(grid.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend a radiograph float (height, width) in [0, 1] with a heat map in [0, 1] of the
    same shape: uint8 RGB (height, width, 3), coloured where the heat is high."""
    opacity = (OVERLAY_OPACITY * np.clip(heat, 0.0, 1.0))[..., None]
    background = np.repeat(np.clip(gray, 0.0, 1.0)[..., None] * 255.0, 3, axis=2)
    return (background * (1.0 - opacity) + colorize(heat) * opacity).astype(np.uint8)


def load_views(paths: Sequence[Path | str], view_size: int, max_pixels: int) -> list[np.ndarray]:
    """Decode a study's two view files and resize each to float32 (view_size, view_size) in [0, 1].

    The square matches the model input: featurize squashes every radiograph to a
    square without keeping the aspect ratio.
    """
    views = []
    for path in paths:
        gray = Image.fromarray(read_radiograph(path, max_pixels), mode="F")
        views.append(np.asarray(gray.resize((view_size, view_size), Image.Resampling.BILINEAR), dtype=np.float32))
    return views


def render_word_map(
    views: Sequence[np.ndarray], weights: np.ndarray, caption: str, view_names: Sequence[str] = ("frontal", "lateral")
) -> Image.Image:
    """Draw one word's attention over both views, side by side, with a caption and share bars.

    ``views``: two float32 (size, size) radiographs in [0, 1]. ``weights`` (regions,): the
    word's attention, summing to 1 over both views. Colours are scaled to the word's highest
    weight, so every map uses the full colour range. The bars show each view's share.
    """
    per_view = view_weights(weights)
    size = views[0].shape[0]
    peak = max(float(per_view.max()), 1e-12)
    canvas = Image.new("RGB", (VIEWS * size + (VIEWS - 1) * GAP, CAPTION_HEIGHT + size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 3), caption, fill="black", font=ImageFont.load_default(size=14))
    small_font = ImageFont.load_default(size=11)

    for index, (gray, cells) in enumerate(zip(views, per_view, strict=True)):
        left = index * (size + GAP)
        tile = overlay(gray, heat_map(cells / peak, size, size))
        canvas.paste(Image.fromarray(tile, mode="RGB"), (left, CAPTION_HEIGHT))
        share = float(cells.sum())
        top = CAPTION_HEIGHT + size
        draw.text((left + 2, top + 2), f"{view_names[index]}: {share:.0%}", fill="black", font=small_font)
        bar_width = round(share * size)
        if bar_width > 0:  # a share under half a pixel gets no bar
            draw.rectangle((left, top + BAR_TOP, left + bar_width - 1, top + BAR_BOTTOM), fill=BAR_COLOUR)
    return canvas


MAP_FILE_PATTERN = re.compile(r"\d{2,}_[a-z0-9-]+\.png")


def map_file_name(position: int, word: str) -> str:
    """Name the PNG of the word at 1-based ``position``: ``03_effusion.png``; punctuation gets a name."""
    slug = re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-") or ("period" if word == "." else "symbol")
    return f"{position:02d}_{slug}.png"


def write_word_maps(
    out_dir: Path,
    views: Sequence[np.ndarray],
    words: Sequence[str],
    attention: np.ndarray,
    view_names: Sequence[str] = ("frontal", "lateral"),
) -> list[Path]:
    """Write one PNG per generated word into ``out_dir`` and return their paths in word order.

    ``attention`` float32 (steps, regions) with steps >= len(words); row t holds the weights
    with which word t was chosen. Word maps of an earlier report in ``out_dir`` (files named
    like ``07_effusion.png``) are deleted first, so the folder contains the maps of one
    report. Other files are left alone.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for old_map in out_dir.iterdir():
        if MAP_FILE_PATTERN.fullmatch(old_map.name) and old_map.is_file():
            old_map.unlink()
    written = []
    for position, word in enumerate(words, start=1):
        image = render_word_map(views, attention[position - 1], f"{position}. {word}", view_names)
        path = out_dir / map_file_name(position, word)
        with atomic_path(path) as temporary:
            image.save(temporary, format="PNG", optimize=True)
        written.append(path)
    return written
