"""PyTorch DenseNet-121 state dicts converted to Keras match PyTorch's own forward pass.

torchvision is not installed beside torch here, so the test defines DenseNet-121 with
torchvision's module names (features.conv0, features.denseblock1.denselayer1.norm1 ...,
features.norm5, classifier), which is what the converter reads.
"""

import re
import sys
from collections import OrderedDict

import numpy as np
import pytest

from pipeline.backbone import WeightsError, build_feature_extractor

torch = pytest.importorskip("torch")
nn = torch.nn

SIZE = 64
BLOCKS = (6, 12, 24, 16)
GROWTH = 32


class DenseLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, 4 * GROWTH, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * GROWTH)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * GROWTH, GROWTH, 3, padding=1, bias=False)

    def forward(self, inputs):
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(inputs))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, channels: int):
        super().__init__({f"denselayer{index + 1}": DenseLayer(channels + index * GROWTH) for index in range(layers)})

    def forward(self, inputs):
        features = [inputs]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNet121(nn.Module):
    """torchvision.models.densenet121 with the same parameter names."""

    def __init__(self, classes: int = 14):
        super().__init__()
        modules = OrderedDict(
            conv0=nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(64),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = 64
        for index, layers in enumerate(BLOCKS):
            modules[f"denseblock{index + 1}"] = DenseBlock(layers, channels)
            channels += layers * GROWTH
            if index < len(BLOCKS) - 1:
                modules[f"transition{index + 1}"] = nn.Sequential(
                    OrderedDict(norm=nn.BatchNorm2d(channels), relu=nn.ReLU(),
                                conv=nn.Conv2d(channels, channels // 2, 1, bias=False), pool=nn.AvgPool2d(2, 2))
                )
                channels //= 2
        modules["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(modules)
        self.classifier = nn.Linear(channels, classes)

    def feature_map(self, pixels):
        """The map Keras' layer 'relu' returns: (batch, 1024, s, s)."""
        return torch.relu(self.features(pixels))


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(3)
    model = DenseNet121().eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def _compare(backbone, model):
    pixels = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    keras_features = backbone(pixels).numpy()
    with torch.no_grad():
        torch_features = model.feature_map(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert keras_features.shape == torch_features.shape
    assert np.abs(torch_features).max() > 0.1, "features too small for the comparison to mean anything"
    np.testing.assert_allclose(keras_features, torch_features, rtol=0, atol=1e-4)


def test_state_dict_matches_torch_forward(tmp_path, torch_model):
    path = tmp_path / "densenet121.pth"
    torch.save(torch_model.state_dict(), path)
    backbone, info = build_feature_extractor(str(path), SIZE)
    _compare(backbone, torch_model)
    assert info.weights == "pytorch"
    assert info.head_classes == 14


def test_wrapped_checkpoint_is_converted_once(tmp_path, torch_model, monkeypatch):
    # A DataParallel checkpoint as public CheXNet reproductions save it, with the pre-0.3 "norm.1" names.
    state = {}
    for name, value in torch_model.state_dict().items():
        legacy = re.sub(r"(denselayer\d+)\.(norm|conv)([12])\.", r"\1.\2.\3.", name)
        state[f"module.densenet121.{legacy}"] = value
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in state
    state["module.densenet121.classifier.0.weight"] = state.pop("module.densenet121.classifier.weight")
    state["module.densenet121.classifier.0.bias"] = state.pop("module.densenet121.classifier.bias")
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 3, "state_dict": state}, path)
    converted = tmp_path / "converted"

    first, _ = build_feature_extractor(str(path), SIZE, converted)
    _compare(first, torch_model)
    assert len(list(converted.glob("*.h5"))) == 1

    monkeypatch.setitem(sys.modules, "torch", None)  # the cached conversion must load without torch
    second, _ = build_feature_extractor(str(path), SIZE, converted)
    for loaded, original in zip(second.weights, first.weights, strict=True):
        np.testing.assert_array_equal(loaded.numpy(), original.numpy())


def test_pickled_model_rejected(tmp_path, torch_model):
    path = tmp_path / "whole-model.pt"
    torch.save(torch_model, path)
    with pytest.raises(WeightsError, match="save model.state_dict"):
        build_feature_extractor(str(path), SIZE)


def test_foreign_state_dict_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"features.layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)}, path)
    with pytest.raises(WeightsError, match="not part of torchvision's DenseNet-121"):
        build_feature_extractor(str(path), SIZE)


def test_missing_torch_named_in_error(tmp_path, torch_model, monkeypatch):
    path = tmp_path / "densenet121.pth"
    torch.save(torch_model.state_dict(), path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(WeightsError, match=re.escape("pip install -c constraints.txt -e '.[torch]'")):
        build_feature_extractor(str(path), SIZE)
