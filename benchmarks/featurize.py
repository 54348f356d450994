"""Benchmark the featurize stage on real 1024x1024 NIH radiographs.

Run from the repository root: ``python benchmarks/featurize.py``. In one process it times

* the stage (hashing, decoding, the model, the cache shards and chexnet.h5) on an empty cache,
* a naive loop that reads, resizes and calls ``model.predict`` one image at a time,
* the model's forward pass alone on preloaded tensors, in batches of ``batch_size``,

at float32 and bfloat16, with random weights (the compute is the same as CheXNet's). Each
round runs forward, stage, naive, stage, forward, so that a drift in the machine's load
cancels out of the round's ratios, and the medians over ``--rounds`` rounds are reported.
Model building and tracing happen before the timed part for all three. It then compares bfloat16 with float32 features, measures file size and read time
of chexnet.h5 per HDF5 compression, runs the stage in child processes on 600 and 3,000
distinct images for peak RSS, and estimates time and storage for MIMIC-CXR. The last line
is ``speedup_vs_naive=<x> fraction_of_forward=<y>``, both at float32.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.config import FeaturizeParams  # noqa: E402
from pipeline.extractor import ExtractorSettings, FeatureExtractor  # noqa: E402
from pipeline.features import open_features  # noqa: E402
from pipeline.featurize import Featurizer  # noqa: E402
from pipeline.images import preprocess_radiograph  # noqa: E402

DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "nih-cxr-sample"
MIMIC_IMAGES = 377_110  # MIMIC-CXR v2 radiographs
MIMIC_STUDIES = 227_835


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of PNG radiographs")
    parser.add_argument("--rounds", type=int, default=5, help="paired timing rounds; medians are reported")
    parser.add_argument("--naive-images", type=int, default=48, help="images per round of the slow naive loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rss-counts", default="600,3000", help="image counts for the peak RSS runs; empty skips them")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def params_for(batch_size: int, precision: str = "float32", **changes) -> FeaturizeParams:
    return FeaturizeParams(weights="random", batch_size=batch_size, precision=precision, **changes)


def make_project(root: Path, image_paths: list[Path]) -> tuple[Path, Path, Path]:
    """Pair consecutive images into two-view studies; return studies, images folder and manifest paths."""
    ids = [path.stem for path in image_paths]
    studies = pd.DataFrame(
        {"study_id": [f"S{index:06d}" for index in range(len(ids) // 2)],
         "view_image_ids": [ids[index : index + 2] for index in range(0, len(ids) - 1, 2)]}
    )
    root.mkdir(parents=True, exist_ok=True)
    studies.to_parquet(root / "studies.parquet")
    (root / "manifest.json").write_text("{}")
    return root / "studies.parquet", image_paths[0].parent, root / "manifest.json"


def time_stage(featurizer: Featurizer, project: tuple[Path, Path, Path], work: Path, images: int) -> float:
    """Return images/s of one stage run on an empty cache."""
    cache, output = work / "cache", work / "chexnet.h5"
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    featurizer.run(*project, output, cache)
    return images / (time.perf_counter() - start)


def bare_forward(model: tf.keras.Model, pixels: np.ndarray, batch_size: int, precision: str):
    """Compile the plain forward pass (any batch size, no padding); return a function timing it in images/s."""
    compute_dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32

    @tf.function(reduce_retracing=True)
    def forward(batch):
        spatial = tf.cast(model(tf.cast(batch, compute_dtype), training=False), tf.float32)
        return tf.reduce_mean(spatial, axis=[1, 2]), tf.cast(spatial, tf.float16)

    def images_per_second() -> float:
        start = time.perf_counter()
        for first in range(0, len(pixels), batch_size):
            pooled, spatial = forward(tf.constant(pixels[first : first + batch_size]))
            pooled.numpy(), spatial.numpy()
        return len(pixels) / (time.perf_counter() - start)

    images_per_second()  # traces both batch shapes
    return images_per_second


def naive_loop(model: tf.keras.Model, paths: list[Path], image_size: int) -> float:
    """Read, resize and predict one image at a time, as the reference article did; return images/s."""
    start = time.perf_counter()
    for path in paths:
        pixels = preprocess_radiograph(path, image_size, 50_000_000)[None]
        spatial = model.predict(pixels, verbose=0)
        spatial.mean(axis=(1, 2))
    return len(paths) / (time.perf_counter() - start)


def measure_precision(precision: str, paths: list[Path], pixels: np.ndarray, work: Path, args) -> dict:
    """Time the stage, the bare forward pass and (at float32) the naive loop in paired rounds.

    Each round runs forward, stage, naive, stage, forward, so a slow drift in the machine's
    load cancels out of the round's ratios. Returns the median over rounds of each rate and
    of the ratios stage/forward and stage/naive.
    """
    featurizer = Featurizer(params_for(args.batch_size, precision), work / "converted")
    model = featurizer.extractor.model
    featurizer.run(*make_project(work / "warm", paths[:4]), work / "warm.h5", work / "warm-cache")
    forward = bare_forward(model, pixels, args.batch_size, precision)
    naive = precision == "float32"
    if naive:
        model.predict(pixels[:1], verbose=0)
    project = make_project(work / "project", paths)
    rounds = []
    for round_index in range(args.rounds):
        first_forward = forward()
        first_stage = time_stage(featurizer, project, work / precision, len(paths))
        naive_rate = naive_loop(model, paths[: args.naive_images], 224) if naive else float("nan")
        stage = (first_stage + time_stage(featurizer, project, work / precision, len(paths))) / 2
        bare = (first_forward + forward()) / 2
        rounds.append({"stage": stage, "forward": bare, "naive": naive_rate,
                       "fraction_of_forward": stage / bare, "speedup_vs_naive": stage / naive_rate})
        naive_text = f", naive {naive_rate:.1f}" if naive else ""
        ratio_text = f", stage/naive {stage / naive_rate:.2f}" if naive else ""
        print(f"  {precision} round {round_index + 1}: stage {stage:.1f}, forward {bare:.1f}{naive_text} images/s; "
              f"stage/forward {stage / bare:.3f}{ratio_text}", flush=True)
    medians = {name: float(np.median([entry[name] for entry in rounds])) for name in rounds[0]}
    return {**medians, "featurizer": featurizer, "project": project}


def precision_difference(backbone: tf.keras.Model, pixels: np.ndarray, batch_size: int) -> dict:
    """Compare bfloat16 with float32 features of the same images, both kept as float32."""
    outputs = {}
    for precision in ("float32", "bfloat16"):
        extractor = FeatureExtractor(backbone, ExtractorSettings(224, batch_size, precision, "float32", 50_000_000))
        parts = [extractor.forward(pixels[first : first + batch_size]) for first in range(0, len(pixels), batch_size)]
        outputs[precision] = (np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts]))
    (pooled32, spatial32), (pooled16, spatial16) = outputs["float32"], outputs["bfloat16"]
    cosine = np.sum(pooled32 * pooled16, axis=1) / (np.linalg.norm(pooled32, axis=1) * np.linalg.norm(pooled16, axis=1))
    return {
        "spatial_max_abs": float(np.abs(spatial32 - spatial16).max()),
        "spatial_max_value": float(np.abs(spatial32).max()),
        "spatial_relative_l2": float(np.linalg.norm(spatial32 - spatial16) / np.linalg.norm(spatial32)),
        "pooled_min_cosine": float(cosine.min()),
    }


def compression_table(featurizer: Featurizer, project, work: Path) -> list[dict]:
    """Write chexnet.h5 from the filled cache with each compression; measure size and read times."""
    rows = []
    original = featurizer.params
    for compression in ("none", "lzf", "gzip"):
        featurizer.params = original.model_copy(update={"compression": compression})
        output = work / f"chexnet-{compression}.h5"
        start = time.perf_counter()
        featurizer.run(*project, output, work / "float32" / "cache")
        assemble = time.perf_counter() - start
        rows.append({"compression": compression, "bytes": output.stat().st_size, "assemble_s": assemble,
                     **read_times(output)})
    featurizer.params = original
    return rows


def read_times(path: Path) -> dict:
    """Time reading every study by id in shuffled order, and all pooled features at once."""
    _drop_page_cache_hint(path)
    with open_features(path) as store:
        order = list(np.random.default_rng(0).permutation(store.study_ids))
        start = time.perf_counter()
        for study_id in order:
            _ = store[study_id]
        per_study = (time.perf_counter() - start) / len(order)
        start = time.perf_counter()
        store.read(store.study_ids, "pooled")
        pooled_all = time.perf_counter() - start
    return {"study_read_ms": per_study * 1000, "pooled_all_ms": pooled_all * 1000}


def _drop_page_cache_hint(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def png_variant(data: bytes, number: int) -> bytes:
    """Return the PNG with a tEXt chunk before IEND: same pixels, a distinct file sha256."""
    text = b"cxrgen-benchmark\x00" + str(number).encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return data[:-12] + chunk + data[-12:]


def peak_rss(counts: list[int], paths: list[Path], work: Path, batch_size: int) -> list[dict]:
    """Run the stage in a child process per image count; return each child's peak RSS and rate."""
    originals = [path.read_bytes() for path in paths]
    variants = work / "variants"
    variants.mkdir()
    written = []
    for number in range(max(counts)):
        target = variants / f"V{number:06d}.png"
        target.write_bytes(png_variant(originals[number % len(originals)], number))
        written.append(target)
    results = []
    for count in counts:
        project = work / f"rss-{count}"
        make_project(project, written[:count])
        command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(project), "--batch-size", str(batch_size)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        values = dict(part.split("=") for part in output.split())
        results.append({"images": count, "rss_mib": float(values["rss_mib"]), "rate": float(values["rate"])})
        print(f"  {count} images: peak RSS {results[-1]['rss_mib']:.0f} MiB, {results[-1]['rate']:.1f} images/s", flush=True)
    shutil.rmtree(variants)
    return results


def rss_child(project: Path, batch_size: int) -> None:
    featurizer = Featurizer(params_for(batch_size), project / "converted")
    images = 2 * len(pd.read_parquet(project / "studies.parquet"))
    start = time.perf_counter()
    featurizer.run(project / "studies.parquet", project.parent / "variants", project / "manifest.json",
                   project / "chexnet.h5", project / "cache")
    rate = images / (time.perf_counter() - start)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rss_mib={rss_mib:.1f} rate={rate:.2f}")


def storage_per_item(work: Path, project) -> tuple[float, float]:
    """Return cache bytes per image and chexnet.h5 bytes per study of the float32 run."""
    shards = list((work / "float32" / "cache").glob("*/shards/*.h5"))
    images = 2 * len(pd.read_parquet(project[0]))
    studies = len(pd.read_parquet(project[0]))
    return sum(path.stat().st_size for path in shards) / images, (work / "float32" / "chexnet.h5").stat().st_size / studies


def report(results: dict, difference: dict, compression: list[dict], rss: list[dict], storage: tuple[float, float]) -> None:
    f32, bf16 = results["float32"], results["bfloat16"]
    print(f"\nimages/s, medians of rounds: naive {f32['naive']:.1f}; float32 forward {f32['forward']:.1f}, "
          f"stage {f32['stage']:.1f}; bfloat16 forward {bf16['forward']:.1f}, stage {bf16['stage']:.1f}")
    print(f"bfloat16: stage {bf16['stage'] / f32['stage']:.2f}x float32 stage, forward {bf16['forward'] / f32['forward']:.2f}x; "
          f"fraction_of_forward {bf16['fraction_of_forward']:.3f}")
    print("bfloat16 vs float32 features: spatial max |diff| {spatial_max_abs:.4f} (max value {spatial_max_value:.3f}), "
          "relative L2 {spatial_relative_l2:.4f}, pooled min cosine {pooled_min_cosine:.5f}".format(**difference))
    print("compression: " + "; ".join(
        f"{row['compression']} {row['bytes'] / 2**20:.1f} MiB, study {row['study_read_ms']:.2f} ms, "
        f"all pooled {row['pooled_all_ms']:.1f} ms, assemble {row['assemble_s']:.2f} s" for row in compression))
    for row in rss:
        print(f"peak RSS at {row['images']} images: {row['rss_mib']:.0f} MiB ({row['rate']:.1f} images/s)")
    per_image, per_study = storage
    for precision in ("float32", "bfloat16"):
        hours = MIMIC_IMAGES / results[precision]["stage"] / 3600
        print(f"MIMIC-CXR estimate ({MIMIC_IMAGES:,} images) at {precision} on this machine: {hours:.1f} h")
    print(f"MIMIC-CXR storage estimate: cache {per_image * MIMIC_IMAGES / 2**30:.1f} GiB "
          f"({per_image / 1024:.0f} KiB/image), chexnet.h5 {per_study * MIMIC_STUDIES / 2**30:.1f} GiB "
          f"({per_study / 1024:.0f} KiB/study)")
    print(f"speedup_vs_naive={f32['speedup_vs_naive']:.2f} fraction_of_forward={f32['fraction_of_forward']:.3f}")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.rss_child:
        rss_child(args.rss_child, args.batch_size)
        return
    paths = sorted(args.images.glob("*.png"))
    if not paths:
        raise SystemExit(f"{args.images}: no PNG files; pass --images DIR")
    print(f"{len(paths)} radiographs from {args.images}, batch_size {args.batch_size}, "
          f"{os.cpu_count()} CPUs, tensorflow {tf.__version__}", flush=True)
    pixels = np.stack([preprocess_radiograph(path, 224, 50_000_000) for path in paths])
    with tempfile.TemporaryDirectory(prefix="cxrgen-bench-") as folder:
        work = Path(folder)
        results = {precision: measure_precision(precision, paths, pixels, work, args) for precision in ("float32", "bfloat16")}
        difference = precision_difference(results["float32"]["featurizer"].backbone, pixels, args.batch_size)
        compression = compression_table(results["float32"]["featurizer"], results["float32"]["project"], work)
        storage = storage_per_item(work, results["float32"]["project"])
        counts = [int(count) for count in args.rss_counts.split(",") if count]
        rss = peak_rss(counts, paths, work, args.batch_size) if counts else []
        report(results, difference, compression, rss, storage)


if __name__ == "__main__":
    main()
