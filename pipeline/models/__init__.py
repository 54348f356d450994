"""Report generators selectable by ``params.yaml`` ``model``."""

from __future__ import annotations

from pipeline.config import MODEL_NAMES, TrainParams
from pipeline.models.attention import AttentionGRU, SpatialAttentionGRU
from pipeline.models.base import AttentionReportGenerator, ReportGenerator, masked_accuracy, masked_loss
from pipeline.models.bigru import BiGRUGenerator
from pipeline.models.simple import SimpleLSTM
from pipeline.models.transformer import TransformerGenerator

MODELS: dict[str, type[ReportGenerator]] = {
    "simple": SimpleLSTM,
    "attention": AttentionGRU,
    "spatial": SpatialAttentionGRU,
    "bigru": BiGRUGenerator,
    "transformer": TransformerGenerator,
}
assert tuple(MODELS) == MODEL_NAMES, "pipeline.config.MODEL_NAMES and MODELS must list the same models"

__all__ = [
    "MODELS",
    "AttentionReportGenerator",
    "ReportGenerator",
    "build_model",
    "masked_accuracy",
    "masked_loss",
]


def build_model(name: str, train: TrainParams, vocab_size: int, embedding_dim: int) -> ReportGenerator:
    """Create the model ``name`` with its hyperparameters from ``train.<name>``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    settings = getattr(train, name).model_dump()
    return MODELS[name](vocab_size=vocab_size, embedding_dim=embedding_dim, **settings)
