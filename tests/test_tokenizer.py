"""Tokenizer ids, truncation, JSON round trip and rejection of foreign files."""

import json

import numpy as np
import pytest

from pipeline.tokenizer import END_ID, PAD_ID, START_ID, UNK_ID, Tokenizer


@pytest.fixture
def tokenizer():
    reports = [["no", "effusion", "."], ["no", "pneumothorax", "."], ["heart", "is", "normal", "."]]
    return Tokenizer.fit(reports, max_length=6, min_count=1)


def test_fit_orders_by_frequency(tokenizer):
    assert tokenizer.tokens[:4] == ["<pad>", "<unk>", "<start>", "<end>"]
    assert tokenizer.tokens[4:6] == [".", "no"]


def test_min_count_maps_rare_words_to_unk():
    tokenizer = Tokenizer.fit([["no", "a"], ["no", "b"]], max_length=8, min_count=2)
    assert tokenizer.tokens[4:] == ["no"]
    assert tokenizer.encode(["a"])[1] == UNK_ID


def test_encode_adds_start_end_and_padding(tokenizer):
    ids = tokenizer.encode(["no", "effusion"])
    assert ids.dtype == np.int32
    assert ids.shape == (6,)
    assert ids[0] == START_ID
    assert ids[3] == END_ID
    assert list(ids[4:]) == [PAD_ID, PAD_ID]


def test_encode_truncates_from_the_end(tokenizer):
    ids = tokenizer.encode(["heart", "is", "normal", ".", "no", "effusion"])
    assert tokenizer.decode(ids) == ["heart", "is", "normal", "."]
    assert ids[-1] == END_ID


def test_decode_stops_at_end(tokenizer):
    ids = [START_ID, tokenizer.tokens.index("no"), END_ID, tokenizer.tokens.index("heart")]
    assert tokenizer.decode(ids) == ["no"]


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.tokens == tokenizer.tokens
    assert loaded.max_length == tokenizer.max_length
    assert json.loads(path.read_text())["format_version"] == 1


def test_load_rejects_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"tokens": ["a"]}')
    with pytest.raises(ValueError, match="not a cxrgen tokenizer"):
        Tokenizer.load(path)
