"""Image scores from maps (issue 18): pooled vs map vs both vs auto image AUROC, clean and ~10% contaminated.

Each case is fitted as ``refinery fit`` fits it with the FitConfig defaults (``image_size`` auto,
``localization`` memory): ``refine_and_fit`` on the pooled embeddings, the run's localizer
(``core.pipeline.make_localizer``) fitted on the kept training images. Test images are scored three ways:

- **pooled**: ``-detector.score_samples`` of their embeddings;
- **map**: ``core.image_score.map_scores`` (top-1% mean of the map, weighed by the localizer's border
  gain); the table also shows the map's max and top-5% mean, the reductions it was chosen from (dev half);
- **both**: the two combined as a run does (``ImageScoreChoice.combine``), on the scales of the training
  images' out-of-sample scores: the pooled detector's cross-fitted ones and the out-of-fold map scores
  (``core.image_score.score_training_images``);
- **auto**: whichever of these ``core.image_score.choose_image_score("auto")`` takes.

Sets and halves (defaults were chosen on the dev half only, ``bench/image_score_rules.py``):

- dev: MVTec bottle (train/good -> test; contaminated: SoftPatch 10%), magnetic tiles half A,
  Fashion-MNIST normal classes 0-4;
- report: magnetic tiles half B, Fashion-MNIST normal classes 5-9.

Magnetic tiles: MT_Free and the defective images are shuffled (seed 0) and halved; in a half, training is
``--tile-train`` MT_Free images, test ``--tile-test`` other MT_Free + as many defective images; the
contaminated protocol plants ``anomaly_count(n, 0.1)`` further defective images of the half in training.
Fashion-MNIST (28 px, fitted at 64 px): ``--fmnist-train`` training images of the normal class (plus
10% other classes when contaminated), test ``--fmnist-test`` of the class and as many of the others.

Contaminated cases also report the contamination estimated from the out-of-fold map scores next to the
refinement's estimate and the truth, and how the out-of-fold scores of kept normal training images
compare with the final localizer's scores of normal test images (median ratio; 1 = no in-sample bias).
``--dump DIR`` saves each case's scores (one ``.npz``) for ``bench/image_score_rules.py``; ``--from-dump
DIR`` reports on saved cases (also those ``bench/image_score_rules.py --dump`` saves) without fitting.

Run: ``python bench/image_score.py --threads 1 --sets bottle --out bench/results/image_score_bottle.txt``
(and ``--sets tiles``, ``--sets fmnist``, each in its own process).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.common import (
    SHARED_DATA, ImageEmbeddingCache, Report, base_parser, machine_footer, machine_header, materialized_images,
    progress, setup_logging, timed,
)
from core.config import FitConfig
from core.data import IMAGES, anomaly_count, load_fashion_mnist, load_image_folder, softpatch_protocol
from core.data.images import largest_image_side
from core.decision import refine_and_fit
from core.detectors import make_detector
from core.explain import image_scores_from_maps
from core.image_score import (
    MAP_REDUCTION, MAP_TOP_SHARE, ImageScoreChoice, choose_image_score, out_of_fold_map_scores, score_scale,
)
from core.pipeline import make_localizer
from core.refine import cross_fitted_anomaly_scores, estimate_contamination

BOTTLE = SHARED_DATA / "mvtec_ad_bottle_256" / "bottle"
TILES = SHARED_DATA / "magnetic_tile_defects"
RATIO = 0.1
REDUCTIONS = {"max": ("max", 0.01), "top1%": ("topk_mean", 0.01), "top5%": ("topk_mean", 0.05)}
DEV_FMNIST, REPORT_FMNIST = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def bottle_cases(seed: int):
    dataset = load_image_folder(BOTTLE)
    is_train = np.array([i.startswith("train/") for i in dataset.ids])
    yield "bottle", "dev", "clean", dataset, np.flatnonzero(is_train), np.flatnonzero(~is_train)
    split = softpatch_protocol(dataset, RATIO, seed=seed)
    yield "bottle", "dev", "10%", dataset, split.train_indices, split.test_indices


def tile_cases(seed: int, n_train: int, n_test: int):
    dataset = load_image_folder(TILES)
    keep = np.array([i for i, sample_id in enumerate(dataset.ids) if sample_id.startswith("MT_")])
    dataset = dataset.subset(keep)
    labels = np.array([0 if i.startswith("MT_Free/") else 1 for i in dataset.ids], dtype=np.int8)
    dataset = replace(dataset, labels=labels)
    rng = np.random.default_rng(0)
    free, defects = rng.permutation(np.flatnonzero(labels == 0)), rng.permutation(np.flatnonzero(labels == 1))
    for half, name in ((0, "dev"), (1, "report")):
        half_free, half_defects = free[half::2], defects[half::2]
        train = half_free[:n_train]
        test = np.concatenate([half_free[n_train:n_train + n_test], half_defects[:n_test]])
        planted = rng.permutation(half_defects[n_test:])[:anomaly_count(n_train, RATIO)]
        yield f"tiles-{'A' if half == 0 else 'B'}", name, "clean", dataset, np.sort(train), np.sort(test)
        yield (f"tiles-{'A' if half == 0 else 'B'}", name, "10%", dataset, np.sort(np.concatenate([train, planted])),
               np.sort(test))


def fmnist_cases(classes, n_train: int, n_test: int):
    train_images, train_classes = load_fashion_mnist("train")
    test_images, test_classes = load_fashion_mnist("test")
    for normal in classes:
        rng = np.random.default_rng(normal)
        normals = rng.choice(np.flatnonzero(train_classes == normal), n_train, replace=False)
        others = rng.choice(np.flatnonzero(train_classes != normal), anomaly_count(n_train, RATIO), replace=False)
        test = np.concatenate([rng.choice(np.flatnonzero(test_classes == normal), n_test, replace=False),
                               rng.choice(np.flatnonzero(test_classes != normal), n_test, replace=False)])
        pool_images = np.concatenate([train_images[normals], train_images[others], test_images[test]])
        pool_labels = np.r_[np.zeros(n_train), np.ones(len(others)), (test_classes[test] != normal)].astype(np.int8)
        dataset = replace(materialized_images(pool_images, f"fmnist-image-score-{normal}"), labels=pool_labels)
        test_rows = np.arange(n_train + len(others), len(pool_images))
        half = "dev" if normal in DEV_FMNIST else "report"
        yield f"fmnist-{normal}", half, "clean", dataset, np.arange(n_train), test_rows
        yield f"fmnist-{normal}", half, "10%", dataset, np.arange(n_train + len(others)), test_rows


def fit_case(dataset, train_rows, test_rows, cache: ImageEmbeddingCache) -> dict:
    """A case fitted as a run is: its labels, kept mask and both scores of its test and training images
    (training: out of sample, as ``score_training_images`` computes them), the test maps' reductions."""
    config = replace(FitConfig().for_data(IMAGES, largest_image_side(dataset)), device="cpu")
    train, test = dataset.subset(train_rows), dataset.subset(test_rows)
    with timed() as watch:
        model = refine_and_fit(cache.embed(dataset, train_rows, config), config)
        kept_paths = [p for p, keep in zip(train.paths, model.kept) if keep]
        localizer = make_localizer(config).fit(kept_paths)
        weights = localizer.score_weights()              # as core.image_score.map_scores reads a map
        maps = [m * weights for m in localizer.anomaly_maps(test.paths, output_size=localizer.image_size)]
        factory = partial(make_detector, config.detector, random_state=config.seed)
        case = {
            "test_labels": test.labels, "train_labels": train.labels, "kept": model.kept,
            "refine_estimate": model.contamination,
            "test_pooled": -model.detector.score_samples(cache.embed(dataset, test_rows, config)).astype(np.float64),
            "test_map": image_scores_from_maps(maps, MAP_REDUCTION, MAP_TOP_SHARE),   # = map_scores(localizer, test)
            **{f"test_map_{name}": image_scores_from_maps(maps, *how) for name, how in REDUCTIONS.items()},
            "train_pooled": cross_fitted_anomaly_scores(model.embeddings, np.arange(len(train_rows)), model.kept,
                                                        factory, folds=max(config.ensemble, 2), seed=config.seed),
            "train_map": out_of_fold_map_scores(make_localizer(config), train.paths, model.kept, seed=config.seed),
        }
    case["seconds"] = watch.seconds
    return case


def both_scores(case: dict) -> np.ndarray:
    """The test images' scores under ``both``, on the scales of the kept training images' scores."""
    kept = case["kept"].astype(bool)
    choice = ImageScoreChoice("both", "both", "", {"pooled": score_scale(case["train_pooled"][kept]),
                                                   "map": score_scale(case["train_map"][kept])})
    return choice.combine(case["test_pooled"], case["test_map"])


def case_row(case: dict) -> dict:
    labels, chose = case["test_labels"], choose_image_score("auto").used
    row = {"pooled": roc_auc_score(labels, case["test_pooled"]), "map": roc_auc_score(labels, case["test_map"]),
           **{name: roc_auc_score(labels, case[f"test_map_{name}"]) for name in REDUCTIONS},
           "both": roc_auc_score(labels, both_scores(case)), "chose": chose, "seconds": float(case["seconds"])}
    row["auto"] = row[chose]
    row["gap"] = row["auto"] - max(row["pooled"], row["map"])
    return row


def contamination_row(case: dict) -> list:
    """The contaminated case's estimates and the out-of-fold scores' bias (see the module docstring)."""
    labels, kept, scores = case["train_labels"], case["kept"].astype(bool), case["train_map"]
    normal_kept = (labels == 0) & kept
    return [float(labels.mean()), float(case["refine_estimate"]), estimate_contamination(scores),
            float(np.median(scores[normal_kept]) / np.median(case["test_map"][case["test_labels"] == 0])),
            roc_auc_score(labels, case["train_pooled"]), roc_auc_score(labels, scores)]


def cases_of(args) -> list:
    """The chosen sets' cases: ``(name, half, protocol, dataset, train rows, test rows)``."""
    cases = []
    if "bottle" in args.sets:
        cases += list(bottle_cases(args.seeds[0]))
    if "tiles" in args.sets:
        cases += list(tile_cases(args.seeds[0], args.tile_train, args.tile_test))
    if "fmnist" in args.sets:
        cases += list(fmnist_cases(args.fmnist_classes, args.fmnist_train, args.fmnist_test))
    return cases


def fitted_cases(args, cache: ImageEmbeddingCache):
    """``(name, half, protocol, case)`` of each case: fitted (:func:`fit_case`, saved to ``args.dump`` when
    given) or read back from ``args.from_dump``."""
    if args.from_dump:
        for path in sorted(args.from_dump.glob("*.npz")):
            name, half, protocol = path.stem.rsplit("_", 2)
            yield name, half, "clean" if protocol == "clean" else f"{protocol}%", dict(np.load(path))
        return
    for name, half, protocol, dataset, train_rows, test_rows in cases_of(args):
        progress(f"{name} {protocol}: {len(train_rows)} training, {len(test_rows)} test images")
        case = fit_case(dataset, train_rows, test_rows, cache)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            np.savez(args.dump / f"{name}_{half}_{protocol.rstrip('%')}.npz", **case)
        yield name, half, protocol, case


def add_case_options(parser) -> None:
    parser.add_argument("--sets", nargs="+", choices=("bottle", "tiles", "fmnist"), default=["bottle", "tiles", "fmnist"])
    parser.add_argument("--fmnist-classes", type=int, nargs="+", default=list(DEV_FMNIST + REPORT_FMNIST))
    parser.add_argument("--fmnist-train", type=int, default=200)
    parser.add_argument("--fmnist-test", type=int, default=100)
    parser.add_argument("--tile-train", type=int, default=100)
    parser.add_argument("--tile-test", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    add_case_options(parser)
    parser.add_argument("--dump", type=Path, help="save each case's scores here (for bench/image_score_rules.py)")
    parser.add_argument("--from-dump", type=Path, help="report on the cases saved here (by --dump, or by "
                                                       "bench/image_score_rules.py --dump) instead of fitting")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    report = Report(args.out)
    machine_header(report, "Image scores from maps: pooled vs map vs both vs auto (issue 18)")
    report.line(f"auto takes {choose_image_score('auto').used}; map score = {MAP_REDUCTION} of the top "
                f"{MAP_TOP_SHARE:.0%}. Test image AUROC.")
    report.line()
    cache = ImageEmbeddingCache()
    rows, contamination_rows = [], []
    with timed() as total:
        for name, half, protocol, case in fitted_cases(args, cache):
            row = case_row(case)
            progress(f"  {row}")
            rows.append([name, half, protocol, row["pooled"], row["map"], row["max"], row["top5%"], row["both"],
                         row["chose"], row["auto"], row["gap"], row["seconds"]])
            if case["train_labels"].any():
                contamination_rows.append([name, half, *contamination_row(case)])
    report.table(["set", "half", "training", "pooled", "map (top1%)", "map max", "map top5%", "both",
                  "auto chose", "auto", "auto - best", "fit s"], rows, title="Test image AUROC per case")
    for half in ("dev", "report"):
        chosen = [r for r in rows if r[1] == half]
        if chosen:
            report.line(f"{half}: mean pooled {np.mean([r[3] for r in chosen]):.3f}, map {np.mean([r[4] for r in chosen]):.3f}, "
                        f"auto {np.mean([r[9] for r in chosen]):.3f}; worst auto - best {min(r[10] for r in chosen):+.3f}; "
                        f"auto within 0.01 of the best in {sum(r[10] >= -0.01 for r in chosen)} of {len(chosen)}")
    if contamination_rows:
        report.line()
        report.table(["set", "half", "true contamination", "refinement estimate", "map out-of-fold estimate",
                      "OOF kept-normal / test-normal median", "pooled training AUROC (cross-fitted)",
                      "map OOF training AUROC"], contamination_rows, title="Contaminated training: out-of-sample scores")
    report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
