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
4. self-supervised training on CUDA with bf16 AMP, for every image objective with its ``auto``
   encoder at ``TRAIN_IMAGE_SIZE`` px: training images/s, peak GPU memory, and the mean loss of
   the first and the last epoch (it must fall);
5. the backbones beyond EfficientNet-Lite (``NEW_BACKBONES``; DINOv2 only where its hub code is in
   the torch hub cache) on CUDA, each from a weight file of random weights
   (:func:`bench.backbones.random_weight_file`): a whole fit at 224 px and its anomaly maps and
   Grad-CAM maps per second (DINOv2 has no Grad-CAM), so the path runs end to end (the AUROC of
   random features says nothing about the backbone);
6. the CUDA-marked tests (``pytest -m gpu``) are run separately by the caller.
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
from core.data.builtin import DEMO_DIR
from core.registry import Registry

IMAGE_SIZE = 224
THROUGHPUT_IMAGES = 3_000
BATCH_SIZES = (32, 128)
MAP_IMAGES = 64
TRAIN_IMAGE_SIZE = 64
TRAIN_IMAGES = 4_096
TRAIN_EPOCHS = 8
TRAIN_BATCH = 128
NEW_BACKBONES = ("resnet18", "wide_resnet50_2", "dinov2_vits14")


def repeated(dataset: Dataset, n: int) -> Dataset:
    """``dataset``'s files repeated to ``n`` samples (same files read again, so decoding is real)."""
    index = np.arange(n) % len(dataset)
    paths = [dataset.paths[i] for i in index]
    return Dataset(kind="images", ids=[f"{i}-{dataset.ids[j]}" for i, j in enumerate(index)], source=dataset.source,
                   fingerprint="repeated", paths=paths)


def fit_on(device: str, dataset: Dataset, work: Path, **changes):
    """A whole fit at ``IMAGE_SIZE`` on ``device`` (``changes``: other FitConfig fields) and its wall time."""
    config = FitConfig(image_size=IMAGE_SIZE, device=device, **changes)
    started = time.perf_counter()
    result = engine.fit(dataset, config, work / f"run-{device}-{config.backbone}",
                        registry=Registry(work / "registry.sqlite"))
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


def map_rates(run_dir: Path, dataset: Dataset, gradcam: bool = True) -> tuple[float, float | None]:
    """Images per second of anomaly maps and of Grad-CAM maps (None when not ``gradcam``), each after a warm-up call."""
    run = engine.open_run(run_dir)
    sample, warm_up = dataset.subset(np.arange(MAP_IMAGES)), dataset.subset(np.arange(4))
    rates = []
    for maps in (run.iter_anomaly_maps, run.iter_gradcam_maps)[: 2 if gradcam else 1]:
        for _ in maps(warm_up):
            pass
        started = time.perf_counter()
        for _ in maps(sample):
            pass
        rates.append(MAP_IMAGES / (time.perf_counter() - started))
    return rates[0], rates[1] if gradcam else None


def backbone_rows(dataset: Dataset, work: Path, device: str = "cuda") -> list[list[object]]:
    """One row per backbone of ``NEW_BACKBONES``: a whole fit from a random weight file, then its maps."""
    from bench.backbones import available, random_weight_file
    from core.config import DINOV2_BACKBONES

    rows = []
    for name in NEW_BACKBONES:
        if not available(name):
            rows.append([name, "no hub code in the torch hub cache", None, None, None])
            continue
        weights = random_weight_file(name, work)
        result, seconds = fit_on(device, dataset, work, backbone=name, weights=str(weights))
        maps, cams = map_rates(result.run_dir, dataset, gradcam=name not in DINOV2_BACKBONES)
        rows.append([name, f"{seconds:.1f}", result.metrics.auroc, f"{maps:.1f}",
                     None if cams is None else f"{cams:.1f}"])
    return rows


def training_rows(dataset: Dataset) -> list[list[object]]:
    """One row per image objective: training throughput, peak memory and loss trend on CUDA."""
    import torch

    from core.config import OBJECTIVES
    from core.data import read_rgb
    from core.models.backbones import make_backbone
    from core.models.objectives import make_objective
    from core.train import TrainConfig, train

    images = np.stack([read_rgb(path, TRAIN_IMAGE_SIZE) for path in dataset.paths])
    images = images[np.arange(TRAIN_IMAGES) % len(images)]
    rows = []
    for objective_name in OBJECTIVES[1:]:
        config = FitConfig(objective=objective_name, image_size=TRAIN_IMAGE_SIZE).for_data("images")
        name = f"{config.backbone}-finetune" if config.encoder == "pretrained-finetune" else config.encoder
        torch.manual_seed(0)
        encoder = make_backbone(name, image_size=TRAIN_IMAGE_SIZE).cuda()
        objective = make_objective(objective_name, encoder.embedding_dim, "images").cuda()
        torch.cuda.reset_peak_memory_stats()
        train_config = TrainConfig(epochs=TRAIN_EPOCHS, batch_size=TRAIN_BATCH, device="cuda",
                                   learning_rate=0.01 if config.encoder == "pretrained-finetune" else 0.03)
        result = train(encoder, objective, images, train_config)
        steps = TRAIN_EPOCHS * (TRAIN_IMAGES // TRAIN_BATCH)
        rows.append([objective_name, name, steps, f"{TRAIN_EPOCHS * TRAIN_IMAGES / result.seconds:.0f}",
                     f"{torch.cuda.max_memory_allocated() / 2**20:.0f}", result.losses[0], result.losses[-1],
                     "yes" if result.losses[-1] < result.losses[0] else "NO"])
    return rows


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
    report.table(["objective", "encoder", "steps", "train images/s", "peak GPU MiB", "loss epoch 1", "loss last", "falls"],
                 training_rows(dataset),
                 title=f"4. Self-supervised training on CUDA, bf16 AMP, {TRAIN_IMAGE_SIZE} px, {TRAIN_IMAGES} images x "
                       f"{TRAIN_EPOCHS} epochs, batch {TRAIN_BATCH}")
    with tempfile.TemporaryDirectory() as scratch:
        report.table(["backbone (random weights)", "fit s on CUDA", "AUROC", "anomaly maps / s", "Grad-CAM maps / s"],
                     backbone_rows(dataset, Path(scratch)),
                     title=f"5. Backbones beyond EfficientNet-Lite on CUDA: fit and maps at {IMAGE_SIZE} px, demo")
    machine_footer(report, time.perf_counter() - started)


if __name__ == "__main__":
    main()
