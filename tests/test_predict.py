"""cxrgen predict: the feature store's features, greedy decoding, JSON output and attention maps."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from keras.src.legacy.saving import legacy_h5_format
from PIL import Image
from trained_artifacts import IMAGE_SIZE, SINGLE_VIEW_STUDIES, save_untrained

from pipeline.backbone import build_chexnet, file_sha256
from pipeline.cli import main
from pipeline.decoding import greedy_decode
from pipeline.errors import PipelineError
from pipeline.predict import ArtifactError, Artifacts, ReportPredictor, load_predictor


def _stored_study(workspace, row):
    """Return the view files, single_view flag, and spatial features (98, 1024) of a stored study."""
    with h5py.File(workspace / "features" / "chexnet.h5", "r") as store:
        image_ids = [value.decode() for value in store["image_ids"][row]]
        single_view = bool(store["single_view"][row])
        spatial = store["spatial"][row]
    images = workspace / "data" / "raw" / "images"
    return [images / f"{image_id}.png" for image_id in image_ids], single_view, spatial


def _assert_same_features(predicted, stored):
    """Features must be bit-identical: prediction runs the stage's extractor, padded batches included."""
    assert predicted.dtype == stored.dtype == np.float16
    np.testing.assert_array_equal(predicted, stored)


def _nih(shared_data, index=0):
    return sorted((shared_data / "nih-cxr-sample").glob("*.png"))[-1 - index]


def test_features_equal_feature_store_for_two_views(trained_workspace, predictor):
    paths, single_view, stored = _stored_study(trained_workspace, SINGLE_VIEW_STUDIES)
    features, predicted_single = predictor.features(*paths)
    assert not single_view
    assert not predicted_single
    _assert_same_features(features, stored)


def test_single_image_is_used_as_both_views(trained_workspace, predictor):
    paths, single_view, stored = _stored_study(trained_workspace, 0)
    assert single_view
    assert paths[0] == paths[1]
    features, predicted_single = predictor.features(paths[0])
    assert predicted_single
    _assert_same_features(features, stored)
    np.testing.assert_array_equal(features[:49], features[49:])


def test_report_equals_greedy_decode(trained_workspace, predictor):
    paths, _, stored = _stored_study(trained_workspace, SINGLE_VIEW_STUDIES + 1)
    prediction = predictor.predict(*paths)
    expected = greedy_decode(predictor.model, stored[None], predictor.tokenizer.max_length - 1).token_ids[0]
    assert prediction.words == predictor.tokenizer.decode(expected)
    assert prediction.token_ids == expected[: len(prediction.words)].tolist()
    assert len(prediction.words) > 3
    assert all(score <= 0 for score in prediction.log_probs)
    assert prediction.attention.shape == (len(prediction.words), 98)
    np.testing.assert_allclose(prediction.attention.sum(axis=1), 1.0, rtol=1e-5)


def test_cli_json_and_attention_maps(trained_workspace, predictor, shared_data, tmp_path):
    frontal, lateral = _nih(shared_data, 0), _nih(shared_data, 1)
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "99_earlier-report.png").write_bytes(b"map of an earlier report")
    (maps / "notes.txt").write_text("kept")
    result = CliRunner().invoke(
        main, ["predict", str(frontal), str(lateral), "--repo", str(trained_workspace), "--json", "--attention", str(maps)]
    )
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)
    expected = predictor.predict(frontal, lateral)
    assert output["report"] == expected.report
    assert [token["word"] for token in output["tokens"]] == expected.words
    assert [token["id"] for token in output["tokens"]] == expected.token_ids
    assert output["scores"]["log_prob"] == pytest.approx(sum(expected.log_probs), abs=1e-4)
    assert output["single_view"] is False
    assert output["model"] == "spatial"
    assert result.stderr.count("RANDOM WEIGHTS") == 1, result.stderr
    assert any("STAND-IN IMAGES" in warning for warning in output["warnings"])

    written = sorted(maps.glob("*.png"))
    assert [str(path) for path in written] == output["attention_maps"]
    assert (maps / "notes.txt").read_text() == "kept"
    assert len(written) == len(expected.words)
    assert written[0].name == f"01_{expected.words[0]}.png"
    with Image.open(written[0]) as image:
        assert image.format == "PNG"
        assert image.width > 2 * 256


def test_cli_prints_report_line(trained_workspace, predictor, shared_data):
    frontal = _nih(shared_data, 2)
    result = CliRunner().invoke(main, ["predict", str(frontal), "--repo", str(trained_workspace)])
    assert result.exit_code == 0, result.output
    assert result.stdout == predictor.predict(frontal).report + "\n"
    assert "single view" in result.stderr


def test_attention_needs_attention_model(trained_workspace, shared_data, tmp_path):
    workspace = save_untrained(tmp_path / "simple", trained_workspace, "simple", {"units": 8})
    result = CliRunner().invoke(
        main, ["predict", str(_nih(shared_data)), "--repo", str(workspace), "--attention", str(tmp_path / "maps")]
    )
    assert result.exit_code == 1
    assert "the simple model has no attention" in result.stderr
    assert not (tmp_path / "maps").exists()


def test_pooled_attention_model_writes_maps(trained_workspace, shared_data, tmp_path):
    workspace = save_untrained(tmp_path / "attention", trained_workspace, "attention", {"units": 8, "attention_units": 4})
    maps = tmp_path / "maps"
    result = CliRunner().invoke(
        main, ["predict", str(_nih(shared_data)), "--repo", str(workspace), "--attention", str(maps), "--json"]
    )
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)
    assert output["model"] == "attention"
    assert len(list(maps.glob("*.png"))) == len(output["tokens"])


def test_missing_artifacts_name_the_fix(tmp_path, shared_data):
    result = CliRunner().invoke(main, ["predict", str(_nih(shared_data)), "--repo", str(tmp_path)])
    assert result.exit_code == 1
    assert "models/model.keras: not found; run `dvc repro`" in result.stderr


@pytest.mark.parametrize("cut", [0, 5000], ids=["empty", "truncated"])
def test_broken_model_file_is_named(trained_workspace, shared_data, tmp_path, cut):
    workspace = tmp_path / "broken"
    (workspace / "models").mkdir(parents=True)
    (workspace / "models" / "model.keras").write_bytes((trained_workspace / "models" / "model.keras").read_bytes()[:cut])
    (workspace / "models" / "model.json").symlink_to(trained_workspace / "models" / "model.json")
    (workspace / "data").mkdir()
    (workspace / "data" / "text").symlink_to(trained_workspace / "data" / "text")
    result = CliRunner().invoke(main, ["predict", str(_nih(shared_data)), "--repo", str(workspace)])
    assert result.exit_code == 1
    assert "models/model.keras: not a .keras archive" in result.stderr
    assert "dvc checkout models/model.keras" in result.stderr
    assert "Traceback" not in result.output


def test_unreadable_image_is_named(trained_workspace, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["predict", str(broken), "--repo", str(trained_workspace)])
    assert result.exit_code == 1
    assert f"{broken}: not a readable image" in result.stderr


def test_unknown_experiment_is_an_error(trained_workspace, tmp_path):
    with pytest.raises(ArtifactError, match="experiment 'no-such-run'"):
        Artifacts.from_experiment("no-such-run", trained_workspace, tmp_path)


@pytest.fixture
def chexnet_workspace(trained_workspace, tmp_path):
    """The trained model with a model.json that names CheXNet weights at 64 px."""
    weights = tmp_path / "chexnet.h5"
    _save_keras2_weights(build_chexnet(64), weights)
    workspace = tmp_path / "chexnet"
    (workspace / "models").mkdir(parents=True)
    (workspace / "models" / "model.keras").symlink_to(trained_workspace / "models" / "model.keras")
    (workspace / "data").mkdir()
    (workspace / "data" / "text").symlink_to(trained_workspace / "data" / "text")
    info = json.loads((trained_workspace / "models" / "model.json").read_text())
    info["features"].update({"weights": "chexnet", "weights_source": str(weights), "weights_sha256": file_sha256(weights),
                             "random_weights": False, "standin_images": False, "image_size": 64})
    (workspace / "models" / "model.json").write_text(json.dumps(info))
    return workspace, weights


def _save_keras2_weights(model, path):
    """Save weights in the HDF5 layout of Keras 2's save_weights, the layout CheXNet files use."""
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


def test_chexnet_weights_are_checked(chexnet_workspace, shared_data, tmp_path):
    workspace, weights = chexnet_workspace
    loaded = ReportPredictor.load(Artifacts.from_workspace(workspace))
    assert loaded.settings.warnings() == []
    assert loaded.predict(_nih(shared_data)).words

    other = tmp_path / "other.h5"
    _save_keras2_weights(build_chexnet(64), other)
    with pytest.raises(PipelineError, match="pass --weights with the file that featurize used"):
        load_predictor(workspace, weights=str(other))


def test_image_size_comes_from_model_json(predictor):
    assert predictor.settings.image_size == IMAGE_SIZE
    assert predictor.settings.random_weights
