"""Per-epoch training checkpoints, so that a killed train stage resumes where it stopped.

The checkpoint folder (``models/checkpoints``) holds:

* ``epoch-NNNN.weights.h5``: model and optimizer variables after epoch NNNN (1-based),
  kept for the last epoch and for the best validation epoch.
* ``state.json``: epochs done, the history of every metric, the early-stopping counters,
  the dropout random-generator states, and a fingerprint of the settings and data. It is
  strict JSON: a NaN or infinite number is written as null.

Weights are written before ``state.json`` and each file is renamed into place, so a kill at
any moment leaves a ``state.json`` whose weight files exist.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from pipeline.atomic import write_text

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class TrainingState:
    """Progress of one training run; ``epochs_done`` counts finished epochs."""

    fingerprint: str
    epochs_done: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0
    stopped_early: bool = False
    complete: bool = False
    resumed_at_epoch: int = 0
    random_states: list[list[int]] = field(default_factory=list)

    def record(self, logs: dict[str, float], patience: int) -> bool:
        """Append one epoch's metrics and update early stopping; return True if val_loss improved.

        Follows ``keras.callbacks.EarlyStopping``: training stops once ``patience`` epochs in
        a row have not improved on the best val_loss.
        """
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        self.epochs_done += 1
        if logs["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.wait = float(logs["val_loss"]), self.epochs_done, 0
            return True
        self.wait += 1
        self.stopped_early = self.wait >= patience
        return False


class CheckpointStore:
    """Reads and writes the checkpoint folder of one model directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def weights_path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:04d}.weights.h5"

    def load_state(self, fingerprint: str) -> TrainingState | None:
        """Return the state of an unfinished run with the same fingerprint, or None."""
        path = self.directory / STATE_FILE
        if not path.is_file():
            return None
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            if fields.get("best_val_loss") is None:  # written as null while no epoch has a finite val_loss
                fields["best_val_loss"] = math.inf
            state = TrainingState(**fields)
        except (ValueError, TypeError, AttributeError) as error:
            logger.warning("checkpoint %s is unreadable (%s); training starts from epoch 0", path, error)
            return None
        if state.complete or state.fingerprint != fingerprint or state.epochs_done == 0:
            reason = "finished" if state.complete else "made with other settings or data"
            logger.info("checkpoint in %s is %s; training starts from epoch 0", self.directory, reason)
            return None
        if not self.weights_path(state.epochs_done).is_file():
            logger.warning("checkpoint weights %s are missing; training starts from epoch 0", self.weights_path(state.epochs_done))
            return None
        return state

    def save(self, model: keras.Model, state: TrainingState) -> None:
        """Write the epoch's weights, then the state that points at them, then prune old epochs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _save_weights(model, self.weights_path(state.epochs_done))
        state.random_states = [np.asarray(variable.numpy()).tolist() for variable in _random_state_variables(model)]
        _write_state(self.directory / STATE_FILE, state)
        keep = {self.weights_path(state.epochs_done).name, self.weights_path(state.best_epoch).name}
        for path in self.directory.glob("epoch-*.weights.h5"):
            if path.name not in keep:
                path.unlink()

    def mark_complete(self, state: TrainingState) -> None:
        state.complete = True
        _write_state(self.directory / STATE_FILE, state)

    def restore(self, model: keras.Model, state: TrainingState) -> None:
        """Load model and optimizer variables and dropout generator states after ``epochs_done``.

        The optimizer must be built first (``model.optimizer.build``), or Keras skips its variables.
        """
        model.load_weights(self.weights_path(state.epochs_done))
        variables = _random_state_variables(model)
        if len(variables) != len(state.random_states):
            raise ValueError(f"{self.directory / STATE_FILE}: {len(state.random_states)} random states for {len(variables)} generators")
        for variable, value in zip(variables, state.random_states, strict=True):
            variable.assign(np.asarray(value, dtype=variable.dtype))

    def restore_best(self, model: keras.Model, state: TrainingState) -> None:
        """Load the weights of the epoch with the lowest val_loss."""
        model.load_weights(self.weights_path(state.best_epoch))


def _write_state(path: Path, state: TrainingState) -> None:
    """Write ``state`` as strict JSON: NaN and infinity, which JSON lacks, are written as null."""
    write_text(path, json.dumps(_finite_or_none(asdict(state)), indent=1, allow_nan=False) + "\n")


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def _random_state_variables(model: keras.Model) -> list:
    """Return the dropout layers' random-generator states, the model variables that are not weights.

    ``save_weights`` leaves them out, but a resumed run needs them to draw the same dropout
    masks as an uninterrupted one.
    """
    weight_ids = {id(weight) for weight in model.weights}
    return [variable for variable in model.variables if id(variable) not in weight_ids]


def _save_weights(model: keras.Model, target: Path) -> None:
    # Keras requires the ".weights.h5" ending, which pipeline.atomic's temporary names lack.
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".weights.h5", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        model.save_weights(temporary, overwrite=True)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
