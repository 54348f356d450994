"""The featurize stage on small generated trees of studies and images."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT
from PIL import Image

from pipeline import featurize
from pipeline.config import FeaturizeParams
from pipeline.feature_cache import CacheError, FeatureCache

SIZE = 64  # 2x2 feature cells per view keeps the test fast; 224 gives 7x7
PARAMS = FeaturizeParams(weights="random", image_size=SIZE, batch_size=2, storage_dtype="float32")
STUDIES = {
    "CXR1_1_IM-0001": ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
    "CXR2_IM-0652": ["CXR2_IM-0652-1001", "CXR2_IM-0652-1001"],
    "CXR3_IM-1384": ["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"],
    "CXR4_IM-2050": ["CXR4_IM-2050-1001", "CXR4_IM-2050-1001"],
}


def write_png(path, seed, size=(96, 80)):
    pixels = np.random.default_rng(seed).integers(0, 255, size[::-1], dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_studies(tree, studies):
    table = pd.DataFrame(
        {"study_id": list(studies), "report_id": range(1, len(studies) + 1), "view_image_ids": list(studies.values())}
    )
    table.to_parquet(tree / "studies.parquet")


def make_tree(tree):
    images = tree / "images"
    images.mkdir(parents=True)
    for seed, image_id in enumerate(["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]):
        write_png(images / f"{image_id}.png", seed)
    write_png(images / "CXR3_IM-1384-1001.png", 9)
    (images / "CXR3_IM-1384-2001.png").write_bytes(b"not a png")
    (images / "CXR4_IM-2050-1001.png").write_bytes(b"")
    write_studies(tree, STUDIES)
    (tree / "manifest.json").write_text(json.dumps({"standin_images": True}))
    return tree


@functools.cache
def featurizer(params):
    """One model per parameter set for the whole module; building and tracing it takes seconds."""
    return featurize.Featurizer(params)


def run_stage(tree, name="chexnet.h5", params=PARAMS, cache="cache"):
    output = tree / name
    summary = featurizer(params).run(tree / "studies.parquet", tree / "images", tree / "manifest.json", output, tree / cache)
    return output, summary


def read_all(path):
    with h5py.File(path, "r") as store:
        return {name: store[name][:] for name in store}, dict(store.attrs)


@pytest.fixture(scope="module")
def stage_output(tmp_path_factory):
    tree = make_tree(tmp_path_factory.mktemp("tree"))
    output, summary = run_stage(tree)
    return tree, output, summary


def test_schema_and_shapes(stage_output):
    _, output, _ = stage_output
    with h5py.File(output, "r") as store:
        assert [s.decode() for s in store["study_id"][:]] == ["CXR1_1_IM-0001", "CXR2_IM-0652", "CXR3_IM-1384"]
        assert store["pooled"].shape == (3, 2, 1024)
        assert store["spatial"].shape == (3, 8, 1024)
        assert store["image_ids"].shape == (3, 2)
        assert store["image_sha256"].shape == (3, 2)
        assert list(store["single_view"][:]) == [False, True, True]
        assert store.attrs["random_weights"]
        assert store.attrs["standin_images"]
        assert "RANDOM WEIGHTS" in store.attrs["warning"]
        assert "0.485" in store.attrs["normalisation"]
        assert store.attrs["precision"] == "float32"


def test_every_dataset_described(stage_output):
    _, output, _ = stage_output
    with h5py.File(output, "r") as store:
        for name, dataset in store.items():
            assert dataset.attrs["description"], name
            assert len(dataset.attrs["dimensions"].split(",")) == dataset.ndim, name


def test_one_chunk_per_study(stage_output):
    _, output, _ = stage_output
    with h5py.File(output, "r") as store:
        assert store["spatial"].chunks == (1, 8, 1024)
        assert store["pooled"].chunks[1:] == (2, 1024)
        assert store["spatial"].compression is None


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression_keeps_values(stage_output, compression):
    tree, output, _ = stage_output
    compressed, summary = run_stage(tree, f"{compression}.h5", params=PARAMS.model_copy(update={"compression": compression}))
    assert summary.computed == 0
    plain_data, _ = read_all(output)
    compressed_data, attrs = read_all(compressed)
    assert attrs["compression"] == compression
    with h5py.File(compressed, "r") as store:
        assert store["spatial"].compression == compression
    for name, values in plain_data.items():
        np.testing.assert_array_equal(compressed_data[name], values, err_msg=name)


def test_pooled_is_mean_of_spatial(stage_output):
    _, output, _ = stage_output
    with h5py.File(output, "r") as store:
        spatial = store["spatial"][0].reshape(2, 4, 1024)
        np.testing.assert_allclose(store["pooled"][0], spatial.mean(axis=1), rtol=1e-4, atol=1e-5)


def test_broken_view_falls_back_to_other(stage_output):
    _, output, summary = stage_output
    with h5py.File(output, "r") as store:
        pair = [s.decode() for s in store["image_ids"][2]]
        assert pair == ["CXR3_IM-1384-1001", "CXR3_IM-1384-1001"]
        np.testing.assert_array_equal(store["pooled"][2, 0], store["pooled"][2, 1])
    assert summary.failed == 2
    assert summary.written == 3


def test_views_differ(stage_output):
    _, output, _ = stage_output
    with h5py.File(output, "r") as store:
        assert not np.allclose(store["pooled"][0, 0], store["pooled"][0, 1])


def test_no_temporary_files_left(stage_output):
    tree, _, _ = stage_output
    assert not list(tree.rglob(".*tmp*"))


def test_rerun_computes_nothing_and_repeats(stage_output):
    tree, output, first = stage_output
    again, summary = run_stage(tree, "again.h5")
    assert first.computed == 6
    assert summary.computed == 0
    assert summary.cached == 6
    first_data, first_attrs = read_all(output)
    second_data, second_attrs = read_all(again)
    assert first_attrs == second_attrs
    for name, values in first_data.items():
        np.testing.assert_array_equal(values, second_data[name], err_msg=name)
    assert output.read_bytes() == again.read_bytes()


def test_new_studies_compute_only_new_images(tmp_path):
    tree = make_tree(tmp_path)
    run_stage(tree)
    write_png(tree / "images" / "CXR5_IM-3000-1001.png", 20)
    write_png(tree / "images" / "CXR5_IM-3000-2001.png", 21)
    write_studies(tree, {**STUDIES, "CXR5_IM-3000": ["CXR5_IM-3000-1001", "CXR5_IM-3000-2001"]})

    output, summary = run_stage(tree)
    assert summary.computed == 2
    assert summary.cached == 6
    assert summary.written == 4

    scratch, from_scratch = run_stage(tree, "scratch.h5", cache="fresh-cache")
    assert from_scratch.computed == 8
    incremental_data, _ = read_all(output)
    scratch_data, _ = read_all(scratch)
    for name, values in scratch_data.items():
        np.testing.assert_array_equal(incremental_data[name], values, err_msg=name)


def test_changed_settings_recompute(tmp_path):
    tree = make_tree(tmp_path)
    run_stage(tree)
    _, summary = run_stage(tree, params=PARAMS.model_copy(update={"storage_dtype": "float16"}))
    assert summary.computed == 6
    assert len([folder for folder in (tree / "cache").iterdir() if (folder / "index.sqlite").exists()]) == 2


def test_changed_image_content_recomputes(tmp_path):
    tree = make_tree(tmp_path)
    run_stage(tree)
    write_png(tree / "images" / "CXR2_IM-0652-1001.png", 99)
    _, summary = run_stage(tree)
    assert summary.computed == 1


def test_reader_of_old_file_keeps_working(tmp_path):
    tree = make_tree(tmp_path)
    output, _ = run_stage(tree)
    write_studies(tree, dict(list(STUDIES.items())[:2]))
    with h5py.File(output, "r") as old:
        old_pooled = old["pooled"][:]
        run_stage(tree)
        np.testing.assert_array_equal(old["pooled"][:], old_pooled)
        assert len(old["study_id"]) == 3
    with h5py.File(output, "r") as new:
        assert len(new["study_id"]) == 2


def test_second_writer_is_rejected(tmp_path):
    tree = make_tree(tmp_path)
    output, _ = run_stage(tree)
    description = featurizer(PARAMS).description
    with FeatureCache(tree / "cache", description, 4, "float32", None):
        with pytest.raises(CacheError, match="another featurize run"):
            run_stage(tree, "second.h5")


def test_stale_temporary_output_removed(tmp_path):
    tree = make_tree(tmp_path)
    stale = tree / ".chexnet.h5.abc123.tmp.h5"
    stale.write_bytes(b"half-written by a killed run")
    run_stage(tree)
    assert not stale.exists()
    assert (tree / "chexnet.h5").exists()


def test_lost_shard_is_recomputed(tmp_path):
    tree = make_tree(tmp_path)
    run_stage(tree)
    (shard_dir,) = (tree / "cache").glob("*/shards")
    lost = sorted(shard_dir.glob("*.h5"))[0]
    lost.unlink()
    _, summary = run_stage(tree)
    assert summary.computed == 2


def test_empty_study_table(tmp_path):
    tree = make_tree(tmp_path)
    write_studies(tree, {"CXR4_IM-2050": ["CXR4_IM-2050-1001", "CXR4_IM-2050-1001"]})
    output, summary = run_stage(tree)
    assert summary.written == 0
    with h5py.File(output, "r") as store:
        assert store["spatial"].shape == (0, 8, 1024)


def test_missing_image_file_is_skipped(tmp_path):
    tree = make_tree(tmp_path)
    (tree / "images" / "CXR2_IM-0652-1001.png").unlink()
    _, summary = run_stage(tree)
    assert summary.written == 2
    assert summary.failed == 3


def test_identical_broken_images_logged_with_own_paths(tmp_path, caplog):
    tree = make_tree(tmp_path)
    images = tree / "images"
    (images / "CXR5_IM-0001-1001.png").write_bytes(b"not a png")  # the same bytes as CXR3_IM-1384-2001.png
    write_png(images / "CXR5_IM-0001-2001.png", 5)
    write_studies(tree, {**STUDIES, "CXR5_IM-0001": ["CXR5_IM-0001-1001", "CXR5_IM-0001-2001"]})

    with caplog.at_level("WARNING", logger="pipeline.featurize"):
        run_stage(tree)

    lines = {image_id: [line for line in caplog.text.splitlines() if f"skipped {image_id} " in line]
             for image_id in ("CXR3_IM-1384-2001", "CXR5_IM-0001-1001")}
    for image_id, found in lines.items():
        assert len(found) == 1, caplog.text
        assert f"({images / image_id}.png): not a readable image" in found[0]
        assert found[0].count(".png") == 1, found[0]


def _project(root, images):
    """A folder laid out as the CLI expects, with ``images`` distinct radiographs in two-view studies."""
    (root / "data/interim").mkdir(parents=True)
    (root / "data/raw/images").mkdir(parents=True)
    ids = [f"CXR{index // 2 + 1}_IM-{index // 2:04d}-{index % 2 + 1}001" for index in range(images)]
    for seed, image_id in enumerate(ids):
        write_png(root / "data/raw/images" / f"{image_id}.png", 100 + seed)
    studies = {image_id.rsplit("-", 1)[0]: [ids[index], ids[index + 1]] for index, image_id in enumerate(ids) if index % 2 == 0}
    write_studies(root / "data/interim", studies)
    (root / "data/raw/manifest.json").write_text("{}")
    (root / "params.yaml").write_text(
        "featurize:\n  weights: random\n  image_size: 224\n  batch_size: 2\n  storage_dtype: float32\n"
    )


def _featurize_command(root):
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "featurize"], cwd=root, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finished_shard_images(root):
    count = 0
    for shard in (root / "features/cache").glob("*/shards/[0-9]*.h5"):
        with h5py.File(shard, "r") as store:
            count += len(store["sha256"])
    return count


def test_killed_run_resumes_from_finished_batches(tmp_path):
    images = 40
    _project(tmp_path, images)
    first = _featurize_command(tmp_path)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "features/cache").glob("*/shards/[0-9]*.h5"))) < 3:
        assert first.poll() is None, f"the run ended before it could be killed:\n{first.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no batch finished within 300 s"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.communicate()

    assert not (tmp_path / "features/chexnet.h5").exists()
    finished = _finished_shard_images(tmp_path)
    assert 0 < finished < images

    second = _featurize_command(tmp_path)
    _, log = second.communicate(timeout=600)
    assert second.returncode == 0, log[-3000:]
    assert f"{images} distinct by content (sha256): {finished} cached, {images - finished} to compute" in log

    params = FeaturizeParams(weights="random", image_size=224, batch_size=2, storage_dtype="float32")
    reference = tmp_path / "reference.h5"
    data = tmp_path / "data"
    featurize.run(params, data / "interim/studies.parquet", data / "raw/images", data / "raw/manifest.json",
                  reference, tmp_path / "reference-cache")
    resumed_data, resumed_attrs = read_all(tmp_path / "features/chexnet.h5")
    reference_data, reference_attrs = read_all(reference)
    assert resumed_attrs == reference_attrs
    for name, values in reference_data.items():
        np.testing.assert_array_equal(resumed_data[name], values, err_msg=name)


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
    write_png(images / "CXR4_IM-0004-1001.png", 4)
    write_png(images / "CXR6_IM-0006-1001.png", 6)
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
        featurize.run(
            params, odd_tree / "studies.parquet", odd_tree / "images", odd_tree / "manifest.json", output,
            odd_tree / "cache",
        )

    with h5py.File(output, "r") as store:
        study_ids = [s.decode() for s in store["study_id"][:]]
        assert study_ids == ["CXR1_IM-0001", "CXR2_IM-0002", "CXR3_IM-0003", "CXR4_IM-0004", "CXR6_IM-0006"]
        assert list(store["single_view"][:]) == [False, False, False, True, True]
        assert [s.decode() for s in store["image_ids"][3]] == ["CXR4_IM-0004-1001"] * 2
        assert np.isfinite(store["spatial"][:]).all()
        assert not np.allclose(store["pooled"][0, 0], store["pooled"][0, 1])
        assert not store.attrs["standin_images"]
    assert "skipped 3 image files that do not exist" in caplog.text
    assert "CXR4_IM-0004-2001" in caplog.text
    assert "skipped 1 of 12 images that could not be decoded" in caplog.text
    assert "3000x2000 pixels exceeds the limit of 1000000" in caplog.text
    assert "dropped 1 of 6 studies with no decodable image" in caplog.text
