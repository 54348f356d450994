"""The DenseNet-121 feature extractor and the three ways to get its weights.

``featurize.weights`` selects the weights:

* a path to CheXNet weights as commonly shared for Keras: DenseNet-121 plus a
  ``Dense(14, sigmoid)`` head, saved by ``model.save_weights`` in the HDF5 layout;
* ``imagenet``: Keras downloads its own ImageNet DenseNet-121 weights (needs internet once);
* ``random``: seeded random weights. Features from them carry no image information,
  and every artifact made from them says so.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import keras

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

FEATURE_LAYER = "relu"  # the final BN + ReLU of DenseNet-121: (7, 7, 1024) at 224x224 input
CHEXNET_CLASSES = 14
RANDOM_SEED = 0
RANDOM_WARNING = "RANDOM WEIGHTS: features carry no image information; scores measure the text prior only"


class WeightsError(PipelineError, ValueError):
    """Raised when a weights file is missing or does not match the expected network."""


@dataclass(frozen=True)
class BackboneInfo:
    """What produced a set of features, recorded in every artifact downstream."""

    weights: str  # "chexnet", "imagenet" or "random"
    source: str  # the file path, the Keras cache file, or "seed=0"
    sha256: str | None
    random: bool


def file_sha256(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def build_feature_extractor(weights: str, image_size: int) -> tuple[keras.Model, BackboneInfo]:
    """Build DenseNet-121 that maps (batch, size, size, 3) to (batch, s, s, 1024), s = size / 32."""
    if weights == "random":
        return _random_backbone(image_size)
    if weights == "imagenet":
        return _imagenet_backbone(image_size)
    return _chexnet_backbone(Path(weights), image_size)


def _random_backbone(image_size: int) -> tuple[keras.Model, BackboneInfo]:
    logger.warning(RANDOM_WARNING)
    keras.utils.set_random_seed(RANDOM_SEED)
    backbone = keras.applications.DenseNet121(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3)
    )
    return backbone, BackboneInfo("random", f"seed={RANDOM_SEED}", None, True)


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
    sha256 = file_sha256(cached) if cached.exists() else None
    return backbone, BackboneInfo("imagenet", str(cached), sha256, False)


def build_chexnet(image_size: int) -> keras.Model:
    """Build the CheXNet classifier: DenseNet-121, global average pooling, Dense(14, sigmoid)."""
    base = keras.applications.DenseNet121(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg"
    )
    head = keras.layers.Dense(CHEXNET_CLASSES, activation="sigmoid", name="predictions")(base.output)
    return keras.Model(base.input, head, name="chexnet")


def _chexnet_backbone(path: Path, image_size: int) -> tuple[keras.Model, BackboneInfo]:
    if not path.is_file():
        raise WeightsError(
            f"{path}: weights file not found; set featurize.weights to a CheXNet .h5 file, 'imagenet' or 'random'"
        )
    classifier = build_chexnet(image_size)
    try:
        classifier.load_weights(path)
    except Exception as error:  # h5py and Keras raise several unrelated types here.
        raise WeightsError(
            f"{path}: does not hold CheXNet weights ({type(error).__name__}: {error}). Expected DenseNet-121 "
            f"plus a Dense({CHEXNET_CLASSES}) sigmoid head saved by Keras save_weights in HDF5 format"
        ) from None
    backbone = keras.Model(classifier.input, classifier.get_layer(FEATURE_LAYER).output, name="chexnet_features")
    return backbone, BackboneInfo("chexnet", str(path), file_sha256(path), False)
