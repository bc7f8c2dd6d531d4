"""Backbones beyond EfficientNet-Lite: feature extraction speed per backbone, with random weights.

Issue 18, point 5. For each backbone (``core.config.BACKBONES``; DINOv2 only where its hub code is in
the torch hub cache), a weight file is saved from a randomly initialised model (EfficientNet-Lite keeps
its packaged weights) and read back through :func:`core.models.pretrained.load_backbone`, so the
figures are the speed of the real architectures, not of their ImageNet features. Measured on
pre-decoded, normalised ``(B, 3, S, S)`` tensors in ``torch.inference_mode`` (no file reading):

- images/s of the pooled image embedding (``backbone.pooled``, the default ``stride16 + stride32``);
- images/s of the patch features of the localization maps (:func:`core.explain.patch.patch_features`);
- the embedding width, the patch feature width and grid, and the weight file's size.

Each figure is the fastest of ``--repeats`` timed passes over ``--images`` images (after one warm-up
batch), the least disturbed by other processes. Run: ``python bench/backbones.py [--device cpu]``
(about 2-4 minutes on 2 CPU cores at 224 px) or ``--quick`` (64 px, fewer images).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import Report, base_parser, machine_footer, machine_header, progress
from core.config import BACKBONES, DINOV2_BACKBONES, EFFICIENTNET_BACKBONES, TORCHVISION_BACKBONES
from core.models.pretrained import DINOV2_HUB_REPO, dinov2_architecture, hub_dir, load_backbone

MEASURED = ("efficientnet-lite0", *TORCHVISION_BACKBONES, *DINOV2_BACKBONES)
POOLED_LAYERS = ("stride16", "stride32")
PATCH_LAYERS = ("stride8", "stride16")
BATCH = 16


def available(name: str) -> bool:
    """EfficientNet-Lite and torchvision always; DINOv2 only with its hub code in the cache."""
    return name not in DINOV2_BACKBONES or (hub_dir() / DINOV2_HUB_REPO / "hubconf.py").is_file()


def random_weight_file(name: str, folder: Path, seed: int = 0) -> Path | None:
    """A ``state_dict`` of a randomly initialised ``name`` saved in ``folder``; None for EfficientNet-Lite,
    whose packaged weights are used."""
    if name in EFFICIENTNET_BACKBONES:
        return None
    torch.manual_seed(seed)
    if name in DINOV2_BACKBONES:
        model = dinov2_architecture(name)
    else:
        import torchvision.models

        model = getattr(torchvision.models, name)(weights=None)
    path = folder / f"{name}-random.pth"
    torch.save(model.state_dict(), path)
    return path


def images_per_second(forward, batch: torch.Tensor, n_images: int, repeats: int, device: str) -> float:
    """The fastest of ``repeats`` timed passes of ``forward`` over ``n_images`` images, in batches of ``batch``."""
    with torch.inference_mode():
        forward(batch)  # warm-up: allocator, cuDNN autotune
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(max(1, n_images // len(batch))):
                forward(batch)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
    return max(1, n_images // len(batch)) * len(batch) / best


def backbone_row(name: str, size: int, device: str, folder: Path, n_images: int, repeats: int) -> list[object]:
    from core.explain.patch import patch_features

    weights = random_weight_file(name, folder)
    backbone = load_backbone(name, size, device, None if weights is None else str(weights))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (BATCH, size, size, 3), dtype=torch.uint8, generator=generator)
    batch = backbone.normalize(pixels).to(device)
    if device == "cpu":
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        patches = patch_features(backbone, batch[:1], PATCH_LAYERS)
    pooled = images_per_second(lambda x: backbone.pooled(x, POOLED_LAYERS), batch, n_images, repeats, device)
    patch = images_per_second(lambda x: patch_features(backbone, x, PATCH_LAYERS), batch, n_images, repeats, device)
    size_mb = f"{weights.stat().st_size / 2**20:.0f}" if weights is not None else "(package)"
    return [name, sum(backbone.channels(layer) for layer in POOLED_LAYERS), f"{pooled:.1f}",
            f"{patches.shape[1]} x {patches.shape[2]}x{patches.shape[3]}", f"{patch:.1f}",
            f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}", size_mb]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=64, help="images per timed pass (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per figure; the fastest counts")
    args = parser.parse_args()
    size, n_images = (64, BATCH) if args.quick else (224, args.images)
    report = Report(args.out)
    machine_header(report, "Backbones beyond EfficientNet-Lite: feature extraction speed, random weights")
    started = time.perf_counter()
    rows, skipped = [], [name for name in BACKBONES if name in MEASURED and not available(name)]
    with tempfile.TemporaryDirectory() as scratch:
        for name in (name for name in MEASURED if available(name)):
            progress(f"{name} at {size} px on {args.device}")
            rows.append(backbone_row(name, size, args.device, Path(scratch), n_images, args.repeats))
    report.table(["backbone", "embedding D", "embedding images/s", "patch features D x grid", "patch images/s",
                  "parameters (M)", "weight file MiB"], rows,
                 title=f"{size} px, {args.device}, batch {BATCH}, fastest of {args.repeats} passes over "
                       f"{n_images} images, torch threads {torch.get_num_threads()}")
    if skipped:
        report.line(f"Not measured (no DINOv2 hub code in {hub_dir() / DINOV2_HUB_REPO}): {', '.join(skipped)}")
        report.line()
    machine_footer(report, time.perf_counter() - started)


if __name__ == "__main__":
    main()
