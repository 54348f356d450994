"""Report generation from a trained model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline.models import AttentionReportGenerator, ReportGenerator
from pipeline.tokenizer import END_ID, PAD_ID, START_ID


def greedy_decode(model: ReportGenerator, features: np.ndarray, max_steps: int, batch_size: int = 64) -> np.ndarray:
    """Generate reports by arg-max decoding, one batch of studies at a time.

    ``features`` (studies, regions, 1024). Returns int32 (studies, max_steps) word ids
    without ``<start>``; each row ends with ``<end>`` then ``<pad>``, unless the report
    reached ``max_steps`` words first.
    """
    step = _compiled_greedy(model, max_steps)
    outputs = [step(tf.convert_to_tensor(features[start : start + batch_size])).numpy()
               for start in range(0, len(features), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, max_steps), np.int32)


def _compiled_greedy(model: ReportGenerator, max_steps: int):
    @tf.function(reduce_retracing=True)
    def decode(features: tf.Tensor) -> tf.Tensor:
        batch = tf.shape(features)[0]
        state = model.encode(features)
        tokens = tf.fill([batch], START_ID)
        finished = tf.zeros([batch], tf.bool)
        words = tf.TensorArray(tf.int32, size=max_steps)
        for position in tf.range(max_steps):
            logits, state = model.decode_step(tokens, state)
            tokens = tf.argmax(logits, axis=-1, output_type=tf.int32)
            words = words.write(position, tf.where(finished, PAD_ID, tokens))
            finished = finished | (tokens == END_ID)
        return tf.transpose(words.stack())

    return decode


@dataclass
class GreedyDetails:
    """Greedy reports with what explains them, for ``studies`` studies and ``steps`` steps.

    ``token_ids`` int32 (studies, steps) as ``greedy_decode`` returns them. ``log_probs``
    float32 (studies, steps): natural log of the probability of each chosen word, 0 after
    ``<end>``. ``attention`` float32 (studies, steps, regions): the weights over feature
    regions with which each word was chosen, or None for a model without attention.
    """

    token_ids: np.ndarray
    log_probs: np.ndarray
    attention: np.ndarray | None


def word_positions(token_ids: np.ndarray) -> np.ndarray:
    """Return the steps (int64) of a decoded row (steps,) that hold report words: those
    before the first ``<end>``, without ``<pad>`` and ``<start>``, as ``Tokenizer.decode`` reads them."""
    ends = np.flatnonzero(token_ids == END_ID)
    length = int(ends[0]) if ends.size else len(token_ids)
    steps = np.arange(length)
    return steps[~np.isin(token_ids[:length], (PAD_ID, START_ID))]


class DetailedGreedyDecoder:
    """Arg-max decoding, as ``greedy_decode``, that also returns scores and attention.

    The decoding loop is compiled once per decoder, so keep one per model when decoding
    many times, as a server does.
    """

    def __init__(self, model: ReportGenerator, max_steps: int):
        self.max_steps = max_steps
        self.with_attention = isinstance(model, AttentionReportGenerator)
        self._decode = _compiled_greedy_details(model, max_steps, self.with_attention)

    def __call__(self, features: np.ndarray, batch_size: int = 64) -> GreedyDetails:
        """Decode features (studies, regions, 1024); the word ids equal ``greedy_decode``'s."""
        if len(features) == 0:
            attention = np.zeros((0, self.max_steps, features.shape[1]), np.float32) if self.with_attention else None
            return GreedyDetails(np.zeros((0, self.max_steps), np.int32), np.zeros((0, self.max_steps), np.float32), attention)

        batches = [self._decode(tf.convert_to_tensor(features[start : start + batch_size]))
                   for start in range(0, len(features), batch_size)]
        token_ids, log_probs, attention = (np.concatenate([batch[part].numpy() for batch in batches]) for part in range(3))
        return GreedyDetails(token_ids, log_probs, attention if self.with_attention else None)


def greedy_decode_with_details(
    model: ReportGenerator, features: np.ndarray, max_steps: int, batch_size: int = 64
) -> GreedyDetails:
    """Generate reports for features (studies, regions, 1024) with ``DetailedGreedyDecoder``."""
    return DetailedGreedyDecoder(model, max_steps)(features, batch_size)


def _compiled_greedy_details(model: ReportGenerator, max_steps: int, with_attention: bool):
    @tf.function(reduce_retracing=True)
    def decode(features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        batch, regions = tf.shape(features)[0], tf.shape(features)[1]
        state = model.encode(features)
        tokens = tf.fill([batch], START_ID)
        finished = tf.zeros([batch], tf.bool)
        words = tf.TensorArray(tf.int32, size=max_steps)
        scores = tf.TensorArray(tf.float32, size=max_steps)
        weights = tf.TensorArray(tf.float32, size=max_steps)
        for position in tf.range(max_steps):
            if with_attention:
                logits, state, step_weights = model.decode_step_with_attention(tokens, state)
            else:
                logits, state = model.decode_step(tokens, state)
                step_weights = tf.zeros([batch, regions], tf.float32)
            tokens = tf.argmax(logits, axis=-1, output_type=tf.int32)
            log_prob = tf.gather(tf.nn.log_softmax(tf.cast(logits, tf.float32)), tokens, axis=1, batch_dims=1)
            words = words.write(position, tf.where(finished, PAD_ID, tokens))
            scores = scores.write(position, tf.where(finished, 0.0, log_prob))
            weights = weights.write(position, tf.cast(step_weights, tf.float32))
            finished = finished | (tokens == END_ID)
        return (tf.transpose(words.stack()), tf.transpose(scores.stack()),
                tf.transpose(weights.stack(), (1, 0, 2)))

    return decode
