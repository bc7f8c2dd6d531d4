"""Scale: throughput with 1 and 2 workers on this machine, and how the cost grows with data size.

Issue 7. Three parts, each comparing, in one run, the single-process path with the distributed one
(ratios, since the machine is shared and timings are noisy):

- ``embed``: the frozen EfficientNet-Lite0 (64 px, ``stride16+stride32``) embedding N Fashion-MNIST
  PNG files (the test set written once by ``bench.common.materialized_images``) through
  ``LocalCompute`` with 1 and 2 torch threads, and ``RayCompute`` with 1 and 2 actors (one CPU and
  one torch thread each) on a local Ray instance started once (``ray.init(address="local",
  num_cpus=2)``: a new one, never a cluster that ``RAY_ADDRESS`` names). A Ray pass includes starting
  its actors and loading the model in each; the rows are checked against the local ones (max
  absolute difference).
- ``refine``: ``core.engine.refine_and_fit`` (STOC, K = 5, 3 rounds, then the final GDE) on N
  synthetic 432-wide float32 embeddings memory-mapped from disk (95% one Gaussian, 5% shifted),
  through ``LocalCompute`` and ``RayCompute`` with 1 and 2 partitions; the kept masks and scores are
  checked against the local ones.
- ``train``: the training loop of a self-supervised encoder (contrastive learning with distribution
  augmentation, small CNN, 32 px Fashion-MNIST, batch 128), in 1 process with 1 and 2 torch threads
  and under ``torchrun`` with 2 processes of 1 thread each (torch DDP, gloo).

Cost growth, per path: the exponent ``log(t_large / t_small) / log(N_large / N_small)`` (1 = linear),
and the straight line through the smallest and largest N: a fixed cost (start-up: Ray actors import
torch and load the model) plus a marginal rate in samples per second.

Run: ``python bench/scale.py`` (about 6 minutes on 2 cores) or ``--quick`` (about 2 minutes).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    CACHE_DIR,
    REPO,
    Report,
    base_parser,
    machine_footer,
    machine_header,
    materialized_images,
    progress,
    setup_logging,
    timed,
)
from core.config import FitConfig

SCALE_DIR = CACHE_DIR / "scale"
EMBED_SIZE = 64
EMBED_SIZES = (1_000, 4_000, 10_000)
REFINE_SIZES = (25_000, 50_000, 100_000)
REFINE_DIM = 432
TRAIN_SIZES = (1_024, 2_048)
TRAIN_EPOCHS = 2
TRAIN_BATCH = 128


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """How the cost grows with N between the smallest and largest size: 1 = linear."""
    return math.log(seconds[-1] / seconds[0]) / math.log(sizes[-1] / sizes[0])


# ----------------------------------------------------------------------------- embedding

def embed_part(report: Report, sizes: list[int]) -> None:
    import ray
    import torch

    from core.compute import LocalCompute
    from core.data import load_fashion_mnist
    from core.distributed.ray_compute import RayCompute
    from core.models.image_encoder import ImageEncoder

    images, _ = load_fashion_mnist("test")
    everything = materialized_images(images, "fmnist-test")
    encoder = ImageEncoder(FitConfig(image_size=EMBED_SIZE).validate())
    encoder.embed(everything.subset(np.arange(64)))  # load the backbone once before timing
    paths = {"local, 2 threads": (2, None), "local, 1 thread": (1, None), "ray, 1 actor": (2, 1),
             "ray, 2 actors": (2, 2)}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        for n in sizes:
            dataset = everything.subset(np.arange(n))
            reference = None
            for name, (threads, actors) in paths.items():
                progress(f"embed {n} images: {name}")
                torch.set_num_threads(threads)
                compute = LocalCompute() if actors is None else RayCompute(workers=actors)
                with timed() as watch:
                    rows_out = compute.embed(encoder, dataset)
                if actors is not None:
                    compute.close()
                reference = rows_out if reference is None else reference
                seconds[name].append(watch.seconds)
                rows.append([name, n, watch.seconds, n / watch.seconds, seconds["local, 2 threads"][-1] / watch.seconds,
                             float(np.abs(rows_out - reference).max())])
    finally:
        ray.shutdown()
        torch.set_num_threads(os.cpu_count() or 1)
    report.table(["path", "N", "seconds", "images/s", "speed vs local 2 threads", "max |diff| vs local"], rows,
                 title=f"Embedding: EfficientNet-Lite0 at {EMBED_SIZE} px, Fashion-MNIST PNG files")
    _growth_lines(report, sizes, seconds)


# ----------------------------------------------------------------------------- refinement

def synthetic_embeddings(n: int) -> Path:
    """``n`` x 432 float32 rows in a .npy file under bench/.cache/scale (written once): 5% shifted."""
    path = SCALE_DIR / f"embeddings-{n}.npy"
    if not path.is_file():
        SCALE_DIR.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(n)
        rows = rng.normal(size=(n, REFINE_DIM)).astype(np.float32) * rng.uniform(0.5, 2.0, REFINE_DIM).astype(np.float32)
        rows[: n // 20] += 1.5
        staging = path.with_suffix(".tmp.npy")
        np.save(staging, rows)
        staging.rename(path)
    return path


def refine_part(report: Report, sizes: list[int]) -> None:
    import ray

    from core.compute import LocalCompute
    from core.distributed.ray_compute import RayCompute
    from core.engine import refine_and_fit

    config = FitConfig(detector="gde").validate().for_data("images")
    paths = {"local": None, "ray, 1 partition": 1, "ray, 2 partitions": 2}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        for n in sizes:
            embeddings = np.load(synthetic_embeddings(n), mmap_mode="r")
            reference = None
            for name, workers in paths.items():
                progress(f"refine {n} embeddings: {name}")
                compute = LocalCompute() if workers is None else RayCompute(workers=workers)
                with timed() as watch:
                    model = refine_and_fit(embeddings, config, compute=compute)
                if workers is not None:
                    compute.close()
                reference = model if reference is None else reference
                seconds[name].append(watch.seconds)
                recall = float(np.mean(~model.kept[: n // 20]))
                rows.append([name, n, watch.seconds, n / watch.seconds, seconds["local"][-1] / watch.seconds,
                             len(model.rounds), int(model.kept.sum()), recall,
                             bool(np.array_equal(model.kept, reference.kept)),
                             float(np.abs(model.train_score - reference.train_score).max())])
    finally:
        ray.shutdown()
    report.table(["path", "N", "seconds", "samples/s", "speed vs local", "rounds", "kept", "removal recall",
                  "same kept as local", "max |score diff| vs local"], rows,
                 title=f"Refinement (K = 5, 3 rounds) + final GDE on {REFINE_DIM}-wide memory-mapped embeddings")
    _growth_lines(report, sizes, seconds)


# ----------------------------------------------------------------------------- training

def train_worker(n: int, threads: int) -> None:
    """One process of the training part (alone, or one of several under torchrun); rank 0 prints JSON."""
    import torch
    from PIL import Image

    from core.data import load_fashion_mnist
    from core.distributed import ddp
    from core.models.backbones import make_backbone
    from core.models.objectives import make_objective
    from core.train import TrainConfig, train

    torch.set_num_threads(threads)
    images, _ = load_fashion_mnist("train")
    pixels = np.stack([np.asarray(Image.fromarray(image).convert("RGB").resize((32, 32), Image.BILINEAR))
                       for image in images[:n]])
    with ddp.torchrun_process_group("cpu"):
        torch.manual_seed(0)
        encoder = make_backbone("small-cnn", image_size=32, n_features=None, feature_layers=("stride16", "stride32"))
        objective = make_objective("contrastive", encoder.embedding_dim, "images")
        config = TrainConfig(epochs=TRAIN_EPOCHS, batch_size=TRAIN_BATCH, seed=0, device="cpu")
        result = train(encoder, objective, pixels, config)
        if ddp.is_main():
            steps = TRAIN_EPOCHS * (n // TRAIN_BATCH)
            print(json.dumps({"seconds": result.seconds, "images": steps * TRAIN_BATCH, "loss": result.losses[-1]}))


def train_part(report: Report, sizes: list[int]) -> None:
    setups = {"1 process, 2 threads": (1, 2), "1 process, 1 thread": (1, 1), "torchrun DDP, 2 processes x 1 thread": (2, 1)}
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    rows = []
    for n in sizes:
        for name, (processes, threads) in setups.items():
            progress(f"train on {n} images: {name}")
            outcome = _run_training(n, processes, threads)
            seconds[name].append(outcome["seconds"])
            rate = outcome["images"] / outcome["seconds"]
            rows.append([name, n, outcome["seconds"], rate, seconds["1 process, 2 threads"][-1] / outcome["seconds"],
                         outcome["loss"]])
    report.table(["setup", "N", "training seconds", "images/s", "speed vs 1 process 2 threads", "last epoch loss"],
                 rows, title=f"Self-supervised training: contrastive, small CNN, 32 px, batch {TRAIN_BATCH}, "
                 f"{TRAIN_EPOCHS} epochs")
    _growth_lines(report, sizes, seconds)


def _run_training(n: int, processes: int, threads: int) -> dict:
    worker = [str(Path(__file__).resolve()), "train-worker", str(n), str(threads)]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *worker]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as home:
        environment["REFINERY_HOME"] = home
        finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1200, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"training run failed ({' '.join(command)}):\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def _growth_lines(report: Report, sizes: list[int], seconds: dict[str, list[float]]) -> None:
    """Per path: the growth exponent, and the fixed and per-sample cost of a straight line through the
    smallest and largest N (a fixed start-up cost makes the exponent fall below 1)."""
    for name, times in seconds.items():
        marginal = (sizes[-1] - sizes[0]) / (times[-1] - times[0])
        fixed = times[0] - sizes[0] / marginal
        report.line(f"- {name}: {times[0]:.2f} s at N={sizes[0]:,} -> {times[-1]:.2f} s at N={sizes[-1]:,}; "
                    f"cost grows as N^{growth_exponent(sizes, times):.2f}; as a line: {fixed:.1f} s fixed + "
                    f"{marginal:,.0f} per second")
    report.line()


PARTS = {"embed": embed_part, "refine": refine_part, "train": train_part}


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "train-worker":
        train_worker(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--part", choices=sorted(PARTS), action="append", help="run only these parts (repeatable)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    sizes = {
        "embed": [500, 1_000] if args.quick else list(EMBED_SIZES),
        "refine": [10_000, 20_000] if args.quick else list(REFINE_SIZES),
        "train": [512, 1_024] if args.quick else list(TRAIN_SIZES),
    }
    report = Report(args.out)
    machine_header(report, "Scale: 1 and 2 workers, cost growth with N")
    report.line("- seeds are not used: every fit and training run uses seed 0")
    report.line()
    with timed() as total:
        for part in args.part or list(PARTS):
            PARTS[part](report, sizes[part])
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
