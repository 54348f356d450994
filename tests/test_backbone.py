"""Weight loading for the DenseNet-121 feature extractor from Keras 2 HDF5 files.

The files are written with plain h5py in the layouts that Keras 2 wrote, from a Keras 3
model with known random weights, so the test does not depend on Keras' own writer.
"""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from pipeline.backbone import FEATURE_LAYER, WeightsError, build_chexnet, build_feature_extractor, file_sha256

SIZE = 64
# Keras 2's DenseNet named its stem layers with a slash; Keras 3 uses an underscore.
KERAS2_NAMES = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn", "conv1_relu": "conv1/relu"}


@pytest.fixture(scope="module")
def reference():
    """A CheXNet-shaped classifier whose every weight, BN statistics included, is random."""
    classifier = build_chexnet(SIZE)
    rng = np.random.default_rng(7)
    values = []
    for variable in classifier.weights:
        shape = tuple(variable.shape)
        if "moving_variance" in variable.path or "gamma" in variable.path:
            values.append(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            values.append(rng.normal(0, 0.1, shape).astype(np.float32))
    classifier.set_weights(values)
    backbone = keras.Model(classifier.input, classifier.get_layer(FEATURE_LAYER).output)
    return classifier, backbone


def _keras2_layers(classifier, suffix=""):
    """Yield (Keras 2 layer name, [(weight name, value)]) in layer order, weightless layers included."""
    for layer in classifier.layers:
        name = KERAS2_NAMES.get(layer.name, layer.name) + suffix
        variables = [*layer.trainable_weights, *layer.non_trainable_weights]
        yield name, [(f"{name}/{variable.name}:0", np.asarray(variable.numpy())) for variable in variables]


def _write_layer_group(root, layers):
    root.attrs["layer_names"] = np.array([name.encode() for name, _ in layers])
    for name, weights in layers:
        group = root.create_group(name)
        group.attrs["weight_names"] = np.array([weight_name.encode() for weight_name, _ in weights], dtype="S")
        for weight_name, value in weights:
            group.create_dataset(weight_name, data=value)


def write_keras2_file(path, classifier, layout, suffix=""):
    """Write ``classifier`` as Keras 2 did: save_weights ("weights"), model.save ("model") or a nested base."""
    layers = list(_keras2_layers(classifier, suffix))
    with h5py.File(path, "w") as handle:
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["keras_version"] = b"2.1.6"
        if layout == "weights":
            _write_layer_group(handle, layers)
        elif layout == "model":
            handle.attrs["model_config"] = json.dumps({"class_name": "Model", "config": {"name": "model_1"}}).encode()
            handle.attrs["training_config"] = json.dumps({"loss": "binary_crossentropy"}).encode()
            group = handle.create_group("model_weights")
            group.attrs["backend"] = b"tensorflow"
            group.attrs["keras_version"] = b"2.1.6"
            _write_layer_group(group, layers)
            handle.create_group("optimizer_weights")
        else:  # DenseNet-121 as one nested layer: its weights listed trainable first, then the BN statistics
            base = [pair for _, weights in layers[:-1] for pair in weights]
            trainable = [pair for pair in base if "moving_" not in pair[0]]
            statistics = [pair for pair in base if "moving_" in pair[0]]
            _write_layer_group(handle, [("input_1", []), ("densenet121", trainable + statistics), layers[-1]])


def _pixels():
    return np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("layout", ["weights", "model", "nested"])
def test_keras2_layouts_load_identical_weights(tmp_path, reference, layout):
    classifier, expected = reference
    path = tmp_path / "chexnet.h5"
    write_keras2_file(path, classifier, layout)
    backbone, info = build_feature_extractor(str(path), SIZE)
    for loaded, original in zip(backbone.weights, expected.weights, strict=True):
        np.testing.assert_array_equal(loaded.numpy(), original.numpy(), err_msg=loaded.path)
    np.testing.assert_array_equal(backbone(_pixels()).numpy(), expected(_pixels()).numpy())
    assert info.weights == "chexnet"
    assert info.head_classes == 14
    assert info.sha256 == file_sha256(path)
    assert not info.random


def test_renamed_layers_match_by_order(tmp_path, reference, caplog):
    classifier, expected = reference
    path = tmp_path / "renamed.weights"
    write_keras2_file(path, classifier, "weights", suffix="_1")
    with caplog.at_level("INFO"):
        backbone, _ = build_feature_extractor(str(path), SIZE)
    assert "matched by order" in caplog.text
    np.testing.assert_array_equal(backbone(_pixels()).numpy(), expected(_pixels()).numpy())


def test_wrong_architecture_names_expected_format(tmp_path, reference):
    classifier, _ = reference
    path = tmp_path / "short.h5"
    write_keras2_file(path, classifier, "weights")
    with h5py.File(path, "a") as handle:
        names = [name for name in handle.attrs["layer_names"] if name != b"conv5_block16_2_conv"]
        handle.attrs["layer_names"] = np.array(names)
    with pytest.raises(WeightsError, match=r"contains 603 weights, the model expects 604"):
        build_feature_extractor(str(path), SIZE)


def test_random_weights_are_marked_and_seeded():
    first, info = build_feature_extractor("random", SIZE)
    second, _ = build_feature_extractor("random", SIZE)
    assert info.random
    assert len(info.sha256) == 64
    pixels = np.ones((1, SIZE, SIZE, 3), np.float32)
    np.testing.assert_array_equal(first(pixels).numpy(), second(pixels).numpy())


def test_output_shape_at_224():
    backbone, _ = build_feature_extractor("random", 224)
    assert tuple(backbone.output.shape) == (None, 7, 7, 1024)


def test_hdf5_without_layer_names_rejected(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("something", data=np.zeros(3))
    with pytest.raises(WeightsError, match=r"Dense\(14\) sigmoid head"):
        build_feature_extractor(str(path), SIZE)


def test_keras3_weights_file_rejected(tmp_path):
    path = tmp_path / "model.weights.h5"
    keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)).save_weights(path)
    with pytest.raises(WeightsError, match="Keras 3 weights file"):
        build_feature_extractor(str(path), SIZE)


def test_keras_zip_rejected(tmp_path):
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"")
    with pytest.raises(WeightsError, match="Keras 3 .keras model file"):
        build_feature_extractor(str(path), SIZE)


def test_text_file_rejected(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("not weights")
    with pytest.raises(WeightsError, match="not a Keras 2 HDF5 weights file or a PyTorch state dict"):
        build_feature_extractor(str(path), SIZE)


def test_missing_file_names_choices(tmp_path):
    with pytest.raises(WeightsError, match="'imagenet' or 'random'"):
        build_feature_extractor(str(tmp_path / "absent.h5"), SIZE)


def test_layer_without_datasets_names_file(tmp_path, reference):
    classifier, _ = reference
    path = tmp_path / "hollow.h5"
    write_keras2_file(path, classifier, "weights")
    with h5py.File(path, "a") as handle:
        for weight_name in list(handle["conv1/conv"]):
            del handle["conv1/conv"][weight_name]
    with pytest.raises(WeightsError, match=r"hollow.h5: layer 'conv1/conv' lists the weight 'conv1/conv/kernel:0'") as caught:
        build_feature_extractor(str(path), SIZE)
    assert "Dense(14) sigmoid head saved by Keras 2" in str(caught.value)


def test_missing_layer_group_names_file(tmp_path, reference):
    classifier, _ = reference
    path = tmp_path / "no-group.h5"
    write_keras2_file(path, classifier, "weights")
    with h5py.File(path, "a") as handle:
        del handle["conv1/conv"]
    with pytest.raises(WeightsError, match=r"no-group.h5: layer_names lists 'conv1/conv'"):
        build_feature_extractor(str(path), SIZE)


def test_truncated_file_names_file(tmp_path, reference):
    classifier, _ = reference
    path = tmp_path / "cut.h5"
    write_keras2_file(path, classifier, "weights")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"cut.h5: unreadable HDF5 file, probably truncated") as caught:
        build_feature_extractor(str(path), SIZE)
    assert "Dense(14) sigmoid head saved by Keras 2" in str(caught.value)
