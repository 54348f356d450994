"""Report generation from a trained model."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.models import ReportGenerator
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
