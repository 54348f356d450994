"""Every model: causal teacher forcing, step decoding equal to it, overfitting, save and load."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import MODEL_NAMES, TrainParams
from pipeline.decoding import greedy_decode, greedy_decode_with_details
from pipeline.models import MODELS, AttentionReportGenerator, build_model, masked_loss
from pipeline.tokenizer import END_ID, PAD_ID, START_ID

VOCAB = 40
EMBEDDING_DIM = 8
STEPS = 12  # input tokens per report; targets are the same sequence shifted by one
REGIONS = {"pooled": 2, "spatial": 98}
TINY = {
    "simple": {"units": 32, "dropout": 0.0, "train_embedding": True},
    "attention": {"units": 32, "attention_units": 16, "dropout": 0.0, "train_embedding": True},
    "spatial": {"units": 32, "attention_units": 16, "dropout": 0.0, "train_embedding": True},
    "bigru": {"units": 32, "dropout": 0.0, "train_embedding": True},
    "transformer": {
        "units": 32, "heads": 2, "layers": 2, "feed_forward_units": 64, "dropout": 0.0, "max_length": 16,
        "train_embedding": True,
    },
}
OVERFIT_EPOCHS = 150
OVERFIT_LEARNING_RATE = {"transformer": 3e-3}


def _new_model(name: str, seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = build_model(name, TrainParams.model_validate({name: TINY[name]}), VOCAB, EMBEDDING_DIM)
    features = _features(name, 1, np.random.default_rng(seed))
    model((features, np.full((1, STEPS), START_ID, np.int32)))
    return model


def _features(name: str, studies: int, rng: np.random.Generator) -> np.ndarray:
    regions = REGIONS[MODELS[name].feature_kind]
    return rng.normal(0, 1, (studies, regions, 1024)).astype(np.float16)


def _reports(studies: int, rng: np.random.Generator) -> np.ndarray:
    """Token ids (studies, STEPS + 1): <start>, 4 to STEPS - 1 random words, <end>, <pad>."""
    ids = np.full((studies, STEPS + 1), PAD_ID, np.int32)
    for row in range(studies):
        length = int(rng.integers(4, STEPS - 1))
        ids[row, : length + 2] = [START_ID, *rng.integers(4, VOCAB, length), END_ID]
    return ids


def test_registry_matches_params():
    assert tuple(MODELS) == MODEL_NAMES
    assert set(TINY) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_outputs_ignore_later_tokens(name):
    model = _new_model(name)
    rng = np.random.default_rng(1)
    features = _features(name, 3, rng)
    tokens = rng.integers(4, VOCAB, (3, STEPS)).astype(np.int32)
    for position in (0, 5, STEPS - 2):
        changed = tokens.copy()
        changed[:, position + 1 :] = rng.integers(4, VOCAB, (3, STEPS - position - 1))
        original = model((features, tokens), training=False).numpy()
        altered = model((features, changed), training=False).numpy()
        np.testing.assert_allclose(altered[:, : position + 1], original[:, : position + 1], atol=1e-5)
        assert np.abs(altered[:, position + 1 :] - original[:, position + 1 :]).max() > 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_decode_steps_match_teacher_forcing(name):
    model = _new_model(name)
    rng = np.random.default_rng(2)
    features = _features(name, 3, rng)
    tokens = rng.integers(4, VOCAB, (3, STEPS)).astype(np.int32)
    expected = model((features, tokens), training=False).numpy()

    state = model.encode(tf.constant(features))
    shapes = [tuple(tensor.shape) for tensor in state]
    for step in range(STEPS):
        logits, state = model.decode_step(tf.constant(tokens[:, step]), state)
        np.testing.assert_allclose(logits.numpy(), expected[:, step], atol=1e-4)
        assert [tuple(tensor.shape) for tensor in state] == shapes
    assert all(shape[0] == 3 for shape in shapes)


@pytest.mark.parametrize("name", [name for name in MODEL_NAMES if issubclass(MODELS[name], AttentionReportGenerator)])
def test_attention_weights_sum_to_one(name):
    model = _new_model(name)
    features = _features(name, 3, np.random.default_rng(3))
    state = model.encode(tf.constant(features))
    for _ in range(3):
        logits, state, weights = model.decode_step_with_attention(tf.fill([3], START_ID), state)
        assert weights.dtype == tf.float32
        assert weights.shape == (3, REGIONS[MODELS[name].feature_kind])
        np.testing.assert_allclose(weights.numpy().sum(axis=1), 1.0, atol=1e-5)
        assert (weights.numpy() >= 0).all()
        assert logits.shape == (3, VOCAB)


def test_attention_models_are_listed():
    attending = {name for name in MODEL_NAMES if issubclass(MODELS[name], AttentionReportGenerator)}
    assert attending == {"attention", "spatial", "transformer"}


def test_transformer_rejects_decoding_past_max_length():
    model = _new_model("transformer")
    state = model.encode(tf.constant(_features("transformer", 2, np.random.default_rng(4))))
    for _ in range(TINY["transformer"]["max_length"]):
        _, state = model.decode_step(tf.fill([2], START_ID), state)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_length"):
        model.decode_step(tf.fill([2], START_ID), state)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def overfit(request):
    """A model trained on 8 studies until it has memorised their reports."""
    name = request.param
    model = _new_model(name)
    rng = np.random.default_rng(5)
    features, reports = _features(name, 8, rng), _reports(8, rng)
    model.compile(optimizer=keras.optimizers.Adam(OVERFIT_LEARNING_RATE.get(name, 1e-2)), loss=masked_loss)
    history = model.fit((features, reports[:, :-1]), reports[:, 1:], batch_size=8, epochs=OVERFIT_EPOCHS, verbose=0)
    return name, model, features, reports, history.history["loss"]


def test_model_overfits_eight_studies(overfit):
    name, _, _, _, losses = overfit
    assert losses[0] > 2.0, f"{name} started at a loss of {losses[0]:.3f} nats per token"
    assert losses[-1] < 0.05, f"{name} ended at a loss of {losses[-1]:.3f} nats per token"


def test_greedy_decoding_recites_training_reports(overfit):
    name, model, features, reports, _ = overfit
    generated = greedy_decode(model, features, STEPS)
    np.testing.assert_array_equal(generated.token_ids, reports[:, 1:], err_msg=name)


def test_detailed_decoding_matches_greedy(overfit):
    name, model, features, reports, _ = overfit
    details = greedy_decode_with_details(model, features, STEPS, batch_size=3)
    np.testing.assert_array_equal(details.token_ids, greedy_decode(model, features, STEPS).token_ids, err_msg=name)
    finished = np.cumsum(details.token_ids == END_ID, axis=1) - (details.token_ids == END_ID) > 0
    assert (details.log_probs <= 0).all()
    assert (details.log_probs[finished] == 0).all(), "steps after <end> score 0"
    assert details.log_probs[~finished].mean() > -0.1, "a memorised report is chosen with high probability"
    if issubclass(MODELS[name], AttentionReportGenerator):
        assert details.attention.shape == (8, STEPS, REGIONS[MODELS[name].feature_kind])
        np.testing.assert_allclose(details.attention.sum(axis=2), 1.0, atol=1e-5)
    else:
        assert details.attention is None


def test_saved_model_predicts_the_same(overfit, tmp_path):
    name, model, features, reports, _ = overfit
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)

    assert type(loaded) is MODELS[name]
    np.testing.assert_array_equal(
        loaded((features, reports[:, :-1]), training=False).numpy(),
        model((features, reports[:, :-1]), training=False).numpy(),
    )
    np.testing.assert_array_equal(
        greedy_decode(loaded, features, STEPS).token_ids, greedy_decode(model, features, STEPS).token_ids
    )
