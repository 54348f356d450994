"""Convert a PyTorch DenseNet-121 state dict (torchvision's parameter names) to Keras weights.

Public PyTorch CheXNet reproductions and torchxrayvision publish
``torchvision.models.densenet121`` state dicts: ``features.conv0.weight``,
``features.denseblock1.denselayer1.norm1.weight`` ... ``features.norm5.*`` and
``classifier.*``. Checkpoints saved from ``nn.DataParallel`` or a wrapper module add a
prefix such as ``module.densenet121.``, and torchvision before 0.3 wrote ``norm.1`` for
``norm1``; both are accepted. torch is imported only here, and only to read the file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from pipeline.keras_h5 import WeightsError

logger = logging.getLogger(__name__)

# torchvision's BatchNorm2d uses eps=1e-5; Keras' DenseNet-121 uses 1.001e-5.
TORCH_BATCHNORM_EPSILON = 1e-5
BATCHNORM_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_LEGACY_NAME = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_DENSE_LAYER = re.compile(r"^features\.denseblock(\d)\.denselayer(\d+)\.(norm1|conv1|norm2|conv2)\.(\w+)$")
_TRANSITION = re.compile(r"^features\.transition(\d)\.(norm|conv)\.(\w+)$")
_STEM = re.compile(r"^features\.(conv0|norm0|norm5)\.(\w+)$")
_CLASSIFIER = re.compile(r"^classifier(?:\.\d+)?\.(weight|bias)$")
_DENSE_LAYER_PARTS = {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn", "conv2": "2_conv"}
_STEM_LAYERS = {"conv0": "conv1_conv", "norm0": "conv1_bn", "norm5": "bn"}


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Load a state dict as float32 arrays with torch's safe ``weights_only`` unpickler.

    Accepts a bare state dict or a checkpoint dict with a ``state_dict`` or
    ``model_state_dict`` entry. Raises WeightsError when torch is missing or the file
    contains a whole pickled model.
    """
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: a PyTorch file, and torch is not installed; install it from the repository root with "
            "pip install -c constraints.txt -e '.[torch]' (the converted weights are cached, so later runs "
            "do not need torch)"
        ) from None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others depending on the file.
        raise WeightsError(
            f"{path}: could not be read as a PyTorch state dict ({type(error).__name__}: {str(error)[:300]}). "
            "Whole pickled models are not loaded for safety; save model.state_dict() with torch.save instead"
        ) from None
    for key in ("state_dict", "model_state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict) or not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, found {type(content).__name__}")
    return {str(name): value.detach().to(torch.float32).numpy() for name, value in content.items()}


def keras_weights_from_state_dict(state: dict[str, np.ndarray], source: str) -> tuple[list[tuple[str, np.ndarray]], int]:
    """Map torchvision DenseNet-121 parameters to Keras ``layer/weight`` names and layouts.

    Convolution kernels go from (out, in, h, w) to Keras' (h, w, in, out) and the
    classifier from (classes, 1024) to (1024, classes). Returns the backbone pairs and
    the classifier's class count (0 without a classifier); ``num_batches_tracked`` and
    parameters outside ``features`` and ``classifier`` are skipped.
    """
    pairs: list[tuple[str, np.ndarray]] = []
    classes = 0
    skipped: list[str] = []
    for raw_name, value in state.items():
        name = _torchvision_name(raw_name)
        if name is None or name.endswith("num_batches_tracked"):
            skipped.append(raw_name)
            continue
        if _CLASSIFIER.match(name):
            classes = value.shape[0] if value.ndim == 2 else classes
            continue
        keras_name = _keras_name(name)
        if keras_name is None:
            raise WeightsError(f"{source}: parameter {raw_name} is not part of torchvision's DenseNet-121")
        pairs.append((keras_name, np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value))
    if skipped:
        logger.info("%s: skipped %d parameters outside the network, e.g. %s", source, len(skipped), skipped[0])
    return pairs, classes


def _torchvision_name(name: str) -> str | None:
    for anchor in ("features.", "classifier."):
        position = name.find(anchor)
        if position == 0 or (position > 0 and name[position - 1] == "."):
            name = name[position:]
            break
    else:
        return None
    legacy = _LEGACY_NAME.match(name)
    return legacy.group(1) + legacy.group(2) if legacy else name


def _keras_name(name: str) -> str | None:
    if match := _DENSE_LAYER.match(name):
        block, layer, part, parameter = match.groups()
        return _weight(f"conv{int(block) + 1}_block{layer}_{_DENSE_LAYER_PARTS[part]}", parameter)
    if match := _TRANSITION.match(name):
        transition, part, parameter = match.groups()
        return _weight(f"pool{int(transition) + 1}_{'bn' if part == 'norm' else 'conv'}", parameter)
    if match := _STEM.match(name):
        part, parameter = match.groups()
        return _weight(_STEM_LAYERS[part], parameter)
    return None


def _weight(layer: str, parameter: str) -> str | None:
    if layer.endswith("conv"):
        return f"{layer}/kernel" if parameter == "weight" else None
    return f"{layer}/{BATCHNORM_NAMES[parameter]}" if parameter in BATCHNORM_NAMES else None
