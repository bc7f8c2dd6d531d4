"""Speed: feature extraction vs a bare forward pass, refinement's share of a fit, memory, table scaling.

Issue 2, "Benchmarks" 4, measured in one run:

(a) images/s of ``ImageEncoder.embed`` (reading and decoding PNG files from disk, batching,
    normalising, forward, pooling) against a bare forward pass of the same backbone object on
    pre-decoded, pre-normalised tensors: same batch size, channels_last layout, image size,
    feature layers, torch threads and ``torch.inference_mode``. Repeats alternate the two; the
    fastest run of each counts (the least disturbed by other processes). Measured with torch's
    default thread count and with 1 thread: on a busy 2-core machine two OpenMP threads can be
    several times slower than one.
(b) a whole fit as ``refinery fit`` runs it (encoder fit + embed, then
    ``core.engine.refine_and_fit``), split into encoding, refinement rounds (the rounds' own
    ``seconds``) and the rest (contamination estimate, final detector, training scores), for image
    sets and tables;
(c) peak RSS of each embedding pass and each fit, each in a fresh process (the kernel's high-water
    mark, reset just before the measured block), next to the RSS the process had before it (after
    imports and data loading);
(d) fit time for 1k / 10k / 50k rows of a real ADBench table (default 10_cover, stratified
    subsample, natural contamination), one line per size.

Run: ``python bench/speed.py`` (about 4-10 minutes on 2 cores, depending on load) or ``--quick``.
"""
from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    SHARED_DATA,
    Report,
    base_parser,
    memory_peak,
    machine_footer,
    machine_header,
    progress,
    run_isolated,
    setup_logging,
    timed,
)
from core.config import IMAGE_SIZE, FitConfig

BOTTLE = SHARED_DATA / "mvtec_ad_bottle_256" / "bottle"
TABLES = SHARED_DATA / "adbench_classical"
SPEED_TARGET = 0.9


# ----------------------------------------------------------------------------- data

def bottle_dataset():
    from core.data import load_image_folder

    return load_image_folder(BOTTLE)


def fashion_test_dataset():
    """The Fashion-MNIST test set as PNG files (10,000 images) and its class labels."""
    from bench.fashion_mnist import fashion_mnist_files

    return fashion_mnist_files("test")


# ----------------------------------------------------------------------------- (a) throughput

def throughput(dataset, config: FitConfig, repeats: int) -> dict:
    """Images/s of ImageEncoder.embed and of the bare forward pass on the same images (best of ``repeats``).

    The fastest run is the one least disturbed by other processes; runs alternate between the two.
    """
    import torch

    from core.data import read_rgb
    from core.models.efficientnet import normalize_images
    from core.models.image_encoder import ImageEncoder

    encoder = ImageEncoder(config)
    model, layers, size, batch_size = encoder.model, config.feature_layers, config.image_size, config.batch_size
    n = len(dataset)
    with timed() as decode:
        pixels = np.stack([read_rgb(path, size) for path in dataset.paths])
    batches = []
    for start in range(0, n, batch_size):
        batch = normalize_images(torch.from_numpy(pixels[start:start + batch_size])).to(encoder.device)
        if encoder.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        batches.append(batch)

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                model.pooled(batch, layers).float().cpu()
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()

    encoder.embed(dataset.subset(np.arange(min(n, batch_size))))  # warm-up: weights, allocator, kernels
    bare()
    encoder_s, bare_s, memory = [], [], {}
    for _ in range(repeats):
        with memory_peak() as memory["encoder"], timed() as watch:
            encoder.embed(dataset)
        encoder_s.append(watch.seconds)
        with memory_peak() as memory["bare"], timed() as watch:
            bare()
        bare_s.append(watch.seconds)
    return {"n": n, "encoder": n / min(encoder_s), "bare": n / min(bare_s),
            "decode": n / decode.seconds, "encoder_runs": encoder_s, "bare_runs": bare_s, "memory": memory}


def throughput_case(name: str, count: int, repeats: int, threads: int) -> dict:
    """:func:`throughput` on the first ``count`` images of a named set with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    if name == "bottle":
        dataset, config = bottle_dataset(), FitConfig(image_size=IMAGE_SIZE)
    else:
        dataset, config = fashion_test_dataset()[0], FitConfig(image_size=64)
    subset = dataset.subset(np.arange(min(count, len(dataset))))
    return {**throughput(subset, config, repeats), "config": config}


# ----------------------------------------------------------------------------- (b)-(d) fits

def _fit_breakdown(encode_s: float, embeddings: np.ndarray, config: FitConfig, kind: str) -> dict:
    from core.engine import refine_and_fit

    config = config.validate().for_data(kind)
    with timed() as watch:
        model = refine_and_fit(embeddings, config)
    refinement = sum(record.seconds for record in model.rounds)
    return {"n": len(embeddings), "dims": embeddings.shape[1], "encode_s": encode_s, "refine_s": refinement,
            "rest_s": watch.seconds - refinement, "total_s": encode_s + watch.seconds, "rounds": len(model.rounds),
            "detector": config.detector}


def fit_images(which: str, quick: bool) -> dict:
    """A whole image fit in this process: encode (cold, incl. model load) and refine_and_fit."""
    from core.data import softpatch_protocol, srr_protocol
    from core.models.image_encoder import ImageEncoder

    if which == "bottle":
        config = FitConfig(image_size=IMAGE_SIZE)
        train = softpatch_protocol(bottle_dataset(), 0.1, seed=0).train
    else:
        config = FitConfig(image_size=64)
        pool, classes = fashion_test_dataset()
        train = srr_protocol(pool, classes, 0, 0.1, n_train_normal=300 if quick else 900, seed=0).train
    with memory_peak() as memory:
        with timed() as encode:
            encoder = ImageEncoder(config).fit(train.without_labels())
            embeddings = encoder.embed(train.without_labels())
        result = _fit_breakdown(encode.seconds, embeddings, config, "images")
    return {**result, "memory": memory}


def fit_table(path: Path, rows: int) -> dict:
    """A whole table fit on a stratified ``rows``-row subsample of ``path``."""
    from sklearn.model_selection import train_test_split

    from core.data import load_table
    from core.models.tabular import TableEncoder

    dataset = load_table(path)
    if rows < len(dataset):
        keep, _ = train_test_split(np.arange(len(dataset)), train_size=rows, stratify=dataset.labels,
                                   random_state=0)
        dataset = dataset.subset(np.sort(keep))
    data = dataset.without_labels()
    config = FitConfig()
    with memory_peak() as memory:
        with timed() as encode:
            embeddings = TableEncoder().fit(data).embed(data)
        result = _fit_breakdown(encode.seconds, embeddings, config, "table")
    return {**result, "memory": memory}


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--table", default="10_cover", help="ADBench set for the row scaling (>= 50k rows)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000], help="table rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per throughput measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch threads for (a) (default: torch's default, and 1 when that is more; "
                             "the fits always use torch's default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [1_000, 10_000], 1
    if args.threads is None:
        import torch

        args.threads = sorted({torch.get_num_threads(), 1}, reverse=True)
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    table_path = TABLES / f"{args.table}.npz"

    report = Report(args.out)
    machine_header(report, "Speed and memory")
    report.line("- seeds are not used here: every fit uses FitConfig(seed=0)")
    report.line()
    with timed() as total:
        speed_rows = []
        for (name, key, count), threads in itertools.product(
            (("bottle PNG 256px", "bottle", 64 if args.quick else 292),
             ("Fashion-MNIST PNG 28px", "fashion", 128 if args.quick else 2048)),
            args.threads,
        ):
            progress(f"throughput: {name} ({count} images, {threads} torch threads)")
            result = run_isolated(throughput_case, key, count, args.repeats, threads)
            config, memory = result["config"], result["memory"]
            runs = {kind: ", ".join(f"{s:.2f}" for s in result[f"{kind}_runs"]) for kind in ("encoder", "bare")}
            report.line(f"- {name}, torch threads {threads}: embed runs {runs['encoder']} s; bare runs {runs['bare']} s")
            speed_rows.append([name, threads, config.image_size, "+".join(config.feature_layers), config.batch_size,
                               result["n"], result["decode"], result["encoder"], result["bare"],
                               result["encoder"] / result["bare"],
                               "MET" if result["encoder"] / result["bare"] >= SPEED_TARGET else "NOT met",
                               memory["encoder"].peak_mb - memory["encoder"].before_mb,
                               memory["bare"].peak_mb - memory["bare"].before_mb])
        report.line()
        report.table(["images", "torch threads", "size", "feature_layers", "batch", "n",
                      "decode only img/s (1 thread)", "ImageEncoder.embed img/s", "bare forward img/s", "ratio",
                      f"target >= {SPEED_TARGET}x", "embed peak RSS increase MiB", "bare peak RSS increase MiB"],
                     speed_rows, title=f"(a) Feature extraction (fastest of {args.repeats}; each set in a fresh "
                                       "process; bare = pre-decoded, pre-normalised tensors, not counted in its memory)")

        fits = []
        for label, function, fit_args in (
            ("images: bottle SoftPatch 10% (224px)", fit_images, ("bottle", args.quick)),
            ("images: F-MNIST SRR class 0, 10% (64px)", fit_images, ("fashion", args.quick)),
            *[(f"table: {args.table} {rows} rows", fit_table, (table_path, rows)) for rows in args.sizes],
        ):
            progress(f"fit: {label}")
            fits.append((label, run_isolated(function, *fit_args)))
        rows = []
        for label, result in fits:
            memory = result["memory"]
            rows.append([label, result["detector"], result["n"], result["dims"], result["encode_s"],
                         result["refine_s"], result["rest_s"], result["total_s"],
                         result["refine_s"] / result["total_s"],
                         result["rounds"], memory.before_mb, memory.peak_mb, memory.peak_mb - memory.before_mb])
        report.table(["fit", "detector", "n", "dims", "encode s", "refinement s", "rest of refine_and_fit s", "total s",
                      "refinement share", "rounds", "RSS before fit MiB", "peak RSS MiB", "peak - before MiB"],
                     rows, title="(b)-(d) Whole fits (each in a fresh process; encode includes model load; "
                                 "memory: RSS after imports and data loading, and the peak over the fit)")
        if not all(result["memory"].reset for _, result in fits):
            report.line("Note: the peak could not be reset on this system, so it includes data loading.")
        table_rows = [(r[2], r[7]) for r in rows if r[0].startswith("table")]
        if len(table_rows) > 1:
            growth = [f"{b[0] / a[0]:.0f}x rows -> {b[1] / a[1]:.1f}x time" for a, b in zip(table_rows, table_rows[1:])]
            report.line("Table fit time growth: " + "; ".join(growth))
            report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
