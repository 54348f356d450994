"""The HTML gallery: views, escaped reports, optional beam and labels, attention maps."""

from __future__ import annotations

import html
import re

import numpy as np
from PIL import Image

from pipeline.gallery import GalleryStudy, write_gallery


def _radiograph(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (300, 280), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _studies(tmp_path):
    frontal, lateral = _radiograph(tmp_path / "a.png", 0), _radiograph(tmp_path / "b.png", 1)
    attention = np.random.default_rng(2).dirichlet(np.ones(98), size=3).astype(np.float32)
    first = GalleryStudy(
        study_id="CXR1_IM-0001", image_paths=[frontal, lateral], single_view=False,
        reference="heart <script>alert(1)</script> & lungs", greedy_words=["no", "effusion", "."],
        attention=attention, beam="no acute disease .",
        labels={"reference": {"Effusion": "negative"}, "greedy": {"Effusion": "negative", "Edema": "uncertain"}},
    )
    second = GalleryStudy(
        study_id="CXR2_IM-0002", image_paths=[None, None], single_view=True,
        reference="normal .", greedy_words=["normal", "."], attention=np.full((2, 98), 1 / 98, np.float32),
    )
    return [first, second]


def test_gallery_page_and_files(tmp_path):
    out = tmp_path / "gallery"
    index = write_gallery(out, _studies(tmp_path), "spatial", "test", ["RANDOM WEIGHTS: test warning"])
    page = index.read_text()
    assert "heart &lt;script&gt;alert(1)&lt;/script&gt; &amp; lungs" in page
    assert "<script>" not in page
    assert "no acute disease ." in page
    assert "RANDOM WEIGHTS: test warning" in page
    assert "<th>greedy</th>" in page
    assert "<td>uncertain</td>" in page
    sources = [html.unescape(source) for source in re.findall(r'src="([^"]+)"', page)]
    assert len(sources) == 2 + 3, "two views and three attention maps of the first study"
    for source in sources:
        assert (out / source).is_file(), source
    assert "00-CXR1_IM-0001/02_effusion.png" in sources


def test_study_without_images_has_no_maps(tmp_path):
    page = write_gallery(tmp_path / "gallery", _studies(tmp_path)[1:], "spatial", "test").read_text()
    assert page.count("image not found") == 2
    assert "No attention maps: the images were not found." in page
    assert "single view" in page
    assert "Beam search" not in page


def test_model_without_attention(tmp_path):
    study = _studies(tmp_path)[0]
    study.attention = None
    page = write_gallery(tmp_path / "gallery", [study], "simple", "test").read_text()
    assert "The simple model has no attention" in page


def test_gallery_replaces_previous_run(tmp_path):
    out = tmp_path / "gallery"
    write_gallery(out, _studies(tmp_path), "spatial", "test")
    write_gallery(out, [], "spatial", "test")
    assert sorted(path.name for path in out.iterdir()) == ["index.html"]
    assert "No studies" in (out / "index.html").read_text()
