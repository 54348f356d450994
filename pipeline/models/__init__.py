"""Report generators selectable by ``params.yaml`` ``model``."""

from __future__ import annotations

from pipeline.config import TrainParams
from pipeline.models.base import ReportGenerator, masked_accuracy, masked_loss
from pipeline.models.simple import SimpleLSTM

MODELS: dict[str, type[ReportGenerator]] = {"simple": SimpleLSTM}

__all__ = ["MODELS", "ReportGenerator", "build_model", "masked_accuracy", "masked_loss"]


def build_model(name: str, train: TrainParams, vocab_size: int, embedding_dim: int) -> ReportGenerator:
    """Create the model ``name`` with its hyperparameters from ``train.<name>``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    settings = getattr(train, name).model_dump()
    return MODELS[name](vocab_size=vocab_size, embedding_dim=embedding_dim, **settings)
