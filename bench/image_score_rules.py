"""Exploration that chose issue 18's ``--image-score auto``: which label-free rule picks a good image score.

Every case of ``bench/image_score.py`` (same sets, halves and protocols) is fitted as a run is
(``bench.image_score.fit_case``): test scores of pooled and map, and the training images' out-of-sample
scores of both. Candidate rules read only training data:

- **location < 0.6**: the map when the share of the patch features' variance that the patch's location
  explains (:func:`location_share`) is below 0.6 (texture-like images), else pooled: the first rule;
- **agreement**: of the two scores' training rankings (Spearman), and each score's rank of the other's
  top 10% (``pooled on map top``: AUROC of the pooled score at picking the map score's top 10%; the
  better score's top should be the one the other agrees with);
- **removed lift**: how far each score lifts the images refinement removed above the kept ones
  (median, in kept interquartile ranges);
- **always pooled / map / both**, where both is the run's combination (``ImageScoreChoice.combine``).

The report lists the statistics per case, then per rule and half how often it lands within 0.01 of the
better single score, and its worst gap. Choose on the dev half only. ``--dump DIR`` keeps each case's
arrays and ``--from-dump DIR`` re-reads them instead of fitting.

Run: ``python bench/image_score_rules.py --threads 1 --dump bench/.cache/rules --out bench/results/image_score_rules.txt``
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from bench.common import ImageEmbeddingCache, Report, base_parser, machine_footer, machine_header, progress, setup_logging, timed
from bench.image_score import add_case_options, both_scores, cases_of, fit_case
from core.config import FitConfig
from core.data import IMAGES
from core.data.decode import read_rgb
from core.data.images import largest_image_side
from core.explain.patch import patch_features
from core.image_score import score_scale, standardized
from core.models.pretrained import load_backbone

LOCATION_CUTOFF = 0.6
TOP_SHARE = 0.1


@torch.inference_mode()
def location_share(paths, config: FitConfig, sample: int = 32) -> float:
    """Share of the variance of patch features that the patch's location explains, on a seeded draw of
    ``sample`` images: ``mean_l |mean_i f[i, l] - m|^2 / mean_{i,l} |f[i, l] - m|^2`` for the localizer's
    features ``f[i, l]`` of image ``i`` at grid cell ``l`` (mean ``m``): near 1 for aligned objects, near
    ``1 / n_images`` for stationary textures."""
    chosen = np.sort(np.random.default_rng(config.seed).choice(len(paths), min(sample, len(paths)), replace=False))
    model = load_backbone(config.backbone, config.image_size, "cpu", config.weights)
    total, squares, n = 0.0, 0.0, 0
    for start in range(0, len(chosen), config.batch_size):
        pixels = np.stack([read_rgb(paths[i], config.image_size) for i in chosen[start:start + config.batch_size]])
        features = patch_features(model, model.normalize(torch.from_numpy(pixels))).flatten(2).transpose(1, 2).double()
        total, squares, n = total + features.sum(dim=0), squares + float((features ** 2).sum()), n + len(features)
    per_location = total / n
    grand = per_location.mean(dim=0)
    overall = float(squares / (n * per_location.shape[0]) - (grand ** 2).sum())
    return float(((per_location - grand) ** 2).sum(dim=1).mean()) / overall if overall > 0 else 1.0


def top_agreement(judge: np.ndarray, picker: np.ndarray) -> float:
    """AUROC of ``judge`` at ranking the top :data:`TOP_SHARE` of ``picker`` above the rest."""
    top = np.zeros(len(picker), dtype=bool)
    top[np.argsort(-picker)[:max(2, round(TOP_SHARE * len(picker)))]] = True
    return roc_auc_score(top, judge)


def removed_lift(scores: np.ndarray, kept: np.ndarray) -> float:
    """Median of the removed training images' scores in kept-image IQRs from the kept median (0: none removed)."""
    return 0.0 if kept.all() else float(np.median(standardized(scores[~kept], score_scale(scores[kept]))))


def statistics(case: dict) -> dict:
    kept, pooled, mapped = case["kept"].astype(bool), case["train_pooled"], case["train_map"]
    return {"location_share": float(case["share"]), "spearman": float(spearmanr(pooled, mapped).statistic),
            "pooled on map top": top_agreement(pooled, mapped), "map on pooled top": top_agreement(mapped, pooled),
            "lift pooled": removed_lift(pooled, kept), "lift map": removed_lift(mapped, kept)}


RULES = {
    "location < 0.6": lambda s: "map" if s["location_share"] < LOCATION_CUTOFF else "pooled",
    "agreement": lambda s: "map" if s["pooled on map top"] > s["map on pooled top"] else "pooled",
    "removed lift": lambda s: "map" if s["lift map"] > s["lift pooled"] else "pooled",
    "always pooled": lambda s: "pooled",
    "always map": lambda s: "map",
    "always both": lambda s: "both",
}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    add_case_options(parser)
    parser.add_argument("--dump", type=Path, help="save each case's arrays here")
    parser.add_argument("--from-dump", type=Path, help="read the cases' arrays from here instead of fitting")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    report = Report(args.out)
    machine_header(report, "Image score auto: candidate label-free rules (issue 18 exploration)")
    with timed() as total:
        if args.from_dump:
            cases = [(path.stem, dict(np.load(path))) for path in sorted(args.from_dump.glob("*.npz"))]
        else:
            cache, cases = ImageEmbeddingCache(), []
            for name, half, protocol, dataset, train_rows, test_rows in cases_of(args):
                progress(f"{name} {protocol}")
                case = fit_case(dataset, train_rows, test_rows, cache)
                config = FitConfig().for_data(IMAGES, largest_image_side(dataset))
                kept_paths = [p for p, keep in zip(dataset.subset(train_rows).paths, case["kept"]) if keep]
                case["share"] = location_share(kept_paths, config)
                key = f"{name}_{half}_{protocol.rstrip('%')}"
                if args.dump:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    np.savez(args.dump / f"{key}.npz", **case)
                cases.append((key, case))
    rows, outcomes = [], []
    for key, case in cases:
        labels = case["test_labels"]
        auroc = {"pooled": roc_auc_score(labels, case["test_pooled"]), "map": roc_auc_score(labels, case["test_map"]),
                 "both": roc_auc_score(labels, both_scores(case))}
        stats = statistics(case)
        best = max(auroc["pooled"], auroc["map"])
        rows.append([key, *auroc.values(), *stats.values()])
        outcomes.append((key.split("_")[1], {rule: auroc[pick(stats)] - best for rule, pick in RULES.items()}))
    report.table(["case", "pooled", "map", "both", *statistics(cases[0][1]).keys()], rows,
                 title="Test image AUROC and the rules' training statistics")
    summary = []
    for rule in RULES:
        for half in ("dev", "report"):
            gaps = [gaps[rule] for h, gaps in outcomes if h == half]
            if gaps:
                summary.append([rule, half, f"{sum(g >= -0.01 for g in gaps)} of {len(gaps)}", min(gaps), float(np.mean(gaps))])
    report.table(["rule", "half", "within 0.01 of the better single score", "worst gap", "mean gap"], summary,
                 title="Each rule's test AUROC minus the better of pooled and map")
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
