"""The DenseNet-121 feature extractor and the ways to get its weights.

``featurize.weights`` selects the weights:

* a path to CheXNet weights as commonly shared for Keras: DenseNet-121 plus a
  ``Dense(14, sigmoid)`` head in the HDF5 layout that Keras 2 wrote, from
  ``save_weights`` or ``model.save`` (see :mod:`pipeline.keras_h5`);
* a path to a PyTorch DenseNet-121 state dict with torchvision's parameter names, as
  public PyTorch CheXNet reproductions publish (see :mod:`pipeline.torch_densenet`). It is
  converted once and the Keras weights are cached;
* ``imagenet``: Keras downloads its own ImageNet DenseNet-121 weights (needs internet once);
* ``random``: seeded random weights. Features from them carry no image information,
  and every artifact made from them says so.

The file format is read from the file's first bytes, not from its name.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np

from pipeline.atomic import atomic_path
from pipeline.keras_h5 import HDF5_SIGNATURE, WeightsError, assign_weights, read_legacy_weights, split_head

logger = logging.getLogger(__name__)

__all__ = ["WeightsError", "BackboneInfo", "build_feature_extractor", "build_chexnet", "file_sha256"]

FEATURE_LAYER = "relu"  # the final BN + ReLU of DenseNet-121: (7, 7, 1024) at 224x224 input
CHEXNET_CLASSES = 14
RANDOM_SEED = 0
RANDOM_WARNING = "RANDOM WEIGHTS: features carry no image information; scores measure the text prior only"
# Bump when the PyTorch conversion changes, so cached conversions are redone.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class BackboneInfo:
    """Provenance of a set of features: weights kind, source and sha256, recorded downstream."""

    weights: str  # "chexnet" (Keras HDF5), "pytorch", "imagenet" or "random"
    source: str  # the file path, the Keras cache file, or "seed=0"
    sha256: str  # of the weights file; for random weights, of the seed, architecture and Keras version
    random: bool
    head_classes: int = 0  # outputs of the classifier head found in the file, 0 when it had none


def file_sha256(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def build_feature_extractor(
    weights: str, image_size: int, converted_dir: Path | None = None
) -> tuple[keras.Model, BackboneInfo]:
    """Build DenseNet-121 that maps (batch, size, size, 3) to (batch, s, s, 1024), s = size / 32.

    ``converted_dir`` keeps PyTorch weights converted to Keras, named by the source
    file's sha256; without it they are converted on every call.
    """
    if weights == "random":
        return _random_backbone(image_size)
    if weights == "imagenet":
        return _imagenet_backbone(image_size)
    return _file_backbone(Path(weights), image_size, converted_dir)


def _densenet(image_size: int) -> keras.Model:
    return keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(image_size, image_size, 3))


def _random_backbone(image_size: int) -> tuple[keras.Model, BackboneInfo]:
    logger.info("building DenseNet-121 with random weights (seed %d), as featurize.weights=random asks", RANDOM_SEED)
    keras.utils.set_random_seed(RANDOM_SEED)
    backbone = _densenet(image_size)
    identity = f"DenseNet-121 random seed={RANDOM_SEED} keras={keras.__version__}"
    return backbone, BackboneInfo("random", f"seed={RANDOM_SEED}", hashlib.sha256(identity.encode()).hexdigest(), True)


def _imagenet_backbone(image_size: int) -> tuple[keras.Model, BackboneInfo]:
    try:
        backbone = keras.applications.DenseNet121(
            include_top=False, weights="imagenet", input_shape=(image_size, image_size, 3)
        )
    except Exception as error:  # Keras raises a bare Exception when the download fails.
        raise WeightsError(
            f"could not download Keras' ImageNet DenseNet-121 weights ({error}); "
            "with no internet, set featurize.weights to a CheXNet .h5 file, or to 'random' for a smoke test"
        ) from None
    from keras.src.backend import config as keras_backend_config

    cached = Path(keras_backend_config.keras_home()).expanduser()
    cached = cached / "models" / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    sha256 = file_sha256(cached) if cached.exists() else hashlib.sha256(b"keras imagenet densenet121").hexdigest()
    return backbone, BackboneInfo("imagenet", str(cached), sha256, False)


def build_chexnet(image_size: int) -> keras.Model:
    """Build the CheXNet classifier: DenseNet-121, global average pooling, Dense(14, sigmoid)."""
    base = keras.applications.DenseNet121(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg"
    )
    head = keras.layers.Dense(CHEXNET_CLASSES, activation="sigmoid", name="predictions")(base.output)
    return keras.Model(base.input, head, name="chexnet")


def _file_backbone(path: Path, image_size: int, converted_dir: Path | None) -> tuple[keras.Model, BackboneInfo]:
    if not path.is_file():
        raise WeightsError(
            f"{path}: weights file not found; set featurize.weights to a CheXNet .h5 file, a PyTorch "
            "DenseNet-121 state dict, 'imagenet' or 'random'"
        )
    sha256 = file_sha256(path)
    kind = _file_kind(path)
    backbone = _densenet(image_size)
    if kind == "keras-h5":
        pairs, classes = split_head(read_legacy_weights(path), str(path))
        matched = assign_weights(backbone, pairs, str(path))
        logger.info("loaded Keras 2 weights from %s (matched by %s, head of %d classes)", path, matched, classes)
        return backbone, BackboneInfo("chexnet", str(path), sha256, False, classes)
    classes = _load_pytorch(backbone, path, sha256, converted_dir)
    return backbone, BackboneInfo("pytorch", str(path), sha256, False, classes)


def _file_kind(path: Path) -> str:
    with open(path, "rb") as handle:
        start = handle.read(8)
    if start == HDF5_SIGNATURE:
        return "keras-h5"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("data.pkl") for name in names):
            return "pytorch"
        if "config.json" in names or "model.weights.h5" in names:
            raise WeightsError(
                f"{path}: a Keras 3 .keras model file; save its weights with Keras 2 HDF5 save_weights "
                "or give the original CheXNet .h5 file"
            )
    elif start[:1] == b"\x80":  # a pickle protocol mark: torch.save's format before PyTorch 1.6
        return "pytorch"
    raise WeightsError(
        f"{path}: not a Keras 2 HDF5 weights file or a PyTorch state dict; set featurize.weights to "
        "CheXNet weights in one of those formats, 'imagenet' or 'random'"
    )


def _load_pytorch(backbone: keras.Model, path: Path, sha256: str, converted_dir: Path | None) -> int:
    """Load converted PyTorch weights into ``backbone``, converting and caching them if needed."""
    from pipeline.torch_densenet import TORCH_BATCHNORM_EPSILON

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.epsilon = TORCH_BATCHNORM_EPSILON
    cached = converted_dir / f"{sha256}.h5" if converted_dir else None
    if cached and cached.is_file():
        pairs, classes = _read_converted(cached)
        if pairs is not None:
            assign_weights(backbone, pairs, str(cached))
            logger.info("loaded PyTorch weights %s from the converted copy %s", path, cached)
            return classes
    from pipeline.torch_densenet import keras_weights_from_state_dict, read_state_dict

    pairs, classes = keras_weights_from_state_dict(read_state_dict(path), str(path))
    assign_weights(backbone, pairs, str(path))
    logger.info("converted PyTorch weights %s (%d parameters, head of %d classes)", path, len(pairs), classes)
    if cached:
        _write_converted(cached, pairs, classes, path)
    return classes


def _read_converted(path: Path) -> tuple[list[tuple[str, np.ndarray]] | None, int]:
    with h5py.File(path, "r") as handle:
        if handle.attrs.get("conversion_version") != CONVERSION_VERSION:
            return None, 0
        names = [name.decode() for name in handle["names"][:]]
        return [(name, handle[f"weights/{index}"][()]) for index, name in enumerate(names)], int(handle.attrs["head_classes"])


def _write_converted(path: Path, pairs: list[tuple[str, np.ndarray]], classes: int, source: Path) -> None:
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as handle:
        handle.create_dataset("names", data=np.array([name.encode() for name, _ in pairs]))
        for index, (_, value) in enumerate(pairs):
            handle.create_dataset(f"weights/{index}", data=value)
        handle.attrs.update(
            {"conversion_version": CONVERSION_VERSION, "head_classes": classes, "source": str(source),
             "description": "DenseNet-121 weights converted from a PyTorch state dict; Keras layer/weight names in 'names'"}
        )
    logger.info("cached the converted weights in %s", path)
