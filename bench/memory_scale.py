"""Memory at scale: peak RSS of loading, embedding into a memory-mapped file, and refining 1k-100k images.

Issue 6, "Memory at scale". Image folders of N files (default 1,000 / 10,000 / 100,000) are built
under bench/.cache/memory_scale from the real Fashion-MNIST images (28 px PNG files written once by
``bench.common.materialized_images``: the 10,000 test images, then the 60,000 training images when
more are needed): file ``i`` is a hard link to distinct image ``i mod 70,000`` (a copy where links
are impossible), so 100,000 files reuse 70,000 images. Per N, each in a fresh process
(``bench.common.run_isolated``), with the peak measured by ``bench.common.memory_peak`` (the
kernel's high-water mark VmHWM, reset just before the block):

1. ``load_image_folder(folder)``: scan, probe every file, fingerprint;
2. ``ImageEncoder(FitConfig(image_size=32)).embed(dataset, out=...)`` into a ``.npy`` file opened with
   ``embedding_memmap`` (Lite0, ``stride16+stride32``: D = 432, so the embeddings are N x 432 x 4
   bytes on disk); in the same process as 1, after it;
   for comparison, stage 2 then runs once more with ``out=None`` (the embeddings in memory);
3. ``core.engine.refine_and_fit`` on ``np.load(file, mmap_mode="r")`` with
   ``FitConfig(image_size=32, detector="gde")`` (STOC refinement, K = 5, then the final GDE), in a
   second fresh process: it streams chunks of rows through ``core.compute.LocalCompute`` (GDEs
   fitted from summed moments, scores chunk by chunk, pages dropped after each chunk).

"RSS before" is the process after imports, the backbone and a one-batch warm-up (stage 1), after
loading (stage 2) or after mapping the embeddings (stage 3). Bytes per image = (peak - before) / N.

Run: ``python bench/memory_scale.py`` (about 10-20 minutes on 2 cores the first time: 100,000
images are embedded) or ``--quick`` (1,000 and 10,000 images, about 1-2 minutes).
"""
from __future__ import annotations

import os
import shutil
import sys
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
    memory_peak,
    progress,
    run_isolated,
    setup_logging,
    timed,
)
from core.config import FitConfig

SCALE_DIR = CACHE_DIR / "memory_scale"
DEMO = REPO / "assets" / "demo" / "fashion-mnist-sneakers"
IMAGE_SIZE = 32
STREAMED_STAGES = ("embed -> memmap", "refine_and_fit gde")
"""The stages meant to stream: their peak may grow with N only by per-sample bookkeeping."""
FLAT_ROW_SHARE = 0.1
"""...and by less than this share of one float32 embedding row per added image (scores, masks and
votes are a few numbers per sample; the embeddings themselves must stay on disk)."""
FLAT_BUDGET_MIB = 16.0
"""A streamed stage counts as flat when its peak - before grows by less than this between the two
largest N: under 10% of the 164.8 MiB that 100,000 x 432 x 4-byte embeddings take in memory (no
verdict when the largest N's embeddings are under 4 times this)."""
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- data

def distinct_images(count: int) -> list[Path]:
    """Up to ``count`` distinct Fashion-MNIST PNG files: the test set, then the training set."""
    from core.data import load_fashion_mnist

    files: list[Path] = []
    for split in ("test", "train"):
        if len(files) >= count:
            break
        images, _ = load_fashion_mnist(split)
        files += materialized_images(images, f"fashion-mnist-{split}").paths
    return files[:count]


def scale_folder(n: int) -> Path:
    """A folder of ``n`` PNG files ``000000.png``... reusing the real images (see the module docstring).

    Built once in a temporary folder renamed when complete; later runs reuse it.
    """
    folder = SCALE_DIR / f"fashion-mnist-{n}"
    if folder.is_dir():
        return folder
    sources = distinct_images(n)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    staging.mkdir(parents=True)
    with timed() as watch:
        for index in range(n):
            source, target = sources[index % len(sources)], staging / f"{index:06d}.png"
            try:
                os.link(source, target)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source, target)
    try:
        staging.rename(folder)
    except OSError:  # another run finished first
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"built {folder.name}: {n} files from {len(sources)} distinct images in {watch.seconds:.1f}s")
    return folder


# ----------------------------------------------------------------------------- measured stages (fresh processes)

def _measure(block) -> tuple[dict, object]:
    """Seconds, RSS before and peak RSS (MiB) of ``block()``, and its result."""
    with memory_peak() as memory, timed() as watch:
        result = block()
    return {"seconds": watch.seconds, "before_mb": memory.before_mb, "peak_mb": memory.peak_mb,
            "reset": memory.reset}, result


def load_and_embed(folder: Path, embeddings_file: Path) -> dict:
    """Stages 1 and 2 in this process; the embeddings are left in ``embeddings_file``."""
    from core.data import load_image_folder
    from core.models.image_encoder import ImageEncoder, embedding_memmap

    encoder = ImageEncoder(FitConfig(image_size=IMAGE_SIZE))
    demo = load_image_folder(DEMO)  # warm-up: backbone, PIL plugins, torch threads and allocator
    encoder.embed(demo.subset(np.arange(encoder.config.batch_size)))
    stages = {}
    stages["load_image_folder"], dataset = _measure(lambda: load_image_folder(folder))

    def embed_to_disk():
        rows = embedding_memmap(embeddings_file, len(dataset), encoder.embedding_dim)
        encoder.embed(dataset, out=rows)
        rows.flush()
        return rows.shape

    stages["embed -> memmap"], shape = _measure(embed_to_disk)
    stages["embed -> RAM (out=None)"], _ = _measure(lambda: encoder.embed(dataset).shape)
    return {"n": len(dataset), "dim": shape[1], "stages": stages}


def refine_on_disk(embeddings_file: Path) -> dict:
    """Stage 3 in this process: refinement and the final GDE on the memory-mapped embeddings."""
    from core.engine import refine_and_fit

    embeddings = np.load(embeddings_file, mmap_mode="r")
    config = FitConfig(image_size=IMAGE_SIZE, detector="gde").validate().for_data("images")
    measured, model = _measure(lambda: refine_and_fit(embeddings, config))
    return {"stage": measured, "rounds": len(model.rounds), "kept": int(model.kept.sum())}


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="images per folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [1_000, 10_000]
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    report = Report(args.out)
    machine_header(report, "Memory at scale")
    report.line(f"- images: Fashion-MNIST 28 px PNG files reused by hard links (see the module docstring); "
                f"embedded at {IMAGE_SIZE} px; seeds are not used: every fit uses FitConfig(seed=0)")
    report.line()
    rows, stage_growth, dim = [], {}, 0
    with timed() as total:
        for n in sorted(args.sizes):
            folder = scale_folder(n)
            embeddings_file = SCALE_DIR / f"embeddings-{n}.npy"
            progress(f"{n} images: load and embed (fresh process)")
            embedded = run_isolated(load_and_embed, folder, embeddings_file)
            progress(f"{n} images: refine_and_fit (fresh process)")
            refined = run_isolated(refine_on_disk, embeddings_file)
            on_disk, dim = embeddings_file.stat().st_size, embedded["dim"]
            embeddings_file.unlink()
            stages = {**embedded["stages"], f"refine_and_fit gde ({refined['rounds']} rounds)": refined["stage"]}
            for name, stage in stages.items():
                increase = stage["peak_mb"] - stage["before_mb"]
                rows.append([name, embedded["n"], stage["seconds"], stage["before_mb"], stage["peak_mb"], increase,
                             f"{increase * MIB / embedded['n']:.0f}", f"{on_disk / MIB:.1f}"])
                stage_growth.setdefault(name.split(" (")[0], []).append((embedded["n"], increase))
            if not all(stage["reset"] for stage in stages.values()):
                report.line("Note: the peak could not be reset on this system; peaks include earlier work.")
        report.table(["stage", "N", "seconds", "RSS before MiB", "peak RSS MiB", "peak - before MiB",
                      "bytes per image", "embeddings on disk MiB"], rows,
                     title="Peak RSS per stage (each N in fresh processes)")
        report.line(f"Embeddings on disk: N x {dim} x 4 bytes = {dim * 4} bytes per image "
                    + ", ".join(f"({n:,}: {n * dim * 4 / MIB:.1f} MiB)" for n in sorted(args.sizes)) + ".")
        report.line()
        for name, points in stage_growth.items():
            (n_small, small), (n_large, large) = points[0], points[-1]
            growth = large - small
            slope = growth * MIB / max(n_large - n_small, 1)
            text = (f"- {name}: peak - before {small:.1f} MiB at N={n_small:,} -> {large:.1f} MiB at N={n_large:,} "
                    f"(growth {growth:.1f} MiB, {slope:.0f} bytes per added image")
            if name in STREAMED_STAGES and len(points) > 1:
                # Judged between the two largest N: below a chunk of rows, the chunk itself still grows.
                (n_before, at_before), (_, at_large) = points[-2], points[-1]
                scale_growth = at_large - at_before
                scale_slope = scale_growth * MIB / max(n_large - n_before, 1)
                row_bytes = dim * 4
                verdict = ("too few images to tell" if n_large * row_bytes / MIB < 4 * FLAT_BUDGET_MIB
                           else "FLAT" if scale_growth < FLAT_BUDGET_MIB and scale_slope < FLAT_ROW_SHARE * row_bytes
                           else "NOT flat")
                text += (f"; from N={n_before:,} to N={n_large:,}: {scale_growth:+.1f} MiB, {scale_slope:.0f} bytes per "
                         f"added image, against a budget of {FLAT_BUDGET_MIB:.0f} MiB and {FLAT_ROW_SHARE:.0%} of a "
                         f"{row_bytes}-byte embedding row ({n_large * row_bytes / MIB:.1f} MiB for all N={n_large:,} "
                         f"embeddings in memory): {verdict}")
            report.line(text + ")")
        report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
