"""The ``simple`` model: pooled features of both views set the state of an LSTM decoder."""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.models.base import ReportGenerator


@keras.saving.register_keras_serializable(package="cxrgen")
class SimpleLSTM(ReportGenerator):
    """Encoder-decoder with no attention.

    The two views' pooled vectors (batch, 2, 1024) are concatenated to (batch, 2048) and
    mapped by two dense layers to the LSTM's initial hidden and cell states (batch, units).
    Each step embeds the previous word and predicts the next one.
    """

    feature_kind = "pooled"

    def __init__(self, vocab_size: int, embedding_dim: int, units: int, dropout: float, train_embedding: bool, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.embedding_dim, self.units = vocab_size, embedding_dim, units
        self.dropout_rate, self.train_embedding = dropout, train_embedding
        self.feature_dropout = keras.layers.Dropout(dropout)
        self.initial_hidden = keras.layers.Dense(units, activation="tanh", name="initial_hidden")
        self.initial_cell = keras.layers.Dense(units, name="initial_cell")
        self.word_embedding = keras.layers.Embedding(vocab_size, embedding_dim, trainable=train_embedding, name="words")
        self.decoder = keras.layers.LSTM(units, return_sequences=True, return_state=True, name="decoder")
        self.output_dropout = keras.layers.Dropout(dropout)
        self.vocabulary_logits = keras.layers.Dense(vocab_size, name="logits")

    def encode(self, features: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Map pooled features (batch, 2, 1024) to the LSTM state: two (batch, units) tensors."""
        flat = tf.reshape(tf.cast(features, tf.float32), (-1, features.shape[1] * features.shape[2]))
        flat = self.feature_dropout(flat, training=training)
        return self.initial_hidden(flat), self.initial_cell(flat)

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing: features (batch, 2, 1024), tokens (batch, steps) to logits (batch, steps, vocab)."""
        features, tokens = inputs
        hidden, cell = self.encode(features, training=training)
        sequence, _, _ = self.decoder(self.word_embedding(tokens), initial_state=[hidden, cell], training=training)
        return self.vocabulary_logits(self.output_dropout(sequence, training=training))

    def decode_step(self, tokens: tf.Tensor, state: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tuple]:
        """One step: tokens (batch,) and state to logits (batch, vocab) and the next state."""
        embedded = self.word_embedding(tokens[:, None])
        output, hidden, cell = self.decoder(embedded, initial_state=list(state))
        return self.vocabulary_logits(output[:, 0]), (hidden, cell)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "dropout": self.dropout_rate,
            "train_embedding": self.train_embedding,
        }
