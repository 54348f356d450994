"""Validation of the model and train sections of params.yaml."""

from __future__ import annotations

import pytest

from pipeline.config import MODEL_NAMES, ParamsError, parse_params


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_name_is_valid(name):
    assert parse_params({"model": name}).model == name


def test_unknown_model_lists_valid_names():
    with pytest.raises(ParamsError, match="valid models: simple, attention, spatial, bigru, transformer"):
        parse_params({"model": "transfomer"})


def test_misspelt_model_key_suggests_fix():
    with pytest.raises(ParamsError, match="did you mean 'attention_units'"):
        parse_params({"train": {"spatial": {"attention_unit": 64}}})


def test_transformer_buffer_must_fit_reports():
    raw = {"model": "transformer", "tokenize": {"max_length": 80}, "train": {"transformer": {"max_length": 64}}}
    with pytest.raises(ParamsError, match="must be at least tokenize.max_length"):
        parse_params(raw)
    assert parse_params({**raw, "model": "simple"}).tokenize.max_length == 80


def test_transformer_units_divisible_by_heads():
    with pytest.raises(ParamsError, match="divisible by heads"):
        parse_params({"train": {"transformer": {"units": 30, "heads": 4}}})


def test_unknown_strategy_rejected():
    with pytest.raises(ParamsError, match="strategy"):
        parse_params({"train": {"strategy": "tpu"}})
    assert parse_params({"train": {"strategy": "mirrored"}}).train.strategy == "mirrored"
