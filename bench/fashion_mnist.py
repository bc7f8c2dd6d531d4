"""Fashion-MNIST, SRR protocol: refined default vs unrefined vs clean oracle, one class normal at a time.

Protocol (issue 2, "Benchmarks" 3): for each class c as normal, ``core.data.srr_protocol`` draws
``--n-normal`` (2,000) class-c images from the Fashion-MNIST training set plus images of the other
classes so that they make up ``--ratio`` (10%) of training (``anomaly_count(2000, 0.1)`` = 222,
i.e. 222 / 2,222 = 9.99%). Test: the full 10,000-image test set, class c = 0, others = 1.
Images are written once as PNG files (``core.data.materialize_images``) under bench/.cache, read
back with ``core.data.load_image_folder`` and embedded with ``ImageEncoder`` (Lite0, ``--image-size``
64 px); every image is embedded once (cached). Methods, all ``core.engine.refine_and_fit``:
``refined`` (FitConfig defaults), ``unrefined`` (refine=False), ``clean`` (refine=False on the 2,000 normals only: an upper bound).
A ``feature_layers`` sweep runs on ``--variant-classes``.

Run: ``python bench/fashion_mnist.py`` (seeds 0 1 2; about 5-15 minutes on 2 cores the first time,
depending on load; reruns reuse the cached embeddings) or ``--quick``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    ImageEmbeddingCache,
    Report,
    base_parser,
    fit_and_score,
    machine_footer,
    machine_header,
    materialized_images,
    mean,
    progress,
    setup_logging,
    timed,
)
from core.config import FEATURE_LAYERS, FitConfig
from core.data import FASHION_MNIST_CLASSES, IMAGES, load_fashion_mnist, srr_protocol

LAYER_SETS = (
    ("stride16",),
    ("stride32",),
    ("stride16", "stride32"),
    ("head",),
    ("stride8", "stride16", "stride32"),
)
GAP_TARGET = 0.015
METHODS = ("refined (default)", "unrefined", "clean (upper bound)")


def fashion_mnist_files(split: str, keep: np.ndarray | None = None):
    """A Fashion-MNIST split (optionally the rows ``keep``) as PNG files, and its class labels."""
    images, classes = load_fashion_mnist(split)
    if keep is not None:
        images, classes = images[keep], classes[keep]
    return materialized_images(images, f"fashion-mnist-{split}"), classes


def evaluate_class(normal: int, seed: int, pool, pool_classes, test, test_classes, config, cache, args) -> dict:
    """The three methods for one normal class and seed, with ``config.feature_layers``."""
    split = srr_protocol(pool, pool_classes, normal, args.ratio, n_train_normal=args.n_normal, seed=seed)
    x_train = cache.embed(pool, split.train_indices, config, layers=FEATURE_LAYERS)
    x_test = cache.embed(test, np.arange(len(test)), config, layers=FEATURE_LAYERS)
    y_train = split.train.labels
    y_test = (test_classes != normal).astype(np.int8)
    config = config.with_changes(seed=seed)
    n_anomalous = int(np.sum(y_train == 1))
    return {
        "description": (f"normal class {normal}, seed {seed}: train {len(y_train) - n_anomalous} normal + "
                        f"{n_anomalous} anomalous ({n_anomalous / len(y_train):.2%}); test {int(np.sum(y_test == 0))} "
                        f"normal + {int(np.sum(y_test == 1))} anomalous"),
        "refined (default)": fit_and_score(x_train, x_test, y_test, config, IMAGES, train_labels=y_train),
        "unrefined": fit_and_score(x_train, x_test, y_test, config.with_changes(refine=False), IMAGES),
        "clean (upper bound)": fit_and_score(x_train[y_train == 0], x_test, y_test,
                                             config.with_changes(refine=False), IMAGES),
    }


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0, 1, 2))
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="normal classes to run")
    parser.add_argument("--variant-classes", type=int, nargs="*", default=[0, 2, 6],
                        help="classes for the feature_layers sweep (none to skip)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--n-normal", type=int, default=2000, help="normal training images per class")
    parser.add_argument("--ratio", type=float, default=0.1, help="anomaly share of training")
    parser.add_argument("--test-size", type=int, default=None,
                        help="use a seeded stratified subset of the test set (default: all 10,000)")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.variant_classes, args.n_normal = [0, 1], [0], 500
        args.test_size = args.test_size or 1000
        args.seeds = args.seeds[:1]
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    report = Report(args.out)
    machine_header(report, "Fashion-MNIST: SRR protocol, one class normal at a time")
    base = FitConfig(image_size=args.image_size)
    with timed() as total:
        pool, pool_classes = fashion_mnist_files("train")
        keep = None
        if args.test_size:
            _, test_classes_all = load_fashion_mnist("test")
            rng = np.random.default_rng(0)
            keep = np.sort(np.concatenate([
                rng.choice(np.flatnonzero(test_classes_all == c), args.test_size // 10, replace=False)
                for c in range(10)]))
        test, test_classes = fashion_mnist_files("test", keep)
        report.line(f"- train pool {len(pool)} images (fingerprint {pool.fingerprint}); test {len(test)} images "
                    f"(fingerprint {test.fingerprint}); classes {args.classes}; seeds {args.seeds}")
        report.line(f"- srr_protocol(pool, classes, normal, anomaly_ratio={args.ratio}, "
                    f"n_train_normal={args.n_normal}, seed)")
        report.line(f"- embeddings: ImageEncoder({base.backbone}, image_size={base.image_size}); "
                    f"fits: core.engine.refine_and_fit with {base.for_data(IMAGES)}")
        report.line()

        cache = ImageEmbeddingCache()
        results: dict[int, dict[int, dict]] = {}
        for normal in args.classes:
            results[normal] = {}
            for seed in args.seeds:
                results[normal][seed] = evaluate_class(normal, seed, pool, pool_classes, test, test_classes,
                                                       base, cache, args)
                progress(f"class {normal} seed {seed}: " + " ".join(
                    f"{m}={results[normal][seed][m].auroc:.3f}" for m in METHODS))

        sweep: dict[tuple[str, ...], dict[int, dict]] = {}
        for layers in LAYER_SETS if args.variant_classes else ():
            config = base.with_changes(feature_layers=layers)
            sweep[layers] = {}
            for normal in args.variant_classes:
                sweep[layers][normal] = (results[normal][args.seeds[0]] if layers == base.feature_layers
                                         and normal in results else
                                         evaluate_class(normal, args.seeds[0], pool, pool_classes, test,
                                                        test_classes, config, cache, args))
            progress(f"sweep {'+'.join(layers)} done")

    report.line(f"Example split: {results[args.classes[0]][args.seeds[0]]['description']}")
    report.line()
    for metric in ("auroc", "ap"):
        rows = []
        for normal, per_seed in results.items():
            outs = per_seed.values()
            rows.append([f"{normal} {FASHION_MNIST_CLASSES[normal]}",
                         *[mean([getattr(o[m], metric) for o in outs]) for m in METHODS]])
        rows.append(["MEAN", *[mean([row[j] for row in rows]) for j in range(1, 4)]])
        report.table(["normal class", *METHODS], rows,
                     title=f"Test {metric.upper()} (full test set: normal class = 0, others = 1; "
                           f"mean over seeds {args.seeds})")

    rows = []
    for normal, per_seed in results.items():
        refined = [o["refined (default)"] for o in per_seed.values()]
        rows.append([f"{normal} {FASHION_MNIST_CLASSES[normal]}", mean([o.contamination for o in refined]),
                     mean([o.removal_precision for o in refined]), mean([o.removal_recall for o in refined]),
                     mean([o.kept_share for o in refined]), mean([o.n_rounds for o in refined]),
                     mean([o.fit_seconds for o in refined])])
    rows.append(["MEAN", *[mean([row[j] for row in rows]) for j in range(1, 7)]])
    report.table(["normal class", "estimated contamination", "removal precision", "removal recall", "kept share",
                  "rounds", "fit seconds"], rows, title="Refinement of the default (training set)")

    means = {m: mean([o[m].auroc for per_seed in results.values() for o in per_seed.values()]) for m in METHODS}
    gap = means["clean (upper bound)"] - means["refined (default)"]
    report.line(f"**clean - refined mean AUROC = {gap:+.4f}** (target <= {GAP_TARGET}: "
                f"{'MET' if gap <= GAP_TARGET else 'NOT met'}); refined - unrefined = "
                f"{means['refined (default)'] - means['unrefined']:+.4f}")
    report.line()

    if sweep:
        rows = []
        for layers, per_class in sweep.items():
            outs = per_class.values()
            rows.append(["+".join(layers), *[mean([o[m].auroc for o in outs]) for m in METHODS],
                         mean([o["refined (default)"].removal_recall for o in outs]),
                         mean([o["refined (default)"].removal_precision for o in outs])])
        report.table(["feature_layers", *[f"AUROC {m}" for m in METHODS], "removal recall", "removal precision"],
                     rows, title=f"feature_layers sweep on classes {args.variant_classes}, seed {args.seeds[0]} "
                                 "(mean over those classes)")
        best = max(rows, key=lambda row: row[1])
        report.line(f"Best refined AUROC: **{best[0]}** ({best[1]:.4f}); default {'+'.join(base.feature_layers)}.")
        report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
