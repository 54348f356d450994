"""Weight loading for the DenseNet-121 feature extractor."""

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from pipeline.backbone import FEATURE_LAYER, WeightsError, build_chexnet, build_feature_extractor, file_sha256

SIZE = 64


@pytest.fixture(scope="module")
def chexnet_file(tmp_path_factory):
    """A CheXNet-shaped classifier with seeded weights, saved in Keras' HDF5 weights layout."""
    keras.utils.set_random_seed(7)
    classifier = build_chexnet(SIZE)
    path = tmp_path_factory.mktemp("weights") / "chexnet.h5"
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, classifier)
    return path, classifier


def test_chexnet_file_gives_same_features(chexnet_file):
    path, classifier = chexnet_file
    backbone, info = build_feature_extractor(str(path), SIZE)
    reference = keras.Model(classifier.input, classifier.get_layer(FEATURE_LAYER).output)
    pixels = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(backbone(pixels).numpy(), reference(pixels).numpy(), atol=1e-5)
    assert info.weights == "chexnet"
    assert info.sha256 == file_sha256(path)
    assert not info.random


def test_random_weights_are_marked_and_seeded():
    first, info = build_feature_extractor("random", SIZE)
    second, _ = build_feature_extractor("random", SIZE)
    assert info.random
    assert info.sha256 is None
    pixels = np.ones((1, SIZE, SIZE, 3), np.float32)
    np.testing.assert_array_equal(first(pixels).numpy(), second(pixels).numpy())


def test_output_shape_at_224():
    backbone, _ = build_feature_extractor("random", 224)
    assert tuple(backbone.output.shape) == (None, 7, 7, 1024)


def test_wrong_file_names_expected_format(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("something", data=np.zeros(3))
    with pytest.raises(WeightsError, match=r"Dense\(14\) sigmoid head"):
        build_feature_extractor(str(path), SIZE)


def test_missing_file_names_choices(tmp_path):
    with pytest.raises(WeightsError, match="'imagenet' or 'random'"):
        build_feature_extractor(str(tmp_path / "absent.h5"), SIZE)
