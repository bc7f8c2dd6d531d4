"""Helpers shared by the benchmark scripts: report header, tables, timing, memory, caches.

Every benchmark prints its results to stdout (and to ``--out`` when given) as plain text with
markdown tables; progress goes to stderr. The header records the exact command, the machine and
the date, and a hash of ``core/`` so a table can be tied to the engine it measured.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import os
import platform
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("REFINERY_SHARED_DATA") or REPO.parent / "shared" / "data")
"""The real data sets: ``$REFINERY_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
CACHE_DIR = REPO / "bench" / ".cache"


# ----------------------------------------------------------------------------- command line

def adbench_half(path: Path) -> str:
    """``dev`` or ``report``: ADBench sets at even positions of the sorted file names in their folder are
    the dev half (bench/README.md), on which defaults may be chosen."""
    names = sorted(p.name for p in path.parent.glob("*.npz"))
    return "dev" if names.index(path.name) % 2 == 0 else "report"


def base_parser(description: str, default_seeds: Sequence[int]) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: --seeds, --quick, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(default_seeds),
                        help=f"seeds to run (default: {' '.join(map(str, default_seeds))})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run on a small slice of the work (about 1-2 minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the printed report to this file")
    parser.add_argument("--verbose", action="store_true", help="show the engine's INFO logs")
    return parser


def setup_logging(verbose: bool) -> None:
    """Bench progress on stderr; the engine's own logs only when ``verbose`` (warnings otherwise)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def progress(message: str) -> None:
    """One progress line on stderr (never part of the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- report

class Report:
    """Collects the printed report: stdout, plus a file when ``path`` is given."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(text + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
        if title:
            self.line(f"### {title}")
            self.line()
        for text in format_table(headers, rows):
            self.line(text)
        self.line()


def format_cell(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table with aligned columns; floats with 3 decimals, None as ``-``."""
    cells = [[format_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def render(items: Sequence[str]) -> str:
        return "| " + " | ".join(item.ljust(width) for item, width in zip(items, widths)) + " |"

    return [render(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [render(r) for r in cells]


def core_hash() -> str:
    """Short SHA-256 of every ``core/**/*.py`` (path and content): which engine was measured."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "core").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_header(report: Report, title: str) -> None:
    """Title, exact command, machine, torch, device, load and date."""
    import torch

    from core.models.device import resolve_device

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report.line(f"# {title}")
    report.line()
    report.line(f"- command: `{command}` (cwd {os.getcwd()})")
    report.line(f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    report.line(f"- machine: {platform.platform()}; {platform.processor() or platform.machine()}; "
                f"{os.cpu_count()} CPUs; load average at start {load}")
    report.line(f"- python {platform.python_version()}; torch {torch.__version__} "
                f"({torch.get_num_threads()} threads); device {resolve_device('auto')}")
    report.line(f"- core/ sources sha256: {core_hash()}")
    report.line()


def machine_footer(report: Report, seconds: float) -> None:
    """Total wall time and the load average at the end (timings are only as quiet as the machine)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report.line(f"Total wall time: {seconds:.0f} s; load average at end {load} ({os.cpu_count()} CPUs)")


# ----------------------------------------------------------------------------- timing and memory

@dataclass
class Stopwatch:
    seconds: float = 0.0


@contextmanager
def timed() -> Iterator[Stopwatch]:
    """``with timed() as t: ...`` then ``t.seconds`` (wall clock)."""
    watch = Stopwatch()
    started = time.perf_counter()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - started


def _status_mb(field_name: str) -> float | None:
    """A ``VmXXX`` field of /proc/self/status in MiB, or None where unavailable."""
    try:
        for text in Path("/proc/self/status").read_text().splitlines():
            if text.startswith(field_name + ":"):
                return int(text.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mb() -> float:
    """Current resident set size in MiB (NaN where /proc is unavailable)."""
    value = _status_mb("VmRSS")
    return float("nan") if value is None else value


def peak_rss_mb() -> float:
    """Peak resident set size in MiB: VmHWM (resettable, see :func:`memory_peak`), else getrusage."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class MemoryPeak:
    before_mb: float = float("nan")
    peak_mb: float = float("nan")
    reset: bool = False  # False: the peak is the whole process's, not only the block's


@contextmanager
def memory_peak() -> Iterator[MemoryPeak]:
    """Peak RSS over a block: resets the kernel's high-water mark (``/proc/self/clear_refs`` 5) first."""
    result = MemoryPeak(before_mb=current_rss_mb())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        result.reset = True
    except OSError:
        result.reset = False
    try:
        yield result
    finally:
        result.peak_mb = peak_rss_mb()


def run_isolated(function: Callable, *args) -> object:
    """``function(*args)`` in a fresh (spawned) process, so memory peaks and caches are its own.

    ``function`` must be importable (module level); its result must pickle.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


# ----------------------------------------------------------------------------- statistics

def mean(values: Sequence[float | None]) -> float | None:
    """Mean over the values that are not None/NaN; None when there is none."""
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def removal_stats(kept: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None]:
    """Cumulative removal precision and recall of a refinement (labels: 1 = anomaly)."""
    removed = ~np.asarray(kept, dtype=bool)
    anomalous = np.asarray(labels) == 1
    precision = float(np.mean(anomalous[removed])) if removed.any() else None
    recall = float(np.mean(removed[anomalous])) if anomalous.any() else None
    return precision, recall


# ----------------------------------------------------------------------------- image files

def materialized_images(images: np.ndarray, name: str):
    """``images`` as PNG files under bench/.cache, written once, as an image Dataset in array order.

    The first run writes them with ``core.data.materialize_images`` into a temporary folder that is
    renamed when complete (so a concurrent run never reads a half-written file); later runs load
    the folder with ``core.data.load_image_folder`` (ids ``00000.png``... sort in array order, and
    the fingerprint is the same either way, so embedding caches stay valid).
    """
    import shutil

    from core.data import load_image_folder, materialize_images

    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:12]
    folder = CACHE_DIR / "images" / f"{name}-{len(images)}-{digest}"
    if not folder.is_dir():
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        with timed() as watch:
            materialize_images(images, None, staging)
        try:
            staging.rename(folder)
        except OSError:  # another run finished first
            shutil.rmtree(staging, ignore_errors=True)
        progress(f"wrote {len(images)} {name} images as PNG in {watch.seconds:.1f}s")
    dataset = load_image_folder(folder)
    if len(dataset) != len(images):
        raise RuntimeError(f"{folder} holds {len(dataset)} images, expected {len(images)}; delete it")
    return dataset


# ----------------------------------------------------------------------------- image embeddings

class ImageEmbeddingCache:
    """Image embeddings cached on disk per (dataset fingerprint, backbone, image size, layers).

    Rows are embedded with :class:`core.models.image_encoder.ImageEncoder` (the encoder
    ``refinery fit`` uses) on demand, only for the indices not cached yet, and stored as
    append-only chunks under ``bench/.cache/embeddings/<key>/``. Embeddings are computed for
    ``layers`` (a superset, e.g. every feature layer for a sweep) and the columns of
    ``config.feature_layers`` are returned. The first time a (key, feature_layers) pair is served
    in a process, a few rows are re-embedded directly with ``config`` and compared, so slicing a
    superset can never silently differ from what ``refinery fit`` computes.
    """

    def __init__(self, root: Path = CACHE_DIR / "embeddings") -> None:
        self.root = root
        self._memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._checked: set[tuple[str, tuple[str, ...]]] = set()

    def embed(self, dataset, indices: np.ndarray, config, layers: Sequence[str] | None = None) -> np.ndarray:
        """``(len(indices), D) float32`` embeddings of ``dataset``'s samples at ``indices``."""
        from core.models.image_encoder import ImageEncoder

        layers = tuple(layers or config.feature_layers)
        missing_layers = [name for name in config.feature_layers if name not in layers]
        if missing_layers:
            raise ValueError(f"layers {layers} do not contain {missing_layers}")
        full = config.with_changes(feature_layers=layers)
        key = f"{dataset.fingerprint}-{full.backbone}-{full.image_size}px-{'+'.join(layers)}"
        done, values = self._load(key, len(dataset))
        indices = np.asarray(indices, dtype=np.int64)
        todo = np.unique(indices[~done[indices]])
        if len(todo):
            progress(f"embedding {len(todo)} images ({full.backbone}, {full.image_size}px, {'+'.join(layers)})")
            with timed() as watch:
                rows = ImageEncoder(full).embed(dataset.subset(todo))
            progress(f"  {len(todo) / watch.seconds:.1f} images/s")
            if values.shape[1] == 0:
                values = np.full((len(dataset), rows.shape[1]), np.nan, np.float32)
            values[todo] = rows
            done[todo] = True
            self._save_chunk(key, todo, rows)
            self._memory[key] = (done, values)
        columns = self._columns(config, layers)
        out = values[indices][:, columns]
        if (key, config.feature_layers) not in self._checked:
            self._check(dataset, indices[:4], config, out[:4])
            self._checked.add((key, config.feature_layers))
        return out

    @staticmethod
    def _columns(config, layers: tuple[str, ...]) -> np.ndarray:
        from core.models.image_encoder import ImageEncoder

        model = ImageEncoder(config).model
        widths = {name: model.channels(name) for name in layers}
        starts = np.cumsum([0] + [widths[name] for name in layers])
        offset = {name: starts[i] for i, name in enumerate(layers)}
        return np.concatenate([np.arange(offset[n], offset[n] + widths[n]) for n in config.feature_layers])

    @staticmethod
    def _check(dataset, indices, config, served: np.ndarray) -> None:
        from core.models.image_encoder import ImageEncoder

        direct = ImageEncoder(config).embed(dataset.subset(indices))
        if not np.allclose(direct, served, rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"cached embeddings differ from a direct ImageEncoder.embed "
                               f"(max abs diff {np.max(np.abs(direct - served)):.3g}); delete {CACHE_DIR}")

    def _load(self, key: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        if key in self._memory:
            return self._memory[key]
        done = np.zeros(n, dtype=bool)
        values = np.zeros((n, 0), np.float32)
        folder = self.root / key
        for chunk in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            with np.load(chunk) as data:
                if values.shape[1] == 0:
                    values = np.full((n, data["values"].shape[1]), np.nan, np.float32)
                values[data["indices"]] = data["values"]
                done[data["indices"]] = True
        self._memory[key] = (done, values)
        return done, values

    def _save_chunk(self, key: str, indices: np.ndarray, rows: np.ndarray) -> None:
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{len(indices)}"
        temporary = folder / f"{name}.tmp.npz"
        np.savez(temporary, indices=indices, values=rows.astype(np.float32))
        temporary.rename(folder / f"{name}.npz")


# ----------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class Outcome:
    """Test-set metrics of one fitted pipeline, plus what its refinement did on training."""

    auroc: float
    ap: float
    f1: float
    removal_precision: float | None
    removal_recall: float | None
    contamination: float
    n_rounds: int
    kept_share: float
    fit_seconds: float


def fit_and_score(train: np.ndarray, test: np.ndarray, test_labels: np.ndarray, config, kind: str,
                  train_labels: np.ndarray | None = None) -> Outcome:
    """Fit exactly what ``refinery fit`` fits on ``train`` embeddings and score ``test``.

    ``core.engine.refine_and_fit(train, config.validate().for_data(kind))`` (``kind`` is
    ``"images"`` or ``"table"``, resolving ``detector="auto"`` as ``refinery fit`` does; labels
    never reach the fit, they only feed the removal statistics computed here), then
    ``anomaly_score = -detector.score_samples(test)`` and AUROC / AP / F1 at the run's threshold
    from :func:`core.metrics.detection_metrics`.
    """
    from core.engine import refine_and_fit
    from core.metrics import detection_metrics

    with timed() as watch:
        model = refine_and_fit(train, config.validate().for_data(kind))
    score = -model.detector.score_samples(test).astype(np.float64)
    metrics = detection_metrics(np.asarray(test_labels), score, score > model.threshold)
    if metrics is None:
        raise ValueError("the test set needs both normal and anomalous samples")
    precision = recall = None
    if train_labels is not None and model.rounds:
        precision, recall = removal_stats(model.kept, train_labels)
    return Outcome(
        auroc=metrics.auroc, ap=metrics.ap, f1=metrics.f1, removal_precision=precision,
        removal_recall=recall, contamination=model.contamination, n_rounds=len(model.rounds),
        kept_share=float(np.mean(model.kept)), fit_seconds=watch.seconds,
    )
