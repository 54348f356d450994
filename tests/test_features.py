"""The features reader: random access by study id, batch reads and the tf.data input."""

import h5py
import numpy as np
import pytest
from test_featurize import make_tree, run_stage

from pipeline.features import FeatureStoreError, open_features


@pytest.fixture(scope="module")
def features_path(tmp_path_factory):
    output, _ = run_stage(make_tree(tmp_path_factory.mktemp("reader")))
    return output


def test_study_by_id(features_path):
    with open_features(features_path) as store, h5py.File(features_path, "r") as raw:
        study = store["CXR2_IM-0652"]
        np.testing.assert_array_equal(study.pooled, raw["pooled"][1])
        np.testing.assert_array_equal(study.spatial, raw["spatial"][1])
        assert study.image_ids == ("CXR2_IM-0652-1001", "CXR2_IM-0652-1001")
        assert study.single_view


def test_membership_and_get(features_path):
    with open_features(features_path) as store:
        assert len(store) == 3
        assert list(store) == store.study_ids == ["CXR1_1_IM-0001", "CXR2_IM-0652", "CXR3_IM-1384"]
        assert "CXR4_IM-2050" not in store
        assert store.get("CXR4_IM-2050") is None
        with pytest.raises(KeyError, match="CXR4_IM-2050"):
            store["CXR4_IM-2050"]


def test_attributes(features_path):
    with open_features(features_path) as store:
        assert store.attrs["weights"] == "random"
        assert store.attrs["random_weights"] is True
        assert store.dataset_attrs("spatial")["dimensions"] == "study, view*cell, channel"


def test_read_keeps_requested_order(features_path):
    with open_features(features_path) as store:
        order = ["CXR3_IM-1384", "CXR1_1_IM-0001", "CXR3_IM-1384"]
        values = store.read(order, "spatial")
        assert values.shape == (3, 8, 1024)
        for row, study_id in enumerate(order):
            np.testing.assert_array_equal(values[row], store[study_id].spatial)


def test_tf_dataset_matches_read(features_path):
    with open_features(features_path) as store:
        order = ["CXR2_IM-0652", "CXR1_1_IM-0001"]
        dataset = store.tf_dataset(order, "pooled")
        expected = store.read(order, "pooled")
    streamed = np.stack([element.numpy() for element in dataset])
    assert streamed.dtype == np.float32
    np.testing.assert_array_equal(streamed, expected.astype(np.float32))


def test_unknown_kind_and_missing_file(features_path, tmp_path):
    with open_features(features_path) as store:
        with pytest.raises(ValueError, match="feature kind"):
            store.read(["CXR2_IM-0652"], "global")
    with pytest.raises(FeatureStoreError, match="dvc repro featurize"):
        open_features(tmp_path / "absent.h5")


def test_file_without_view_datasets(tmp_path):
    path = tmp_path / "older.h5"
    with h5py.File(path, "w") as raw:
        raw["study_id"] = np.array([b"CXR1_IM-0001"])
        raw["pooled"] = np.ones((1, 2, 1024), np.float16)
    with open_features(path) as store:
        assert store.read(["CXR1_IM-0001"], "pooled").shape == (1, 2, 1024)
        with pytest.raises(FeatureStoreError, match="no 'spatial' dataset"):
            store.read(["CXR1_IM-0001"], "spatial")
