"""GPU check: the engine's CUDA path works end to end and how fast it is next to the CPU, in one run.

Run on a machine with a CUDA GPU: ``python bench/gpu_check.py [--out bench/results/gpu_check.txt]``
(a few minutes). It stops with an error when no GPU is visible. Measured on the bundled demo
(300 Fashion-MNIST images, 10% planted anomalies) so it needs nothing outside the repository:

1. a whole fit (encode, 3 refinement rounds, final GDE, patch localizer) at 224 px on ``cuda``
   and on ``cpu``: wall time, AUROC from the planted labels, Spearman correlation of the two
   runs' anomaly scores (same data, same seed: the devices must agree);
2. embedding throughput (``ImageEncoder.embed``: read, decode, forward, pool) at 224 px on the
   demo files repeated to 3,000 images, per batch size, GPU vs CPU, and the peak GPU memory;
3. anomaly maps (patch localizer) and Grad-CAM maps per second on each device;
4. the CUDA-marked tests (``pytest -m gpu``) are run separately by the caller.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from scipy.stats import spearmanr

from bench.common import Report, base_parser, machine_footer, machine_header
from core import engine
from core.config import FitConfig
from core.data import Dataset
from core.data.sources import DEMO_DIR
from core.store import Registry

IMAGE_SIZE = 224
THROUGHPUT_IMAGES = 3_000
BATCH_SIZES = (32, 128)
MAP_IMAGES = 64


def repeated(dataset: Dataset, n: int) -> Dataset:
    """``dataset``'s files repeated to ``n`` samples (same files read again, so decoding is real)."""
    index = np.arange(n) % len(dataset)
    paths = [dataset.paths[i] for i in index]
    return Dataset(kind="images", ids=[f"{i}-{dataset.ids[j]}" for i, j in enumerate(index)], source=dataset.source,
                   fingerprint="repeated", paths=paths)


def fit_on(device: str, dataset: Dataset, work: Path):
    config = FitConfig(image_size=IMAGE_SIZE, device=device)
    started = time.perf_counter()
    result = engine.fit(dataset, config, work / f"run-{device}", registry=Registry(work / "registry.sqlite"))
    return result, time.perf_counter() - started


def embed_rate(device: str, dataset: Dataset, batch_size: int) -> float:
    import torch

    from core.models.image_encoder import ImageEncoder

    encoder = ImageEncoder(FitConfig(image_size=IMAGE_SIZE, device=device, batch_size=batch_size))
    encoder.embed(repeated(dataset, 2 * batch_size))  # warm-up: model load, cuDNN autotune, page cache
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    encoder.embed(repeated(dataset, THROUGHPUT_IMAGES))
    if device == "cuda":
        torch.cuda.synchronize()
    return THROUGHPUT_IMAGES / (time.perf_counter() - started)


def map_rates(run_dir: Path, dataset: Dataset) -> tuple[float, float]:
    """Images per second of anomaly maps and of Grad-CAM maps, each after a warm-up call."""
    run = engine.open_run(run_dir)
    sample, warm_up = dataset.subset(np.arange(MAP_IMAGES)), dataset.subset(np.arange(4))
    rates = []
    for maps in (run.iter_anomaly_maps, run.iter_gradcam_maps):
        for _ in maps(warm_up):
            pass
        started = time.perf_counter()
        for _ in maps(sample):
            pass
        rates.append(MAP_IMAGES / (time.perf_counter() - started))
    return rates[0], rates[1]


def main() -> None:
    import torch

    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible; run this on a machine with a GPU")
    report = Report(args.out)
    machine_header(report, "GPU check: the CUDA path of fit, embedding and maps vs the CPU")
    report.line(f"- GPU: {torch.cuda.get_device_name(0)}; CPU threads for torch: {torch.get_num_threads()}")
    report.line()
    started = time.perf_counter()
    dataset = engine.load_data(DEMO_DIR)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        rows, results = [], {}
        for device in ("cuda", "cpu"):
            result, seconds = fit_on(device, dataset, work)
            results[device] = result
            rows.append([device, f"{seconds:.1f}", result.metrics.auroc, int(result.kept.sum()), len(result.rounds)])
        rho = spearmanr(results["cuda"].scores.anomaly_score, results["cpu"].scores.anomaly_score).statistic
        report.table(["device", "fit s (224 px, demo 300 images)", "AUROC", "kept", "rounds"], rows,
                     title="1. Whole fit, same data and seed")
        report.line(f"Spearman correlation of the CUDA and CPU runs' anomaly scores: {rho:.4f}")
        report.line()

        torch.cuda.reset_peak_memory_stats()
        rows = []
        for batch_size in BATCH_SIZES:
            gpu, cpu = embed_rate("cuda", dataset, batch_size), embed_rate("cpu", dataset, batch_size)
            rows.append([batch_size, f"{gpu:.0f}", f"{cpu:.0f}", f"{gpu / cpu:.1f}x"])
        peak = torch.cuda.max_memory_allocated() / 2**20
        report.table(["batch", "GPU images/s", "CPU images/s", "GPU / CPU"], rows,
                     title=f"2. Embedding throughput at {IMAGE_SIZE} px ({THROUGHPUT_IMAGES} PNG reads each)")
        report.line(f"Peak GPU memory while embedding: {peak:.0f} MiB")
        report.line()

        rows = []
        for device in ("cuda", "cpu"):
            maps, cams = map_rates(results[device].run_dir, dataset)
            rows.append([device, f"{maps:.1f}", f"{cams:.1f}"])
        report.table(["device", "anomaly maps / s", "Grad-CAM maps / s"], rows,
                     title=f"3. Maps for {MAP_IMAGES} images at {IMAGE_SIZE} px")
    machine_footer(report, time.perf_counter() - started)


if __name__ == "__main__":
    main()
