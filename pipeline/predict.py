"""Write a report for one study with what the pipeline trained: ``cxrgen predict`` and the web page.

A predictor loads ``models/model.keras``, ``models/model.json`` and
``data/text/tokenizer.json`` from a DVC workspace or from one experiment's commit. It
rebuilds the DenseNet-121 extractor that the model's features came from, which
``model.json`` records (weights, their sha256, input size, storage dtype), and encodes
radiographs with the featurize stage's own code (``pipeline.image_features``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.backbone import RANDOM_WARNING, WeightsError, build_feature_extractor
from pipeline.config import FeaturizeParams
from pipeline.decoding import DetailedGreedyDecoder, word_positions
from pipeline.errors import PipelineError
from pipeline.extractor import ExtractorSettings, FeatureExtractor
from pipeline.image_features import radiograph_study_features
from pipeline.models import MODELS, AttentionReportGenerator, ReportGenerator
from pipeline.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MODEL_PATH = Path("models/model.keras")
MODEL_INFO_PATH = Path("models/model.json")
TOKENIZER_PATH = Path("data/text/tokenizer.json")
ARTIFACT_PATHS = (MODEL_PATH, MODEL_INFO_PATH, TOKENIZER_PATH)
STANDIN_WARNING = "STAND-IN IMAGES: the model was trained on pixels that do not show the reported studies"
SINGLE_VIEW_NOTE = "single view: the one radiograph is used for both views, as for single-view studies in training"
DEFAULT_MAX_PIXELS = FeaturizeParams().max_pixels


class ArtifactError(PipelineError, FileNotFoundError):
    """Raised when a trained artifact is missing or cannot be read."""


@dataclass(frozen=True)
class Artifacts:
    """The folder that contains ``models/`` and ``data/text/`` as a DVC workspace lays them out."""

    root: Path

    def path(self, relative: Path) -> Path:
        return self.root / relative

    @classmethod
    def from_workspace(cls, root: Path | str) -> Artifacts:
        """Use the artifacts of the DVC workspace ``root``; raise ArtifactError if one is missing."""
        root = Path(root)
        for relative in ARTIFACT_PATHS:
            if not (root / relative).is_file():
                raise ArtifactError(
                    f"{root / relative}: not found; run `dvc repro` in {root} first, or pass --experiment NAME"
                )
        return cls(root)

    @classmethod
    def from_experiment(cls, name: str, repo: Path | str, destination: Path | str) -> Artifacts:
        """Copy the artifacts of DVC experiment (or Git revision) ``name`` into ``destination``.

        Reads the files at that experiment's commit through DVC's API, from the local DVC
        cache, and leaves the workspace as it is.
        """
        import dvc.api
        from dvc.exceptions import DvcException

        destination = Path(destination)
        for relative in ARTIFACT_PATHS:
            try:
                with dvc.api.open(str(relative), repo=str(repo), rev=name, mode="rb") as source:
                    with atomic_path(destination / relative) as temporary, open(temporary, "wb") as target:
                        shutil.copyfileobj(source, target)
            except DvcException as error:
                raise ArtifactError(
                    f"experiment {name!r} in {repo}: cannot read {relative} ({error}); "
                    "list experiments with `dvc exp show`, and `dvc exp pull` one that lives on a remote"
                ) from None
        logger.info("predict: read the artifacts of experiment %s from %s", name, repo)
        return cls(destination)


@dataclass(frozen=True)
class FeatureSettings:
    """The featurize settings behind the model's training features, as ``model.json`` records them."""

    weights: str  # "chexnet", "imagenet" or "random"
    weights_source: str
    weights_sha256: str
    image_size: int
    storage_dtype: str
    precision: str
    batch_size: int
    random_weights: bool
    standin_images: bool

    @classmethod
    def from_model_info(cls, info: dict, path: Path) -> FeatureSettings:
        """Read the ``features`` entry of ``model.json``; raise ArtifactError naming what is missing."""
        features = info.get("features", {})
        missing = [key for key in ("weights", "image_size") if key not in features]
        if missing:
            raise ArtifactError(
                f"{path}: the features entry lacks {', '.join(missing)}; rerun featurize and train (dvc repro)"
            )
        return cls(
            weights=str(features["weights"]),
            weights_source=str(features.get("weights_source", "")),
            weights_sha256=str(features.get("weights_sha256", "")),
            image_size=int(features["image_size"]),
            storage_dtype=str(features.get("storage_dtype", "float16")),
            precision=str(features.get("precision", "float32")),
            batch_size=int(features.get("batch_size", 1)),
            random_weights=bool(features.get("random_weights", False)),
            standin_images=bool(features.get("standin_images", False)),
        )

    def extractor_settings(self, max_pixels: int) -> ExtractorSettings:
        """The settings of the featurize stage's extractor, so features are computed the same way."""
        return ExtractorSettings(self.image_size, self.batch_size, self.precision, self.storage_dtype, max_pixels)

    def warnings(self) -> list[str]:
        """Warnings that every report from these features must carry."""
        found = [RANDOM_WARNING] if self.random_weights else []
        return found + ([STANDIN_WARNING] if self.standin_images else [])


@dataclass
class Prediction:
    """One generated report: words, their ids and log-probabilities, and attention.

    ``attention`` float32 (words, regions) holds the weights with which each word was
    chosen, or None for a model without attention.
    """

    words: list[str]
    token_ids: list[int]
    log_probs: list[float]
    attention: np.ndarray | None
    single_view: bool
    model: str
    warnings: list[str] = field(default_factory=list)

    @property
    def report(self) -> str:
        return " ".join(self.words)

    def as_dict(self) -> dict:
        """The prediction as JSON-ready values, without the attention weights."""
        return {
            "report": self.report,
            "model": self.model,
            "single_view": self.single_view,
            "tokens": [{"word": word, "id": token_id, "log_prob": round(score, 6)}
                       for word, token_id, score in zip(self.words, self.token_ids, self.log_probs, strict=True)],
            "scores": {
                "log_prob": round(float(sum(self.log_probs)), 6),
                "mean_log_prob": round(float(np.mean(self.log_probs)), 6) if self.log_probs else 0.0,
                "words": len(self.words),
            },
            "warnings": self.warnings,
        }


def load_predictor(
    repo: Path | str = ".", experiment: str | None = None, weights: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS, require_attention: bool = False,
) -> ReportPredictor:
    """Load a predictor from the workspace ``repo`` or from its DVC experiment ``experiment``.

    With ``require_attention``, raise ArtifactError before the slow loading steps when the
    model has no attention.
    """
    if experiment is None:
        return _load_checked(Artifacts.from_workspace(repo), weights, max_pixels, require_attention)
    # The loaded model and tokenizer live in memory, so the copied files can go afterwards.
    with tempfile.TemporaryDirectory(prefix="cxrgen-experiment-") as folder:
        try:
            artifacts = Artifacts.from_experiment(experiment, repo, folder)
            return _load_checked(artifacts, weights, max_pixels, require_attention)
        except PipelineError as error:
            # Name the experiment's files as the user knows them, not by the temporary copy.
            raise ArtifactError(str(error).replace(f"{folder}/", f"experiment {experiment!r}: ")) from None


def _load_checked(artifacts: Artifacts, weights: str | None, max_pixels: int, require_attention: bool) -> ReportPredictor:
    if require_attention:
        info_path = artifacts.path(MODEL_INFO_PATH)
        name = read_model_info(info_path).get("model", "unknown")
        if name not in MODELS or not issubclass(MODELS[name], AttentionReportGenerator):
            with_attention = [key for key, model in MODELS.items() if issubclass(model, AttentionReportGenerator)]
            raise ArtifactError(
                f"{info_path}: the {name} model has no attention, so it has no attention maps; "
                f"train one of {', '.join(with_attention)} (dvc exp run -S model=spatial) or leave out --attention"
            )
    return ReportPredictor.load(artifacts, weights, max_pixels)


def read_model_info(path: Path) -> dict:
    """Read ``models/model.json``; raise ArtifactError naming the file when it is missing or invalid."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: cannot read the model description ({error}); rerun the train stage") from None
    if not isinstance(info, dict):
        raise ArtifactError(f"{path}: expected a JSON object; rerun the train stage")
    return info


def backbone_weights(settings: FeatureSettings, override: str | None) -> str:
    """Return the ``featurize.weights`` value that rebuilds the model's feature extractor.

    ``override`` is a CheXNet file to use when the recorded path is not valid on this machine.
    """
    if settings.weights in ("random", "imagenet"):
        if override:
            raise WeightsError(f"--weights applies to CheXNet weights only; this model's features used {settings.weights}")
        return settings.weights
    return override or settings.weights_source


class ReportPredictor:
    """A loaded model, tokenizer and feature extractor that write reports for studies.

    ``predict`` is safe to call from several threads: calls run one at a time.
    """

    def __init__(self, model: ReportGenerator, tokenizer: Tokenizer, extractor: FeatureExtractor,
                 settings: FeatureSettings, model_name: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model, self.tokenizer, self.extractor, self.settings = model, tokenizer, extractor, settings
        self.model_name, self.max_pixels = model_name, max_pixels
        self.decoder = DetailedGreedyDecoder(model, tokenizer.max_length - 1)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, artifacts: Artifacts, weights: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReportPredictor:
        """Load the model, tokenizer and feature extractor named by ``artifacts``.

        ``weights`` overrides the CheXNet weights path recorded in ``model.json``; its sha256
        must match the recorded one.
        """
        from pipeline.trainer import load_model

        info_path = artifacts.path(MODEL_INFO_PATH)
        info = read_model_info(info_path)
        try:
            tokenizer = Tokenizer.load(artifacts.path(TOKENIZER_PATH))
        except ValueError as error:
            raise ArtifactError(str(error)) from None
        settings = FeatureSettings.from_model_info(info, info_path)
        model = load_model(artifacts.path(MODEL_PATH))

        backbone, backbone_info = build_feature_extractor(backbone_weights(settings, weights), settings.image_size)
        _check_weights_match(settings, backbone_info.sha256)
        logger.info("predict: model %s, %s weights, %d px input", info.get("model"), settings.weights, settings.image_size)
        extractor = FeatureExtractor(backbone, settings.extractor_settings(max_pixels))
        return cls(model, tokenizer, extractor, settings, str(info.get("model", "unknown")), max_pixels)

    @property
    def has_attention(self) -> bool:
        return isinstance(self.model, AttentionReportGenerator)

    def features(self, frontal: Path | str, lateral: Path | str | None = None) -> tuple[np.ndarray, bool]:
        """Encode a study as the featurize stage does: features (regions, 1024) and single_view."""
        paths = [frontal] if lateral is None else [frontal, lateral]
        return radiograph_study_features(self.extractor, paths, self.max_pixels, type(self.model).feature_kind)

    def predict(self, frontal: Path | str, lateral: Path | str | None = None) -> Prediction:
        """Generate the greedy report for a frontal and an optional lateral radiograph file.

        Raises ImageDecodeError naming the file when a radiograph cannot be read.
        """
        with self._lock:
            features, single_view = self.features(frontal, lateral)
            details = self.decoder(features[None])
        positions = word_positions(details.token_ids[0])
        token_ids = details.token_ids[0, positions]
        warnings = self.settings.warnings() + ([SINGLE_VIEW_NOTE] if single_view else [])
        return Prediction(
            words=self.tokenizer.decode(token_ids),
            token_ids=[int(token_id) for token_id in token_ids],
            log_probs=[float(score) for score in details.log_probs[0, positions]],
            attention=details.attention[0, positions] if details.attention is not None else None,
            single_view=single_view,
            model=self.model_name,
            warnings=warnings,
        )


def _check_weights_match(settings: FeatureSettings, sha256: str | None) -> None:
    if not settings.weights_sha256 or sha256 == settings.weights_sha256:
        return
    if settings.weights == "imagenet":
        logger.warning(
            "predict: Keras' ImageNet weights file has sha256 %s, but the model's features came from %s",
            sha256, settings.weights_sha256,
        )
        return
    if settings.weights == "chexnet":
        raise WeightsError(
            f"the CheXNet weights have sha256 {sha256}, but the model was trained on features from weights with "
            f"sha256 {settings.weights_sha256}; pass --weights with the file that featurize used"
        )
