"""Greedy and beam search against models whose best reports can be worked out by hand."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.decoding import beam_search_decode, greedy_decode
from pipeline.models.simple import SimpleLSTM
from pipeline.tokenizer import END_ID, PAD_ID, START_ID, Tokenizer

A, B, C = 4, 5, 6  # the words of the hand-made tables; ids 0-3 are the special tokens
UNK_ID = 1  # a word the decoders may choose, unlike <start> and <pad>
VOCAB = 7
NEVER_LOGIT = -50.0


class TableModel:
    """Test-only generator: logits from a table indexed by the previous two words, plus a per-study bias.

    ``table`` (vocab, vocab, vocab) maps (word before last, last word) to next-word logits.
    Features (studies, 2, vocab) are the encoder memory; row 0 is added to every step's
    logits. The state is (word before last (batch,), step counter (batch,), memory), the
    kinds of state that recurrent and transformer decoders carry, all batch-first.
    """

    def __init__(self, table: np.ndarray):
        self.table = tf.constant(table, tf.float32)

    def encode(self, features):
        features = tf.cast(features, tf.float32)
        batch = tf.shape(features)[0]
        return tf.fill([batch], START_ID), tf.zeros([batch], tf.int32), features

    def decode_step(self, tokens, state):
        older, step, memory = state
        logits = tf.gather_nd(self.table, tf.stack([older, tokens], axis=1)) + memory[:, 0, :]
        return logits, (tokens, step + 1, memory)


class ShiftedModel(TableModel):
    """The same model with a different constant added to every row's logits at every step."""

    def decode_step(self, tokens, state):
        logits, next_state = super().decode_step(tokens, state)
        rows = tf.cast(tf.range(tf.shape(logits)[0]), tf.float32)
        shift = 37.0 * tf.cast(state[1] + 1, tf.float32) - 11.0 * rows
        return logits + shift[:, None], next_state


def first_order_table(probabilities: dict[int, dict[int, float]]) -> np.ndarray:
    """A table whose next word depends on the last word only; unlisted words get NEVER_LOGIT."""
    table = np.full((VOCAB, VOCAB, VOCAB), NEVER_LOGIT, np.float32)
    for last, following in probabilities.items():
        for word, probability in following.items():
            table[:, last, word] = np.log(probability)
    return table


def random_table(seed: int, end_bias: float = 0.0) -> np.ndarray:
    table = np.random.default_rng(seed).normal(0, 2, (VOCAB, VOCAB, VOCAB)).astype(np.float32)
    table[:, :, END_ID] += end_bias
    return table


def study_features(studies: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, scale, (studies, 2, VOCAB))).astype(np.float32)


def sequence_log_prob(model, features: np.ndarray, words: list[int]) -> float:
    """Summed log-softmax of ``words`` for one study, fed one step at a time."""
    state = model.encode(tf.constant(features[None]))
    tokens, total = tf.constant([START_ID]), 0.0
    for word in words:
        logits, state = model.decode_step(tokens, state)
        total += float(tf.nn.log_softmax(logits)[0, word])
        tokens = tf.constant([word])
    return total


def report(row: np.ndarray) -> list[int]:
    """Word ids up to and including <end>."""
    ids = row.tolist()
    return ids[: ids.index(END_ID) + 1] if END_ID in ids else ids


def test_beam_width_one_equals_greedy():
    model = TableModel(random_table(0, end_bias=1.0))
    features = study_features(8, seed=1)
    greedy = greedy_decode(model, features, max_steps=10)
    beam = beam_search_decode(model, features, max_steps=10, beam_width=1)
    np.testing.assert_array_equal(beam.token_ids, greedy.token_ids)
    np.testing.assert_allclose(beam.log_probs, greedy.log_probs, rtol=1e-5)


def test_beam_width_one_equals_greedy_with_length_penalty():
    model = TableModel(random_table(2, end_bias=1.0))
    features = study_features(8, seed=3)
    greedy = greedy_decode(model, features, max_steps=10)
    beam = beam_search_decode(model, features, max_steps=10, beam_width=1, length_penalty=1.5)
    np.testing.assert_array_equal(beam.token_ids, greedy.token_ids)


def test_constant_logit_shift_changes_nothing():
    table, features = random_table(4, end_bias=0.5), study_features(6, seed=5)
    plain = beam_search_decode(TableModel(table), features, max_steps=8, beam_width=3)
    shifted = beam_search_decode(ShiftedModel(table), features, max_steps=8, beam_width=3)
    np.testing.assert_array_equal(shifted.token_ids, plain.token_ids)
    np.testing.assert_allclose(shifted.log_probs, plain.log_probs, atol=1e-3)
    greedy_plain = greedy_decode(TableModel(table), features, max_steps=8)
    greedy_shifted = greedy_decode(ShiftedModel(table), features, max_steps=8)
    np.testing.assert_array_equal(greedy_shifted.token_ids, greedy_plain.token_ids)


def test_beam_beats_greedy_on_hand_made_table():
    # Greedy takes A (0.6) and then wanders; B then <end> has probability 0.4 * 0.99.
    table = first_order_table({
        START_ID: {A: 0.6, B: 0.4},
        A: {END_ID: 0.3, A: 0.35, B: 0.35},
        B: {END_ID: 0.99, A: 0.01},
    })
    features = np.zeros((1, 2, VOCAB), np.float32)
    greedy = greedy_decode(TableModel(table), features, max_steps=6)
    beam = beam_search_decode(TableModel(table), features, max_steps=6, beam_width=2)
    assert report(greedy.token_ids[0])[0] == A
    assert report(beam.token_ids[0]) == [B, END_ID]
    assert beam.log_probs[0] == pytest.approx(np.log(0.4 * 0.99), abs=1e-4)
    assert beam.log_probs[0] > greedy.log_probs[0]


def test_exhaustive_beam_finds_best_report():
    # With as many beams as there are reports of up to 3 words, beam search is exhaustive.
    model = TableModel(random_table(6, end_bias=1.0))
    features = study_features(3, seed=7)
    allowed = [UNK_ID, END_ID, A, B, C]
    beam = beam_search_decode(model, features, max_steps=3, beam_width=len(allowed) ** 3)
    for study in range(3):
        finished = [
            list(words[: words.index(END_ID) + 1])
            for words in itertools.product(allowed, repeat=3)
            if END_ID in words
        ]
        best = max(finished, key=lambda words: sequence_log_prob(model, features[study], words))
        assert report(beam.token_ids[study]) == best
        assert beam.log_probs[study] == pytest.approx(sequence_log_prob(model, features[study], best), abs=1e-4)


def test_log_probs_match_recomputed_reports():
    # Fails if a beam continues another beam's decoder state.
    model = TableModel(random_table(16, end_bias=-1.0))
    features = study_features(6, seed=17, scale=2.0)
    for decoded in (greedy_decode(model, features, max_steps=8), beam_search_decode(model, features, max_steps=8)):
        for study in range(6):
            words = report(decoded.token_ids[study])
            assert decoded.log_probs[study] == pytest.approx(sequence_log_prob(model, features[study], words), abs=1e-3)


def test_max_length_returns_best_unfinished():
    table = random_table(8)
    table[:, :, END_ID] = NEVER_LOGIT
    model = TableModel(table)
    features = study_features(2, seed=9)
    words = [UNK_ID, A, B, C]
    beam = beam_search_decode(model, features, max_steps=3, beam_width=len(words) ** 3)
    assert beam.steps == 3
    for study in range(2):
        best = max(itertools.product(words, repeat=3), key=lambda ids: sequence_log_prob(model, features[study], list(ids)))
        assert beam.token_ids[study].tolist() == list(best)


def test_length_penalty_favours_longer_report():
    # <end> at once has probability 0.5; A then <end> has 0.45 but is one word longer.
    table = first_order_table({START_ID: {END_ID: 0.5, A: 0.5}, A: {END_ID: 0.9, B: 0.1}, B: {END_ID: 1.0}})
    features = np.zeros((1, 2, VOCAB), np.float32)
    plain = beam_search_decode(TableModel(table), features, max_steps=4, beam_width=2, length_penalty=0.0)
    normalised = beam_search_decode(TableModel(table), features, max_steps=4, beam_width=2, length_penalty=2.0)
    assert report(plain.token_ids[0]) == [END_ID]
    assert report(normalised.token_ids[0]) == [A, END_ID]


def test_batched_equals_one_by_one():
    model = TableModel(random_table(10, end_bias=0.5))
    features = study_features(7, seed=11, scale=2.0)
    together = beam_search_decode(model, features, max_steps=8, beam_width=3, batch_size=7)
    in_fours = beam_search_decode(model, features, max_steps=8, beam_width=3, batch_size=4)
    alone = beam_search_decode(model, features, max_steps=8, beam_width=3, batch_size=1)
    np.testing.assert_array_equal(in_fours.token_ids, together.token_ids)
    np.testing.assert_array_equal(alone.token_ids, together.token_ids)
    assert len({tuple(row) for row in together.token_ids}) > 1


def test_rows_end_then_pad_and_never_start():
    model = TableModel(random_table(12, end_bias=1.0))
    features = study_features(10, seed=13)
    for decoded in (greedy_decode(model, features, max_steps=9), beam_search_decode(model, features, max_steps=9)):
        assert not (decoded.token_ids == START_ID).any()
        for row in decoded.token_ids.tolist():
            length = row.index(END_ID) + 1 if END_ID in row else len(row)
            assert PAD_ID not in row[:length]
            assert set(row[length:]) <= {PAD_ID}


def test_decoding_stops_when_every_report_ended():
    table = first_order_table({START_ID: {A: 0.9, B: 0.1}, A: {END_ID: 0.95, B: 0.05}, B: {END_ID: 1.0}})
    features = np.zeros((4, 2, VOCAB), np.float32)
    assert greedy_decode(TableModel(table), features, max_steps=40).steps == 2
    assert beam_search_decode(TableModel(table), features, max_steps=40, beam_width=3).steps <= 3


def test_untrained_model_terminates_with_text():
    keras.utils.set_random_seed(0)
    tokenizer = Tokenizer([f"word{i}" for i in range(36)], max_length=16)
    model = SimpleLSTM(vocab_size=tokenizer.vocab_size, embedding_dim=8, units=16, dropout=0.0, train_embedding=False)
    features = np.random.default_rng(14).normal(size=(5, 2, 1024)).astype(np.float16)
    model((features[:1], np.zeros((1, 3), np.int32)))
    decoded = beam_search_decode(model, features, max_steps=tokenizer.max_length - 1, beam_width=3)
    assert decoded.token_ids.shape == (5, 15)
    assert decoded.steps <= 15
    assert not (decoded.token_ids == START_ID).any()
    reports = [tokenizer.decode(row) for row in decoded.token_ids]
    assert sum(len(words) for words in reports) > 0
    assert all(word.startswith("word") or word == "<unk>" for words in reports for word in words)
    assert np.isfinite(decoded.log_probs).all()


@pytest.mark.parametrize(("width", "alpha"), [(0, 0.0), (3, -0.5)])
def test_invalid_beam_settings_rejected(width, alpha):
    model = TableModel(random_table(0))
    with pytest.raises(ValueError, match="must be"):
        beam_search_decode(model, study_features(1, seed=0), max_steps=3, beam_width=width, length_penalty=alpha)
