"""The ``bigru`` model: a bidirectional GRU reads the image regions, a forward GRU writes.

A bidirectional GRU over the decoder's input words would let its backward direction at
position t read words t+1 onwards. The model would then see in training the words it must
predict, which do not exist yet at generation time. So here the bidirectional GRU runs over
the image regions, which are all known before decoding starts, and the words pass only
through a forward GRU.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.models.base import ReportGenerator


@keras.saving.register_keras_serializable(package="cxrgen")
class BiGRUGenerator(ReportGenerator):
    """Bidirectional GRU encoder over the 98 spatial regions, forward-only GRU decoder.

    What runs in which direction:

    * Encoder, bidirectional, over image regions only: the 98 region vectors (batch, 98, 1024)
      pass a ReLU dense layer to (batch, 98, units). One GRU of ``units // 2`` reads them in
      order 0 to 97 (view 0's 7x7 grid row by row, then view 1's), a second GRU of
      ``units // 2`` reads 97 to 0. Their final states, concatenated and passed through a tanh
      dense layer, give the image summary (batch, units).
    * Decoder, forward only, over words: a GRU of ``units`` starts from the image summary and
      reads word 0 (``<start>``) to word t, each word's embedding concatenated with the image
      summary. The logits at position t depend on words 0..t only.

    The decoding state is (summary, hidden), both (batch, units).
    """

    feature_kind = "spatial"

    def __init__(self, vocab_size: int, embedding_dim: int, units: int, dropout: float, train_embedding: bool, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.embedding_dim, self.units = vocab_size, embedding_dim, units
        self.dropout_rate, self.train_embedding = dropout, train_embedding
        self.feature_dropout = keras.layers.Dropout(dropout)
        self.region_projection = keras.layers.Dense(units, activation="relu", name="regions")
        self.region_reader = keras.layers.Bidirectional(keras.layers.GRU(units // 2), merge_mode="concat", name="region_reader")
        self.summary = keras.layers.Dense(units, activation="tanh", name="summary")
        self.word_embedding = keras.layers.Embedding(vocab_size, embedding_dim, trainable=train_embedding, name="words")
        self.input_dropout = keras.layers.Dropout(dropout)
        self.decoder = keras.layers.GRU(units, return_sequences=True, return_state=True, name="decoder")
        self.output_dropout = keras.layers.Dropout(dropout)
        self.vocabulary_logits = keras.layers.Dense(vocab_size, name="logits")

    def encode(self, features: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Spatial features (batch, 98, 1024) to (summary, hidden), both (batch, units); the
        decoder starts from the summary."""
        features = self.feature_dropout(tf.cast(features, tf.float32), training=training)
        regions = self.region_projection(features)
        summary = self.summary(self.region_reader(regions, training=training))
        return summary, summary

    def _decoder_inputs(self, tokens: tf.Tensor, summary: tf.Tensor, training: bool) -> tf.Tensor:
        """Tokens (batch, steps) to (batch, steps, embedding_dim + units)."""
        embedded = self.input_dropout(self.word_embedding(tokens), training=training)
        repeated = tf.repeat(summary[:, None, :], tf.shape(tokens)[1], axis=1)
        return tf.concat([embedded, repeated], axis=-1)

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing: features (batch, 98, 1024), tokens (batch, steps) to logits (batch, steps, vocab)."""
        features, tokens = inputs
        summary, hidden = self.encode(features, training=training)
        sequence, _ = self.decoder(self._decoder_inputs(tokens, summary, training), initial_state=hidden, training=training)
        return self.vocabulary_logits(self.output_dropout(sequence, training=training))

    def decode_step(self, tokens: tf.Tensor, state: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tuple]:
        """Decode one step: tokens (batch,) and (summary, hidden) to logits (batch, vocab) and the next state."""
        summary, hidden = state
        output, hidden = self.decoder(self._decoder_inputs(tokens[:, None], summary, False), initial_state=hidden)
        return self.vocabulary_logits(output[:, 0]), (summary, hidden)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "dropout": self.dropout_rate,
            "train_embedding": self.train_embedding,
        }
