"""The ``attention`` and ``spatial`` models: Bahdanau attention read by a GRU decoder.

Both models project every feature region to ``units``. At each step they score the regions
against the previous decoder state with additive (Bahdanau) attention. ``attention``
attends over the two views' pooled vectors (2 regions). ``spatial`` attends over the
98 regions of the 7x7 DenseNet grids of both views: regions 0-48 are view 0 in row-major
order, regions 49-97 are view 1.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.models.base import AttentionReportGenerator


@keras.saving.register_keras_serializable(package="cxrgen")
class AdditiveAttention(keras.layers.Layer):
    """Bahdanau scoring: ``score_r = v . tanh(W_k m_r + W_q h)``, softmax over regions r."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.key_projection = keras.layers.Dense(units, use_bias=False, name="keys")
        self.query_projection = keras.layers.Dense(units, name="query")
        self.score = keras.layers.Dense(1, use_bias=False, name="score")

    def build(self, memory_shape, query_shape) -> None:
        self.key_projection.build(memory_shape)
        self.query_projection.build(query_shape)
        self.score.build((*memory_shape[:-1], self.units))

    def project_keys(self, memory: tf.Tensor) -> tf.Tensor:
        """Memory (batch, regions, memory units) to keys (batch, regions, attention units).

        Keys do not change during decoding, so they are computed once and kept in the state.
        """
        return self.key_projection(memory)

    def call(self, keys: tf.Tensor, memory: tf.Tensor, query: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Keys (batch, regions, attention units), memory (batch, regions, units), query
        (batch, query units) to the context (batch, units) and weights (batch, regions)."""
        scores = self.score(tf.tanh(keys + self.query_projection(query)[:, None, :]))[..., 0]
        weights = tf.nn.softmax(scores, axis=-1)
        context = tf.einsum("br,bru->bu", weights, memory)
        return context, weights

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="cxrgen")
class AttentionGRU(AttentionReportGenerator):
    """Bahdanau attention over pooled features (2 regions, one per view) with a GRU decoder.

    ``encode`` passes features (batch, regions, 1024) through a ReLU dense layer to the
    memory (batch, regions, units). The initial GRU state is a tanh dense layer of the mean
    region. Each step computes the context from the previous GRU state and feeds the previous
    word's embedding with the context to the GRU. The next word is predicted from the new GRU
    state and the context. The decoding state is (memory, keys, hidden).
    """

    feature_kind = "pooled"

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        units: int,
        attention_units: int,
        dropout: float,
        train_embedding: bool,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size, self.embedding_dim, self.units = vocab_size, embedding_dim, units
        self.attention_units, self.dropout_rate, self.train_embedding = attention_units, dropout, train_embedding
        self.region_projection = keras.layers.Dense(units, activation="relu", name="regions")
        self.initial_hidden = keras.layers.Dense(units, activation="tanh", name="initial_hidden")
        self.attention = AdditiveAttention(attention_units, name="attention")
        self.word_embedding = keras.layers.Embedding(vocab_size, embedding_dim, trainable=train_embedding, name="words")
        self.cell = keras.layers.GRUCell(units, name="decoder")
        self.feature_dropout = keras.layers.Dropout(dropout)
        self.input_dropout = keras.layers.Dropout(dropout)
        self.output_dropout = keras.layers.Dropout(dropout)
        self.vocabulary_logits = keras.layers.Dense(vocab_size, name="logits")

    def build(self, input_shape) -> None:
        """Create every weight from the shapes of (features, tokens), as ``call`` uses them
        inside a ``tf.scan`` loop, where Keras cannot create weights."""
        features_shape = tuple(input_shape[0])
        self.region_projection.build(features_shape)
        self.initial_hidden.build((None, self.units))
        self.attention.build((None, features_shape[1], self.units), (None, self.units))
        self.word_embedding.build((None, None))
        self.cell.build((None, self.embedding_dim + self.units))
        self.vocabulary_logits.build((None, 2 * self.units))

    def encode(self, features: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Features (batch, regions, 1024) to the state: memory (batch, regions, units),
        keys (batch, regions, attention_units) and the GRU state (batch, units)."""
        features = self.feature_dropout(tf.cast(features, tf.float32), training=training)
        memory = self.region_projection(features)
        hidden = self.initial_hidden(tf.reduce_mean(memory, axis=1))
        return memory, self.attention.project_keys(memory), hidden

    def _step(self, embedded: tf.Tensor, memory: tf.Tensor, keys: tf.Tensor, hidden: tf.Tensor):
        """Embedded word (batch, embedding_dim) and the previous GRU state (batch, units) to
        the new GRU state, the context (batch, units) and the weights (batch, regions)."""
        context, weights = self.attention(keys, memory, hidden)
        new_hidden, _ = self.cell(tf.concat([embedded, context], axis=-1), [hidden])
        return new_hidden, context, weights

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing: features (batch, regions, 1024), tokens (batch, steps) to logits (batch, steps, vocab)."""
        features, tokens = inputs
        memory, keys, hidden = self.encode(features, training=training)
        embedded = self.input_dropout(self.word_embedding(tokens), training=training)

        def step(carry, embedded_word):
            new_hidden, context, _ = self._step(embedded_word, memory, keys, carry[0])
            return new_hidden, context

        # tf.scan runs over time-major input: (steps, batch, embedding_dim).
        hiddens, contexts = tf.scan(
            step, tf.transpose(embedded, (1, 0, 2)), initializer=(hidden, tf.zeros_like(hidden))
        )
        outputs = tf.transpose(tf.concat([hiddens, contexts], axis=-1), (1, 0, 2))
        return self.vocabulary_logits(self.output_dropout(outputs, training=training))

    def decode_step_with_attention(self, tokens: tf.Tensor, state: tuple[tf.Tensor, tf.Tensor, tf.Tensor]):
        """Tokens (batch,) and (memory, keys, hidden) to logits (batch, vocab), the next
        state and the attention weights (batch, regions)."""
        memory, keys, hidden = state
        new_hidden, context, weights = self._step(self.word_embedding(tokens), memory, keys, hidden)
        logits = self.vocabulary_logits(tf.concat([new_hidden, context], axis=-1))
        return logits, (memory, keys, new_hidden), weights

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "attention_units": self.attention_units,
            "dropout": self.dropout_rate,
            "train_embedding": self.train_embedding,
        }


@keras.saving.register_keras_serializable(package="cxrgen")
class SpatialAttentionGRU(AttentionGRU):
    """``AttentionGRU`` over the 98 spatial regions (batch, 98, 1024) of both views.

    The weights of ``decode_step_with_attention`` reshape to two 7x7 maps: regions 0-48 are
    view 0 in row-major order, regions 49-97 view 1.
    """

    feature_kind = "spatial"
