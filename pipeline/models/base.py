"""The interface every report generator implements, and the masked loss they train with.

A generator maps cached image features and the report so far to next-word logits:

* ``call((features, tokens))``: teacher forcing. ``tokens`` int32 (batch, steps) begins
  with ``<start>``; returns logits float32 (batch, steps, vocab) where position t depends
  only on tokens 0..t.
* ``encode(features)``: the decoder's initial state, a tuple of batch-first tensors.
* ``decode_step(tokens, state)``: tokens int32 (batch,) to logits (batch, vocab) and the
  next state, with the same structure and shapes as the input state.

Because every state tensor is batch-first and keeps its shape from step to step, beam
search can reorder beams with ``tf.gather`` inside a ``tf.while_loop``. The state includes
the encoder memory, so ``decode_step`` needs nothing else.

Attention models (``AttentionReportGenerator``) also implement
``decode_step_with_attention(tokens, state)``, which returns the attention weights over
feature regions as a third value: float32 (batch, regions), each row summing to 1.
"""

from __future__ import annotations

from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf


class ReportGenerator(keras.Model):
    """Base class of the encoder-decoder models; subclasses set ``feature_kind``."""

    feature_kind: ClassVar[str] = "pooled"  # "pooled": (batch, 2, 1024); "spatial": (batch, 98, 1024)

    def encode(self, features: tf.Tensor) -> tuple[tf.Tensor, ...]:
        raise NotImplementedError

    def decode_step(self, tokens: tf.Tensor, state: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        raise NotImplementedError

    def set_embedding_matrix(self, matrix: np.ndarray) -> None:
        """Copy a (vocab, dim) matrix into the word embedding, e.g. GloVe vectors."""
        embedding = self.word_embedding
        if not embedding.built:
            embedding.build((None, None))
        if tuple(embedding.embeddings.shape) != matrix.shape:
            raise ValueError(f"embedding matrix {matrix.shape} does not match the layer {tuple(embedding.embeddings.shape)}")
        embedding.embeddings.assign(matrix.astype(np.float32))


class AttentionReportGenerator(ReportGenerator):
    """A generator whose decoder attends over feature regions at every step."""

    def decode_step_with_attention(
        self, tokens: tf.Tensor, state: tuple[tf.Tensor, ...]
    ) -> tuple[tf.Tensor, tuple[tf.Tensor, ...], tf.Tensor]:
        """Decode one step: tokens (batch,) to logits (batch, vocab), the next state and the
        attention weights float32 (batch, regions) that sum to 1 over regions."""
        raise NotImplementedError

    def decode_step(self, tokens: tf.Tensor, state: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        logits, state, _ = self.decode_step_with_attention(tokens, state)
        return logits, state


@keras.saving.register_keras_serializable(package="cxrgen")
def masked_loss(target_ids: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Cross-entropy summed over real tokens and divided by their count.

    ``target_ids`` int (batch, steps), 0 for padding; ``logits`` float (batch, steps, vocab).
    Returns a scalar: mean nats per real target token in the batch.
    """
    target_ids = tf.cast(target_ids, tf.int32)
    mask = tf.cast(target_ids != 0, logits.dtype)
    losses = keras.losses.sparse_categorical_crossentropy(target_ids, logits, from_logits=True)
    return tf.reduce_sum(losses * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


@keras.saving.register_keras_serializable(package="cxrgen")
def masked_accuracy(target_ids: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Share of real target tokens (id != 0) whose arg-max prediction is right."""
    target_ids = tf.cast(target_ids, tf.int32)
    mask = tf.cast(target_ids != 0, tf.float32)
    hits = tf.cast(tf.argmax(logits, axis=-1, output_type=tf.int32) == target_ids, tf.float32)
    return tf.reduce_sum(hits * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
