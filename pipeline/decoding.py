"""Report generation from a trained model: batched greedy and beam search.

Both decoders run as compiled TensorFlow graphs over a batch of studies and rely only on
the ``ReportGenerator`` interface: ``encode(features)`` returns a tuple of batch-first
state tensors and ``decode_step(tokens, state)`` returns next-word logits and the next
state. Beam search flattens (studies, beams) into rows and reorders every state tensor
with ``tf.gather``, so each beam keeps its own recurrent state or attention cache.

Scores are summed natural-log word probabilities (``log_softmax`` of the logits). Neither
decoder emits ``<start>`` or ``<pad>`` before ``<end>``: both tokens are excluded from the
choice at every step. Beam search ranks hypotheses by the GNMT length normalisation
``score / ((5 + length) / 6) ** alpha`` (Wu et al. 2016, "Google's Neural Machine
Translation System", eq. 14 without the coverage term), where ``length`` counts the
generated words including ``<end>``; ``alpha = 0`` ranks by the summed log-probability.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline.models import AttentionReportGenerator, ReportGenerator
from pipeline.tokenizer import END_ID, PAD_ID, START_ID

logger = logging.getLogger(__name__)

# A finite stand-in for log(0): sums of it stay finite, and 0 * it stays 0.
NEVER = -1e9


@dataclass
class Decoded:
    """Decoder output for a set of studies.

    ``token_ids`` int32 (studies, max_steps): generated word ids without ``<start>``; a row
    ends with ``<end>`` and then ``<pad>``, unless it reached ``max_steps`` first.
    ``log_probs`` float32 (studies,): summed natural-log probability of each row's words up
    to and including ``<end>``. ``steps``: the most decoder steps that any batch ran.
    ``seconds``: wall time of decoding, without the one-off graph tracing.
    """

    token_ids: np.ndarray
    log_probs: np.ndarray
    steps: int
    seconds: float


def greedy_decode(model: ReportGenerator, features: np.ndarray, max_steps: int, batch_size: int = 64) -> Decoded:
    """Generate reports by arg-max decoding, one batch of studies at a time.

    ``features`` (studies, regions, 1024). A batch stops as soon as every study in it has
    produced ``<end>``, or after ``max_steps`` words.
    """
    decode = _compiled_greedy(model, max_steps, _batch_spec(features))
    return _decode_batches(decode, features, max_steps, batch_size)


def beam_search_decode(
    model: ReportGenerator,
    features: np.ndarray,
    max_steps: int,
    beam_width: int = 3,
    length_penalty: float = 0.0,
    batch_size: int = 64,
) -> Decoded:
    """Generate reports by beam search, one batch of studies at a time.

    ``features`` (studies, regions, 1024). ``length_penalty`` is the GNMT alpha (>= 0).
    Each study returns its best finished beam by normalised score; a study with no
    finished beam after ``max_steps`` words returns its best unfinished beam. A batch stops
    once no unfinished beam of any study can still overtake that study's best finished one.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    decode = _compiled_beam_search(model, max_steps, beam_width, length_penalty, _batch_spec(features))
    return _decode_batches(decode, features, max_steps, batch_size)


def _batch_spec(features: np.ndarray) -> tf.TensorSpec:
    """Build a signature for batches of ``features`` of any size, so that the decoder is traced once."""
    return tf.TensorSpec([None, *features.shape[1:]], tf.as_dtype(features.dtype))


def _decode_batches(decode, features: np.ndarray, max_steps: int, batch_size: int) -> Decoded:
    start_trace = time.perf_counter()
    decode.get_concrete_function()
    logger.debug("decoder traced in %.1f s", time.perf_counter() - start_trace)

    token_ids, log_probs, steps = [], [], 0
    start = time.perf_counter()
    for first in range(0, len(features), batch_size):
        ids, scores, ran = decode(tf.convert_to_tensor(features[first : first + batch_size]))
        token_ids.append(ids.numpy())
        log_probs.append(scores.numpy())
        steps = max(steps, int(ran))
    seconds = time.perf_counter() - start
    if not token_ids:
        return Decoded(np.zeros((0, max_steps), np.int32), np.zeros(0, np.float32), 0, seconds)
    return Decoded(np.concatenate(token_ids), np.concatenate(log_probs), steps, seconds)


def word_log_probs(logits: tf.Tensor) -> tf.Tensor:
    """Log-softmax of logits (rows, vocab), with ``<start>`` and ``<pad>`` set to ``NEVER``.

    The normalisation runs over the whole vocabulary, so the allowed words keep the
    probabilities the model gave them.
    """
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    vocab = tf.shape(log_probs)[-1]
    forbidden = tf.reduce_any(tf.equal(tf.range(vocab)[:, None], [START_ID, PAD_ID]), axis=-1)
    return tf.where(forbidden, tf.constant(NEVER, tf.float32), log_probs)


def _compiled_greedy(model: ReportGenerator, max_steps: int, spec: tf.TensorSpec):
    @tf.function(input_signature=[spec])
    def decode(features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        batch = tf.shape(features)[0]
        state = model.encode(features)
        tokens = tf.fill([batch], START_ID)
        finished = tf.zeros([batch], tf.bool)
        total = tf.zeros([batch], tf.float32)
        words = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])

        def keep_going(step, tokens, state, finished, total, words):
            return (step < max_steps) & ~tf.reduce_all(finished)

        def step_once(step, tokens, state, finished, total, words):
            logits, state = model.decode_step(tokens, state)
            log_probs = word_log_probs(logits)
            tokens = tf.where(finished, PAD_ID, tf.argmax(log_probs, axis=-1, output_type=tf.int32))
            total += tf.where(finished, 0.0, tf.reduce_max(log_probs, axis=-1))
            words = words.write(step, tokens)
            return step + 1, tokens, state, finished | (tokens == END_ID), total, words

        loop = (tf.constant(0), tokens, state, finished, total, words)
        steps, _, _, _, total, words = tf.while_loop(keep_going, step_once, loop)
        ids = tf.transpose(words.stack())
        return tf.pad(ids, [[0, 0], [0, max_steps - steps]], constant_values=PAD_ID), total, steps

    return decode


def gnmt_length_penalty(lengths: tf.Tensor, alpha: float) -> tf.Tensor:
    """GNMT length normalisation ((5 + lengths) / 6) ** alpha, float32 in the shape of ``lengths``."""
    return tf.pow((5.0 + tf.cast(lengths, tf.float32)) / 6.0, alpha)


@dataclass(frozen=True)
class _BeamSettings:
    max_steps: int
    width: int
    alpha: float


def _compiled_beam_search(model: ReportGenerator, max_steps: int, beam_width: int, length_penalty: float, spec):
    settings = _BeamSettings(max_steps, beam_width, float(length_penalty))

    @tf.function(input_signature=[spec])
    def decode(features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        batch = tf.shape(features)[0]
        state = tf.nest.map_structure(lambda tensor: tf.repeat(tensor, beam_width, axis=0), model.encode(features))
        beams = _initial_beams(batch, settings)

        def keep_going(step, state, beams):
            return (step < max_steps) & ~tf.reduce_all(_studies_done(beams, settings))

        def step_once(step, state, beams):
            logits, state = model.decode_step(tf.reshape(beams["tokens"], [-1]), state)
            beams, rows = _advance_beams(beams, logits, step, settings)
            state = tf.nest.map_structure(lambda tensor: tf.gather(tensor, rows), state)
            return step + 1, state, beams

        steps, _, beams = tf.while_loop(keep_going, step_once, (tf.constant(0), state, beams))
        ids, scores = _best_beams(beams, settings)
        return ids, scores, steps

    return decode


def _initial_beams(batch: tf.Tensor, settings: _BeamSettings) -> dict[str, tf.Tensor]:
    """Create the beam tensors (studies, beams, ...). Only beam 0 is live at first, so beams do not repeat."""
    width = settings.width
    first = tf.concat([tf.zeros([1]), tf.fill([width - 1], NEVER)], axis=0)
    return {
        "tokens": tf.fill([batch, width], START_ID),
        "scores": tf.tile(first[None, :], [batch, 1]),
        "lengths": tf.zeros([batch, width], tf.int32),
        "finished": tf.zeros([batch, width], tf.bool),
        "history": tf.fill([batch, width, settings.max_steps], PAD_ID),
    }


def _advance_beams(beams: dict, logits: tf.Tensor, step: tf.Tensor, settings: _BeamSettings) -> tuple[dict, tf.Tensor]:
    """Extend every beam by one word and keep the best ``width`` candidates per study.

    ``logits`` (studies * beams, vocab). A finished beam extends only with ``<pad>`` at no
    cost. Candidates are ranked by normalised score, which at one step orders unfinished
    candidates (all of the same length) exactly as their summed log-probabilities.
    Returns the new beams and, per new row, the old row whose decoder state it continues.
    """
    width = settings.width
    batch = tf.shape(beams["scores"])[0]
    log_probs = tf.reshape(word_log_probs(logits), [batch, width, -1])
    vocab = tf.shape(log_probs)[-1]
    pad_only = tf.where(tf.range(vocab) == PAD_ID, 0.0, NEVER)
    log_probs = tf.where(beams["finished"][:, :, None], pad_only, log_probs)

    candidates = tf.reshape(beams["scores"][:, :, None] + log_probs, [batch, -1])
    candidate_lengths = beams["lengths"] + tf.where(beams["finished"], 0, 1)
    penalty = tf.repeat(gnmt_length_penalty(candidate_lengths, settings.alpha), vocab, axis=1)
    _, chosen = tf.math.top_k(candidates / penalty, k=width)
    parents, words = chosen // vocab, chosen % vocab

    was_finished = tf.gather(beams["finished"], parents, batch_dims=1)
    words = tf.where(was_finished, PAD_ID, words)
    history = tf.gather(beams["history"], parents, batch_dims=1)
    history = tf.where(tf.range(settings.max_steps) == step, words[:, :, None], history)
    new_beams = {
        "tokens": words,
        "scores": tf.gather(candidates, chosen, batch_dims=1),
        "lengths": tf.gather(candidate_lengths, parents, batch_dims=1),
        "finished": was_finished | (words == END_ID),
        "history": history,
    }
    rows = tf.reshape(parents + width * tf.range(batch)[:, None], [-1])
    return new_beams, rows


def _studies_done(beams: dict, settings: _BeamSettings) -> tf.Tensor:
    """Flag, as bool (studies,), the studies where no unfinished beam can beat the best finished one.

    Log-probabilities only fall as a beam grows, and the length penalty is at most its
    value at ``max_steps``, so ``score / penalty(max_steps)`` bounds an unfinished beam's
    best normalised score.
    """
    finished = beams["finished"]
    normalised = beams["scores"] / gnmt_length_penalty(beams["lengths"], settings.alpha)
    best_finished = tf.reduce_max(tf.where(finished, normalised, 2 * NEVER), axis=1)
    bound = beams["scores"] / gnmt_length_penalty(settings.max_steps, settings.alpha)
    best_unfinished = tf.reduce_max(tf.where(finished, 2 * NEVER, bound), axis=1)
    return tf.reduce_all(finished, axis=1) | (best_finished >= best_unfinished)


def _best_beams(beams: dict, settings: _BeamSettings) -> tuple[tf.Tensor, tf.Tensor]:
    """Select each study's best finished beam by normalised score, or its best beam if none finished.

    Returns word ids int32 (studies, max_steps) and summed log-probabilities (studies,).
    """
    finished = beams["finished"]
    normalised = beams["scores"] / gnmt_length_penalty(beams["lengths"], settings.alpha)
    any_finished = tf.reduce_any(finished, axis=1, keepdims=True)
    ranking = tf.where(any_finished & ~finished, 4 * NEVER, normalised)
    best = tf.argmax(ranking, axis=1, output_type=tf.int32)
    ids = tf.gather(beams["history"], best, batch_dims=1)
    return ids, tf.gather(beams["scores"], best, batch_dims=1)


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
            log_probs = word_log_probs(logits)
            tokens = tf.argmax(log_probs, axis=-1, output_type=tf.int32)
            log_prob = tf.reduce_max(log_probs, axis=-1)
            words = words.write(position, tf.where(finished, PAD_ID, tokens))
            scores = scores.write(position, tf.where(finished, 0.0, log_prob))
            weights = weights.write(position, tf.cast(step_weights, tf.float32))
            finished = finished | (tokens == END_ID)
        return (tf.transpose(words.stack()), tf.transpose(scores.stack()),
                tf.transpose(weights.stack(), (1, 0, 2)))

    return decode
