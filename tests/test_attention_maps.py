"""Attention-map rendering: grid placement, per-view tint, shares and file names."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.attention_maps import (
    BAR_COLOUR,
    BAR_TOP,
    CAPTION_HEIGHT,
    GAP,
    heat_map,
    map_file_name,
    render_word_map,
    view_weights,
    write_word_maps,
)

SIZE = 140  # 20 px per cell of a 7x7 grid


def _views():
    gray = np.full((SIZE, SIZE), 0.5, np.float32)
    return [gray, gray.copy()]


def _colour(image, view, x, y):
    """RGB of the rendered pixel at (x, y) inside ``view``'s tile."""
    return np.asarray(image)[CAPTION_HEIGHT + y, view * (SIZE + GAP) + x].astype(int)


def _tint(colour):
    """Distance of a rendered colour from the gray (127, 127, 127) of the test radiographs."""
    return float(np.abs(colour - 127).sum())


def test_heat_map_peaks_at_its_cell():
    cells = np.zeros(49, np.float32)
    cells[2 * 7 + 5] = 1.0  # row 2, column 5
    heat = heat_map(cells, SIZE, SIZE)
    row, column = np.unravel_index(np.argmax(heat), heat.shape)
    assert 2 * 20 <= row < 3 * 20
    assert 5 * 20 <= column < 6 * 20


def test_spatial_map_colours_attended_cell_only():
    weights = np.zeros(98, np.float32)
    weights[2 * 7 + 5] = 1.0
    image = render_word_map(_views(), weights, "1. effusion")
    attended = _colour(image, 0, 5 * 20 + 10, 2 * 20 + 10)
    far = _colour(image, 0, 10, 130)
    other_view = _colour(image, 1, 5 * 20 + 10, 2 * 20 + 10)
    assert _tint(attended) > 100, "the attended cell is coloured"
    assert _tint(far) == 0, "cells without attention keep the gray radiograph"
    assert _tint(other_view) == 0


def test_pooled_map_tints_each_view_by_its_weight():
    image = render_word_map(_views(), np.array([0.8, 0.2], np.float32), "1. heart")
    strong = _colour(image, 0, 70, 70)
    weak = _colour(image, 1, 70, 70)
    assert _tint(strong) > _tint(weak) > 0
    assert (_colour(image, 0, 5, 5) == strong).all(), "a pooled view is tinted uniformly"


def test_share_bars_follow_view_weights():
    image = np.asarray(render_word_map(_views(), np.array([0.75, 0.25], np.float32), "1. no"))
    bar_row = image[CAPTION_HEIGHT + SIZE + BAR_TOP + 1]
    filled = (bar_row == BAR_COLOUR).all(axis=1)
    assert filled[:SIZE].sum() == 0.75 * SIZE
    assert filled[SIZE + GAP :].sum() == 0.25 * SIZE


def test_share_under_half_pixel_has_no_bar():
    weights = np.array([0.999, 0.001], np.float32)  # 0.001 * 140 px rounds to no pixel
    image = np.asarray(render_word_map(_views(), weights, "1. heart"))
    bar_row = image[CAPTION_HEIGHT + SIZE + BAR_TOP + 1]
    filled = (bar_row == BAR_COLOUR).all(axis=1)
    assert filled[:SIZE].sum() == round(0.999 * SIZE)
    assert filled[SIZE + GAP :].sum() == 0


def test_view_weights_rejects_odd_regions():
    with pytest.raises(ValueError, match="do not split into 2 views"):
        view_weights(np.ones(3))


@pytest.mark.parametrize(("position", "word", "name"), [
    (1, "effusion", "01_effusion.png"),
    (2, ".", "02_period.png"),
    (12, "x-ray's", "12_x-ray-s.png"),
])
def test_map_file_names(position, word, name):
    assert map_file_name(position, word) == name


def test_write_word_maps_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    attention = np.full((3, 98), 1 / 98, np.float32)
    written = write_word_maps(tmp_path, _views(), ["no", "effusion", "."], attention)
    assert [path.name for path in written] == ["01_no.png", "02_effusion.png", "03_period.png"]
    assert (tmp_path / "notes.txt").read_text() == "keep"
