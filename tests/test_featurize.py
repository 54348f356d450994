"""The featurize stage on a small generated tree of studies and images."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import featurize
from pipeline.config import FeaturizeParams

SIZE = 64  # 2x2 feature cells per view keeps the test fast; 224 gives 7x7


def _write_png(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (80, 96), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def study_tree(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for seed, image_id in enumerate(["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]):
        _write_png(images / f"{image_id}.png", seed)
    _write_png(images / "CXR3_IM-1384-1001.png", 9)
    (images / "CXR3_IM-1384-2001.png").write_bytes(b"not a png")
    (images / "CXR4_IM-2050-1001.png").write_bytes(b"")
    studies = pd.DataFrame(
        {
            "study_id": ["CXR1_1_IM-0001", "CXR2_IM-0652", "CXR3_IM-1384", "CXR4_IM-2050"],
            "report_id": [1, 2, 3, 4],
            "view_image_ids": [
                ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
                ["CXR2_IM-0652-1001", "CXR2_IM-0652-1001"],
                ["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"],
                ["CXR4_IM-2050-1001", "CXR4_IM-2050-1001"],
            ],
        }
    )
    studies.to_parquet(tmp_path / "studies.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"standin_images": True}))
    return tmp_path


def _run(tree, name="chexnet.h5"):
    params = FeaturizeParams(weights="random", image_size=SIZE, batch_size=2, storage_dtype="float32")
    output = tree / name
    featurize.run(params, tree / "studies.parquet", tree / "images", tree / "manifest.json", output)
    return output


def test_schema_and_shapes(study_tree):
    with h5py.File(_run(study_tree), "r") as store:
        assert [s.decode() for s in store["study_id"][:]] == ["CXR1_1_IM-0001", "CXR2_IM-0652", "CXR3_IM-1384"]
        assert store["pooled"].shape == (3, 2, 1024)
        assert store["spatial"].shape == (3, 8, 1024)
        assert store["image_ids"].shape == (3, 2)
        assert list(store["single_view"][:]) == [False, True, True]
        assert store.attrs["random_weights"]
        assert store.attrs["standin_images"]
        assert "RANDOM WEIGHTS" in store.attrs["warning"]
        assert "0.485" in store.attrs["normalisation"]


def test_pooled_is_mean_of_spatial(study_tree):
    with h5py.File(_run(study_tree), "r") as store:
        spatial = store["spatial"][0].reshape(2, 4, 1024)
        np.testing.assert_allclose(store["pooled"][0], spatial.mean(axis=1), rtol=1e-4, atol=1e-5)


def test_broken_view_falls_back_to_other(study_tree):
    with h5py.File(_run(study_tree), "r") as store:
        pair = [s.decode() for s in store["image_ids"][2]]
        assert pair == ["CXR3_IM-1384-1001", "CXR3_IM-1384-1001"]
        np.testing.assert_array_equal(store["pooled"][2, 0], store["pooled"][2, 1])


def test_views_differ_and_runs_repeat(study_tree):
    first = _run(study_tree, "first.h5")
    second = _run(study_tree, "second.h5")
    with h5py.File(first, "r") as a, h5py.File(second, "r") as b:
        assert not np.allclose(a["pooled"][0, 0], a["pooled"][0, 1])
        np.testing.assert_array_equal(a["spatial"][:], b["spatial"][:])


def test_no_temporary_files_left(study_tree):
    _run(study_tree)
    assert not list(study_tree.glob(".*tmp*"))


@pytest.fixture
def odd_tree(tmp_path):
    """Studies whose images are tiny, of unusual PNG modes, missing or over the pixel limit."""
    images = tmp_path / "images"
    images.mkdir()
    gray = np.random.default_rng(3).integers(0, 255, (40, 50), dtype=np.uint8)
    Image.fromarray(np.array([[17]], np.uint8)).save(images / "CXR1_IM-0001-1001.png")
    Image.fromarray(np.array([[230]], np.uint8)).save(images / "CXR1_IM-0001-2001.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "CXR2_IM-0002-1001.png")
    Image.fromarray(gray, "L").convert("RGBA").save(images / "CXR2_IM-0002-2001.png")
    Image.fromarray(gray, "L").convert("P").save(images / "CXR3_IM-0003-1001.png", transparency=0)
    Image.fromarray(gray, "L").convert("LA").save(images / "CXR3_IM-0003-2001.png")
    _write_png(images / "CXR4_IM-0004-1001.png", 4)
    _write_png(images / "CXR6_IM-0006-1001.png", 6)
    Image.new("1", (3000, 2000)).save(images / "CXR6_IM-0006-2001.png")
    pd.DataFrame(
        {
            "study_id": [f"CXR{n}_IM-000{n}" for n in range(1, 7)],
            "view_image_ids": [[f"CXR{n}_IM-000{n}-1001", f"CXR{n}_IM-000{n}-2001"] for n in range(1, 7)],
        }
    ).to_parquet(tmp_path / "studies.parquet")
    return tmp_path


def test_odd_images_kept_or_skipped(odd_tree, caplog):
    params = FeaturizeParams(weights="random", image_size=SIZE, batch_size=4, max_pixels=1_000_000)
    output = odd_tree / "chexnet.h5"

    with caplog.at_level("WARNING", logger="pipeline.featurize"):
        featurize.run(params, odd_tree / "studies.parquet", odd_tree / "images", odd_tree / "manifest.json", output)

    with h5py.File(output, "r") as store:
        study_ids = [s.decode() for s in store["study_id"][:]]
        assert study_ids == ["CXR1_IM-0001", "CXR2_IM-0002", "CXR3_IM-0003", "CXR4_IM-0004", "CXR6_IM-0006"]
        assert list(store["single_view"][:]) == [False, False, False, True, True]
        assert [s.decode() for s in store["image_ids"][3]] == ["CXR4_IM-0004-1001"] * 2
        assert np.isfinite(store["spatial"][:]).all()
        assert not np.allclose(store["pooled"][0, 0], store["pooled"][0, 1])
        assert not store.attrs["standin_images"]
    assert "skipped 4 of 12 images" in caplog.text
    assert "CXR4_IM-0004-2001.png: not a readable image" in caplog.text
    assert "3000x2000 pixels exceeds the limit of 1000000" in caplog.text
    assert "dropped 1 of 6 studies with no decodable image" in caplog.text
