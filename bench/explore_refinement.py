"""Explorations behind refinement's defaults, on the dev half of bench/refinement.py only.

Each study refines the training embeddings of every dev case with ``core.refine.iter_refine`` (as
``core.engine.refine_and_fit`` does), fits the run's final detector (``FitConfig.for_data``: GDE for
images, kNN for tables) on the kept samples and reports the mean test AUROC over the cases, beside
the unrefined fit and the clean oracle. Studies (``--study``):

- ``refine-detector``: the ensemble's detector (``FitConfig.refine_detector``): gde, knn and the robust
  Gaussian (mcd) with 5 or 10 principal components for images; knn and mcd for tables;
- ``subsets``: each round's K subsets drawn from the kept samples or from all of them (SRR);
- ``gamma-error``: gamma fixed at the true contamination times 0.5 ... 2, to see whether an estimate
  that errs high costs less than one that errs low;
- ``cutoff``: the ``gamma=auto`` rule's cutoff (robust SDs above the median of the last round's
  consensus scores) against the true share, and the alternative tried, the weight of the upper
  component of a two-Gaussian mixture fitted to the same scores: median estimate / true per share;
- ``knn-k``: the kNN detector's k on tables (ensemble and final detector);
- ``rounds-k``: the number of rounds (1, 3, 5) and of detectors K (3, 5, 10), one changed at a time.

Run: ``python bench/explore_refinement.py --out bench/results/explore_refinement.txt`` (about 20 minutes
on 2 cores once bench/refinement.py has cached the embeddings).
"""
from __future__ import annotations

import sys
import warnings
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from sklearn.mixture import GaussianMixture

from bench.common import Report, base_parser, machine_footer, machine_header, progress, setup_logging, timed
from bench.refinement import DEV_CLASSES, Case, add_case_arguments, fashion_mnist_cases, table_cases
from core.config import FitConfig
from core.detectors import make_detector
from core.metrics import detection_metrics
from core.refine import estimate_contamination, iter_refine

STUDIES = ("refine-detector", "subsets", "gamma-error", "cutoff", "knn-k", "rounds-k")
GAMMA_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
CUTOFFS = (2.0, 2.5, 3.0, 3.5, 4.0)


def test_auroc(case: Case, final_factory, kept: np.ndarray | None = None) -> float:
    """Test AUROC of the final detector fitted on the kept training samples (all when None)."""
    train = case.x_train if kept is None else case.x_train[kept]
    score = -final_factory().fit(train).score_samples(case.x_test)
    return detection_metrics(case.y_test, score, score > np.median(score)).auroc


def refined(case: Case, refine_factory, final_factory, **options):
    """The last refinement round and the test AUROC of the final detector on what it kept."""
    defaults = FitConfig()
    options = {"ensemble": defaults.ensemble, "rounds": defaults.rounds, "seed": case.setting.seed, **options}
    last = list(iter_refine(case.x_train, refine_factory, **options))[-1]
    return last, test_auroc(case, final_factory, last.kept)


def detector(name: str, **params):
    return partial(make_detector, name, **params)


def final_detector(case: Case):
    return detector(FitConfig().for_data(case.kind).detector)


def group_key(case: Case) -> tuple[str, float]:
    """Fashion-MNIST cases group by kind and share; the tables (each with its own share) form one group."""
    s = case.setting
    return (s.kind, s.ratio) if s.part == "fmnist" else (s.kind, -1.0)


def upper_mixture_weight(scores: np.ndarray) -> float:
    """Share of ``scores`` assigned to the upper component of a two-Gaussian mixture."""
    mixture = GaussianMixture(2, n_init=3, random_state=0).fit(scores.reshape(-1, 1))
    return float(np.mean(mixture.predict(scores.reshape(-1, 1)) == np.argmax(mixture.means_[:, 0])))


def study_variants(study: str, case: Case) -> dict[str, object]:
    """The variants a study compares on one case: name -> (AUROC, extra figure or None)."""
    final = final_detector(case)
    default = detector(FitConfig().for_data(case.kind).refine_detector)
    true_share = float(np.mean(case.y_train == 1))
    if study == "refine-detector":
        names = {"gde": detector("gde"), "knn": detector("knn"), "mcd (5 components)": detector("mcd"),
                 "mcd (10 components)": detector("mcd", n_components=10)}
        if case.kind == "table":
            names = {"knn": detector("knn"), "mcd (5 components)": detector("mcd")}
        return {name: refined(case, factory, final)[1] for name, factory in names.items()}
    if study == "subsets":
        return {f"subsets of {source}": refined(case, default, final, subsets_from=source)[1] for source in ("kept", "all")}
    if study == "gamma-error":
        return {f"gamma = true x {factor}": refined(case, default, final, gamma=float(np.clip(true_share * factor, 0.01, 0.5)))[1]
                for factor in GAMMA_FACTORS}
    if study == "cutoff":
        last, _ = refined(case, default, final)
        scores = last.anomaly_score[np.isfinite(last.anomaly_score)]
        found = {f"cutoff {cutoff}": estimate_contamination(scores, cutoff) / true_share for cutoff in CUTOFFS}
        return {**found, "mixture": upper_mixture_weight(scores) / true_share}
    if study == "knn-k":
        return {f"k = {k}": refined(case, detector("knn", n_neighbors=k), detector("knn", n_neighbors=k))[1]
                for k in (5, 10, 20, 50)}
    if study == "rounds-k":
        return {**{f"rounds = {r}": refined(case, default, final, rounds=r)[1] for r in (1, 3, 5)},
                **{f"K = {k}": refined(case, default, final, ensemble=k)[1] for k in (3, 10)}}
    raise ValueError(study)


def run_study(report: Report, study: str, cases: list[Case]) -> None:
    """One table per part: the study's variants on every group of dev cases."""
    results: dict[str, dict[tuple, list[dict]]] = {}
    for case in cases:
        if study == "knn-k" and case.kind != "table":
            continue
        variants = study_variants(study, case)
        if study != "cutoff":
            variants = {"unrefined": test_auroc(case, final_detector(case)),
                        "oracle": test_auroc(case, final_detector(case), case.y_train == 0), **variants}
        results.setdefault(case.setting.part, {}).setdefault(group_key(case), []).append(variants)
        progress(f"{study} {case.setting.part} {case.setting.name} {case.setting.kind} {case.setting.ratio:.2f}: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in variants.items()))
    summary = np.median if study == "cutoff" else np.mean
    what = "median estimate / true share" if study == "cutoff" else "mean test AUROC"
    for part, groups in results.items():
        names = list(next(iter(groups.values()))[0])
        rows = [[kind, "as given" if share < 0 else f"{share:.0%}", len(found),
                 *(float(summary([f[name] for f in found])) for name in names)]
                for (kind, share), found in sorted(groups.items())]
        report.table(["kind", "share", "cases", *names], rows, title=f"{study}, {part}: {what} (dev half)")


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--study", nargs="+", choices=STUDIES, default=list(STUDIES))
    add_case_arguments(parser)
    args = parser.parse_args(argv)
    args.classes = [c for c in args.classes if c in DEV_CLASSES]
    args.halves, args.skipped = ["dev"], []
    if args.quick:
        args.classes, args.ratios, args.tables = [0], [0.1], ["4_breastw"]
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    report = Report(args.out)
    machine_header(report, "Explorations behind refinement's defaults (dev half only)")
    report.line(f"- dev half: Fashion-MNIST classes {args.classes} at {args.image_size} px, shares {args.ratios}; "
                f"ADBench sets at even positions (max {args.max_rows} rows); seeds {args.seeds}")
    report.line("- every variant: core.refine.iter_refine with FitConfig's defaults except the one studied, then the "
                "final detector (gde for images, knn for tables) on the kept samples; test AUROC")
    report.line()
    with timed() as total:
        cases = [*fashion_mnist_cases(args, FitConfig(image_size=args.image_size)), *table_cases(args)]
        for study in args.study:
            run_study(report, study, cases)
    for line in args.skipped:
        report.line(f"- skipped {line}")
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
