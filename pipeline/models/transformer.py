"""The ``transformer`` model: a small pre-norm transformer decoder over the 98 spatial regions.

Each block applies causal self-attention over the words, cross-attention from the words to
the image regions, and a feed-forward layer, each with a residual connection and layer
normalisation before it (pre-norm).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.models.base import AttentionReportGenerator


@keras.saving.register_keras_serializable(package="cxrgen")
class DecoderBlock(keras.layers.Layer):
    """Causal self-attention, cross-attention over regions, and a feed-forward layer."""

    def __init__(self, units: int, heads: int, feed_forward_units: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.units, self.heads, self.feed_forward_units, self.dropout_rate = units, heads, feed_forward_units, dropout
        self.self_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="self_norm")
        self.self_attention = keras.layers.MultiHeadAttention(heads, units // heads, dropout=dropout, name="self_attention")
        self.cross_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="cross_norm")
        self.cross_attention = keras.layers.MultiHeadAttention(heads, units // heads, dropout=dropout, name="cross_attention")
        self.feed_forward_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="feed_forward_norm")
        self.feed_forward = keras.Sequential(
            [keras.layers.Dense(feed_forward_units, activation="gelu"), keras.layers.Dense(units)], name="feed_forward"
        )
        self.residual_dropout = keras.layers.Dropout(dropout)

    def build(self, words_shape, memory_shape) -> None:
        for norm in (self.self_norm, self.cross_norm, self.feed_forward_norm):
            norm.build(words_shape)
        self.self_attention.build(words_shape, words_shape)
        self.cross_attention.build(words_shape, memory_shape)
        self.feed_forward.build(words_shape)

    def call(self, words: tf.Tensor, memory: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Words (batch, steps, units) and memory (batch, regions, units) to new words
        (batch, steps, units) and cross-attention weights (batch, heads, steps, regions)."""
        normed = self.self_norm(words)
        attended = self.self_attention(normed, normed, use_causal_mask=True, training=training)
        words = words + self.residual_dropout(attended, training=training)

        attended, weights = self.cross_attention(
            self.cross_norm(words), memory, return_attention_scores=True, training=training
        )
        words = words + self.residual_dropout(attended, training=training)

        transformed = self.feed_forward(self.feed_forward_norm(words), training=training)
        return words + self.residual_dropout(transformed, training=training), weights

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "units": self.units,
            "heads": self.heads,
            "feed_forward_units": self.feed_forward_units,
            "dropout": self.dropout_rate,
        }


@keras.saving.register_keras_serializable(package="cxrgen")
class TransformerGenerator(AttentionReportGenerator):
    """Transformer decoder with cross-attention over the 98 spatial regions of both views.

    Regions (batch, 98, 1024) are projected to ``units`` and get a learned embedding per
    region position. Words get a GloVe embedding projected to ``units`` plus a learned
    position embedding for positions 0 to ``max_length - 1``.

    The decoding state is (memory (batch, 98, units), token buffer int32 (batch, max_length),
    step int32 (batch,)). Each ``decode_step`` writes the new token at the row's step into the
    buffer and reruns the decoder over the whole buffer. The causal mask keeps the later,
    still empty slots from affecting the output. With no key-value cache, each step costs a
    decoder pass over max_length positions.
    """

    feature_kind = "spatial"

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        units: int,
        heads: int,
        layers: int,
        feed_forward_units: int,
        dropout: float,
        max_length: int,
        train_embedding: bool,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size, self.embedding_dim, self.units, self.heads = vocab_size, embedding_dim, units, heads
        self.layer_count, self.feed_forward_units, self.dropout_rate = layers, feed_forward_units, dropout
        self.max_length, self.train_embedding = max_length, train_embedding
        self.region_projection = keras.layers.Dense(units, name="regions")
        self.word_embedding = keras.layers.Embedding(vocab_size, embedding_dim, trainable=train_embedding, name="words")
        self.word_projection = keras.layers.Dense(units, name="word_projection")
        self.position_embedding = keras.layers.Embedding(max_length, units, name="positions")
        self.blocks = [
            DecoderBlock(units, heads, feed_forward_units, dropout, name=f"block_{index}") for index in range(layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        self.memory_dropout = keras.layers.Dropout(dropout)
        self.input_dropout = keras.layers.Dropout(dropout)
        self.vocabulary_logits = keras.layers.Dense(vocab_size, name="logits")

    def build(self, input_shape) -> None:
        """Create every weight from the shapes of (features, tokens)."""
        features_shape = tuple(input_shape[0])
        self.region_projection.build(features_shape)
        self.region_positions = self.add_weight(
            shape=(features_shape[1], self.units), initializer="zeros", name="region_positions"
        )
        self.word_embedding.build((None, None))
        self.word_projection.build((None, None, self.embedding_dim))
        self.position_embedding.build((None, None))
        for block in self.blocks:
            block.build((None, None, self.units), (None, features_shape[1], self.units))
        self.final_norm.build((None, None, self.units))
        self.vocabulary_logits.build((None, self.units))

    def encode(self, features: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Features (batch, 98, 1024) to the state: memory (batch, 98, units), an empty token
        buffer int32 (batch, max_length) and step 0 int32 (batch,)."""
        memory = self.region_projection(tf.cast(features, tf.float32)) + self.region_positions
        batch = tf.shape(features)[0]
        buffer = tf.zeros((batch, self.max_length), tf.int32)
        return self.memory_dropout(memory, training=training), buffer, tf.zeros((batch,), tf.int32)

    def _decode(self, tokens: tf.Tensor, memory: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """Tokens (batch, steps) to normalised outputs (batch, steps, units) and the last
        block's cross-attention weights (batch, heads, steps, regions)."""
        positions = tf.range(tf.shape(tokens)[1])
        words = self.word_projection(self.word_embedding(tokens)) + self.position_embedding(positions)[None]
        words = self.input_dropout(words, training=training)
        weights = None
        for block in self.blocks:
            words, weights = block(words, memory, training=training)
        return self.final_norm(words), weights

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing: features (batch, 98, 1024), tokens (batch, steps) to logits
        (batch, steps, vocab); steps must not exceed max_length."""
        features, tokens = inputs
        memory, _, _ = self.encode(features, training=training)
        outputs, _ = self._decode(tokens, memory, training=training)
        return self.vocabulary_logits(outputs)

    def decode_step_with_attention(self, tokens: tf.Tensor, state: tuple[tf.Tensor, tf.Tensor, tf.Tensor]):
        """Tokens (batch,) and (memory, buffer, step) to logits (batch, vocab), the next
        state and the last block's cross-attention, averaged over heads, (batch, regions).

        Raises InvalidArgumentError when a row's step reaches max_length.
        """
        memory, buffer, step = state
        check = tf.debugging.assert_less(
            step, self.max_length, message="transformer: decoding past max_length; raise train.transformer.max_length"
        )
        with tf.control_dependencies([check]):
            slot = tf.one_hot(step, self.max_length, dtype=tf.int32)
        buffer = buffer * (1 - slot) + tokens[:, None] * slot

        outputs, weights = self._decode(buffer, memory, training=False)
        current = tf.gather(outputs, step, axis=1, batch_dims=1)
        current_weights = tf.gather(tf.transpose(weights, (0, 2, 1, 3)), step, axis=1, batch_dims=1)
        return self.vocabulary_logits(current), (memory, buffer, step + 1), tf.reduce_mean(current_weights, axis=1)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "heads": self.heads,
            "layers": self.layer_count,
            "feed_forward_units": self.feed_forward_units,
            "dropout": self.dropout_rate,
            "max_length": self.max_length,
            "train_embedding": self.train_embedding,
        }
