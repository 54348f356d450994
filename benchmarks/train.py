"""Time one training epoch of every model, and the input pipeline against the training step.

Builds a local Open-I mirror of N studies (300 by default) in a work folder, runs download,
extract, featurize (random DenseNet-121 weights) and tokenize once, then for each model:

* seconds of the first epoch (graph tracing and XLA compilation included), and the median
  seconds of the next ``TIMED_EPOCHS`` epochs;
* training steps per second in those epochs, and batches per second that the input
  pipeline (``pipeline.dataset.TrainingBatches``) delivers on its own.

The input pipeline keeps up when ``input/step`` is well above 1. Timings on a shared
machine are noisy, so each model's epoch time is also printed as a ratio to ``simple``
measured in the same process.

Run: python benchmarks/train.py [--studies 300] [--workdir DIR] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import download, extract, featurize, tokenize, trainer  # noqa: E402
from pipeline.config import MODEL_NAMES, Params, load_params  # noqa: E402
from pipeline.dataset import TrainingBatches, load_split  # noqa: E402
from pipeline.logs import setup_logging  # noqa: E402
from pipeline.models import MODELS  # noqa: E402
from pipeline.tokenizer import Tokenizer  # noqa: E402

logger = logging.getLogger("benchmarks.train")
TIMED_EPOCHS = 3
MIRROR_TOOL = Path(os.environ.get("CXRGEN_SHARED", REPO_ROOT.parent / "shared")) / "tools" / "make-openi-mirror"


def prepare(workdir: Path, studies: int, params: Params) -> None:
    """Build the mirror and run the stages up to tokenize in ``workdir``, unless already done."""
    if (workdir / "data" / "text" / "targets.parquet").is_file():
        logger.info("reusing prepared features and text in %s", workdir)
        return
    subprocess.run([str(MIRROR_TOOL), str(workdir / "mirror"), "--studies", str(studies)], check=True)
    os.chdir(workdir)
    download.run(params.download.model_copy(update={"mirror": str(workdir / "mirror")}))
    extract.run(params.extract, params.split)
    featurize.run(params.featurize.model_copy(update={"weights": "random"}))
    tokenize.run(params.tokenize)


def time_model(name: str, params: Params, workdir: Path) -> dict:
    """Time training epochs of ``name`` on the train split, and its input pipeline alone."""
    params = params.model_copy(update={"model": name})
    features_path, targets_path = workdir / "features" / "chexnet.h5", workdir / "data" / "text" / "targets.parquet"
    train = load_split(features_path, targets_path, "train", MODELS[name].feature_kind)
    vocab_size = Tokenizer.load(workdir / "data" / "text" / "tokenizer.json").vocab_size
    matrix = np.load(workdir / "data" / "text" / "embeddings.npy")
    model = trainer.compile_model(params, train, vocab_size, matrix)
    batches = TrainingBatches(train, params.train.batch_size, params.train.seed)
    steps = -(-len(train) // params.train.batch_size)

    epoch_seconds = []
    for epoch in range(1 + TIMED_EPOCHS):
        start = time.perf_counter()
        model.fit(batches.epoch(epoch), epochs=1, shuffle=False, verbose=0)
        epoch_seconds.append(time.perf_counter() - start)
    steady_seconds = float(np.median(epoch_seconds[1:]))

    input_seconds = []
    for epoch in range(TIMED_EPOCHS):
        start = time.perf_counter()
        for _ in batches.epoch(epoch):
            pass
        input_seconds.append(time.perf_counter() - start)
    return {
        "model": name,
        "train_studies": len(train),
        "steps_per_epoch": steps,
        "first_epoch_s": round(epoch_seconds[0], 2),
        "epoch_s": round(steady_seconds, 2),
        "steps_per_s": round(steps / steady_seconds, 2),
        "input_batches_per_s": round(steps / float(np.median(input_seconds)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300, help="studies in the mirror")
    parser.add_argument("--workdir", type=Path, help="folder for mirror, features and text (default: a temporary one)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    arguments = parser.parse_args()
    setup_logging("WARNING")
    logger.setLevel(logging.INFO)

    params = load_params(REPO_ROOT / "params.yaml")
    workdir = (arguments.workdir or Path(tempfile.mkdtemp(prefix="cxrgen-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir, arguments.studies, params)

    results = [time_model(name, params, workdir) for name in arguments.models]
    baseline = next((row["epoch_s"] for row in results if row["model"] == "simple"), None)
    print("| model | first epoch (s) | epoch (s) | epoch / simple | steps/s | input batches/s | input/step |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        ratio = f"{row['epoch_s'] / baseline:.1f}" if baseline else "-"
        row["input_over_step"] = round(row["input_batches_per_s"] / row["steps_per_s"], 1)
        print(
            f"| {row['model']} | {row['first_epoch_s']} | {row['epoch_s']} | {ratio} | {row['steps_per_s']} "
            f"| {row['input_batches_per_s']} | {row['input_over_step']} |"
        )
    if arguments.output:
        arguments.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
