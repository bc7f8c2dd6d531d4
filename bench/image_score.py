"""Image scores from maps (issue 18): pooled vs map vs auto image AUROC, clean and ~10% contaminated.

Each case is fitted as ``refinery fit`` fits it with the FitConfig defaults (``image_size`` auto,
``localization`` memory): ``refine_and_fit`` on the pooled embeddings, the run's localizer
(``core.pipeline.make_localizer``) fitted on the kept training images. Test images are scored three ways:

- **pooled**: ``-detector.score_samples`` of their embeddings;
- **map**: ``core.image_score.map_scores`` (top-1% mean of the map); the table also shows the map's
  max and top-5% mean, the reductions it was chosen from (dev half);
- **auto**: whichever of the two ``core.image_score.choose_image_score`` picks from the kept training
  images' ``location_share`` (printed: the rule's statistic).

Sets and halves (the rule's cutoff and the reduction were chosen on the dev half only):

- dev: MVTec bottle (train/good -> test; contaminated: SoftPatch 10%), magnetic tiles half A,
  Fashion-MNIST normal classes 0-4;
- report: magnetic tiles half B, Fashion-MNIST normal classes 5-9.

Magnetic tiles: MT_Free and the defective images are shuffled (seed 0) and halved; in a half, training is
``--tile-train`` MT_Free images, test ``--tile-test`` other MT_Free + as many defective images; the
contaminated protocol plants ``anomaly_count(n, 0.1)`` further defective images of the half in training.
Fashion-MNIST (28 px, fitted at 64 px): ``--fmnist-train`` training images of the normal class (plus
10% other classes when contaminated), test ``--fmnist-test`` of the class and as many of the others.

With ``--oof``, contaminated cases also fit the out-of-fold map scores of the training images
(``core.image_score.out_of_fold_map_scores``) and report the contamination estimated from them next to
the refinement's estimate and the truth, and how the out-of-fold scores of kept normal training images
compare with the final localizer's scores of normal test images (median ratio; 1 = no in-sample bias).

Run: ``python bench/image_score.py --threads 1 --sets bottle --oof --out bench/results/image_score_bottle.txt``
(and ``--sets tiles``, ``--sets fmnist``, each in its own process).
"""
from __future__ import annotations

import sys
from dataclasses import replace
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
from core.explain import image_scores_from_maps
from core.image_score import (
    MAP_REDUCTION, MAP_TOP_SHARE, TEXTURE_CUTOFF, choose_image_score, location_share, out_of_fold_map_scores,
)
from core.pipeline import make_localizer
from core.refine import estimate_contamination

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


def run_case(dataset, train_rows, test_rows, cache: ImageEmbeddingCache, oof: bool) -> dict:
    config = FitConfig().for_data(IMAGES, largest_image_side(dataset))
    config = replace(config, device="cpu")
    train, test = dataset.subset(train_rows), dataset.subset(test_rows)
    with timed() as watch:
        model = refine_and_fit(cache.embed(dataset, train_rows, config), config)
        pooled = -model.detector.score_samples(cache.embed(dataset, test_rows, config)).astype(np.float64)
        kept_paths = [p for p, keep in zip(train.paths, model.kept) if keep]
        localizer = make_localizer(config).fit(kept_paths)
        maps = localizer.anomaly_maps(test.paths, output_size=localizer.image_size)
        share = location_share(kept_paths, config)
    choice = choose_image_score("auto", share)
    chosen_map = image_scores_from_maps(maps, MAP_REDUCTION, MAP_TOP_SHARE)  # = map_scores(localizer, test.paths)
    row = {"pooled": roc_auc_score(test.labels, pooled), "map": roc_auc_score(test.labels, chosen_map),
           **{name: roc_auc_score(test.labels, image_scores_from_maps(maps, *how)) for name, how in REDUCTIONS.items()},
           "share": share, "chose": choice.used, "seconds": watch.seconds}
    row["auto"] = row[choice.used]
    row["gap"] = row["auto"] - max(row["pooled"], row["map"])
    if oof and train.labels is not None and train.labels.any():
        scores = out_of_fold_map_scores(make_localizer(config), train.paths, model.kept, seed=config.seed)
        normal_kept = (train.labels == 0) & model.kept
        row.update(true=float(train.labels.mean()), refine_est=model.contamination,
                   map_est=estimate_contamination(scores),
                   oof_ratio=float(np.median(scores[normal_kept]) / np.median(chosen_map[test.labels == 0])),
                   oof_train_auroc=roc_auc_score(train.labels, scores),
                   pooled_train_auroc=roc_auc_score(train.labels, model.train_score))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    parser.add_argument("--sets", nargs="+", choices=("bottle", "tiles", "fmnist"), default=["bottle", "tiles", "fmnist"])
    parser.add_argument("--fmnist-classes", type=int, nargs="+", default=list(DEV_FMNIST + REPORT_FMNIST))
    parser.add_argument("--fmnist-train", type=int, default=200)
    parser.add_argument("--fmnist-test", type=int, default=100)
    parser.add_argument("--tile-train", type=int, default=100)
    parser.add_argument("--tile-test", type=int, default=40)
    parser.add_argument("--oof", action="store_true", help="contaminated cases: out-of-fold map scores too")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    report = Report(args.out)
    machine_header(report, "Image scores from maps: pooled vs map vs auto (issue 18)")
    report.line(f"Rule: auto takes the map score when location_share < {TEXTURE_CUTOFF} (cutoff chosen on the dev "
                f"half); map score = {MAP_REDUCTION} of the top {MAP_TOP_SHARE:.0%}. Test image AUROC.")
    report.line()
    cases = []
    if "bottle" in args.sets:
        cases += list(bottle_cases(args.seeds[0]))
    if "tiles" in args.sets:
        cases += list(tile_cases(args.seeds[0], args.tile_train, args.tile_test))
    if "fmnist" in args.sets:
        cases += list(fmnist_cases(args.fmnist_classes, args.fmnist_train, args.fmnist_test))
    cache = ImageEmbeddingCache()
    rows, oof_rows = [], []
    with timed() as total:
        for name, half, protocol, dataset, train_rows, test_rows in cases:
            progress(f"{name} {protocol}: {len(train_rows)} training, {len(test_rows)} test images")
            row = run_case(dataset, train_rows, test_rows, cache, args.oof and protocol != "clean")
            progress(f"  {row}")
            rows.append([name, half, protocol, row["pooled"], row["map"], row["max"], row["top5%"], row["share"],
                         row["chose"], row["auto"], row["gap"], row["seconds"]])
            if "true" in row:
                oof_rows.append([name, half, row["true"], row["refine_est"], row["map_est"], row["oof_ratio"],
                                 row["pooled_train_auroc"], row["oof_train_auroc"]])
    report.table(["set", "half", "training", "pooled", "map (top1%)", "map max", "map top5%", "location_share",
                  "auto chose", "auto", "auto - best", "fit s"], rows, title="Test image AUROC per case")
    for half in ("dev", "report"):
        chosen = [r for r in rows if r[1] == half]
        if chosen:
            report.line(f"{half}: mean pooled {np.mean([r[3] for r in chosen]):.3f}, map {np.mean([r[4] for r in chosen]):.3f}, "
                        f"auto {np.mean([r[9] for r in chosen]):.3f}; worst auto - best {min(r[10] for r in chosen):+.3f}")
    if oof_rows:
        report.line()
        report.table(["set", "half", "true contamination", "refinement estimate", "map out-of-fold estimate",
                      "OOF kept-normal / test-normal median", "pooled training AUROC", "map OOF training AUROC"],
                     oof_rows, title="Contaminated training: out-of-fold map scores")
    report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
