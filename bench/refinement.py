"""Refinement: how much of contamination's cost refinement wins back, and whether its decision holds.

For every setting, three fits on the same embeddings, each exactly ``core.engine.refine_and_fit``:
``refined`` (FitConfig defaults), ``unrefined`` (``refine=False``) and ``oracle`` (``refine=False`` on
the training normals only: an upper bound that uses labels). Reported per setting:

- test AUROC of the three and the closure ``(refined - unrefined) / (oracle - unrefined)`` (``-`` when
  the oracle is within 0.005 of the unrefined fit: there is no gap to close);
- the contamination the refined run estimated (with its interval) against the true training share;
- the share of test normals and of test anomalies that the refined run's ``is_anomaly`` flags, beside
  the false-alarm rate the run states.

Parts (``--part``):

- ``fmnist``: Fashion-MNIST at 64 px (Debian's ``dataset-fashion-mnist``). Class ``c`` is normal:
  ``--n-normal`` training images of it, plus anomalies making up 2, 5, 10, 20 or 40% of training:
  ``diffuse`` (drawn from all other classes, as in SRR) or ``clustered`` (all from class ``(c + 1) % 10``,
  a recurring defect). Test: every class-``c`` test image against the test images of the anomaly
  classes (the clustered class only, or a stratified sample of the others of the same size).
- ``tables``: ADBench classical (``../shared/data``), the split of ``bench/tables.py`` (subsample to
  ``--max-rows``, stratified 70/30, the training part keeps its anomalies).
- ``bottle``: MVTec bottle at 224 px, SoftPatch protocol (``core.data.softpatch_protocol``: seeded test
  defects moved into train/good at 5, 10 and 20%); one category, so all of it is dev data.

Dev/report split (bench/README.md): defaults may be chosen on the dev half only (Fashion-MNIST classes
0-4; ADBench sets at even positions of the sorted file names); every summary is given for the report
half, the dev half and all.

Run: ``python bench/refinement.py --out bench/results/refinement.txt`` (about 15 minutes on 2 cores the
first time, mostly embedding; the embeddings are cached under bench/.cache) or ``--quick``.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    SHARED_DATA,
    ImageEmbeddingCache,
    adbench_half,
    Report,
    base_parser,
    machine_footer,
    machine_header,
    materialized_images,
    mean,
    progress,
    setup_logging,
    timed,
)
from bench.tables import split_indices
from core.config import FitConfig
from core.data import IMAGES, TABLE, load_fashion_mnist, load_image_folder, load_table, softpatch_protocol
from core.engine import refine_and_fit
from core.metrics import detection_metrics
from core.models.tabular import TableEncoder

RATIOS = (0.02, 0.05, 0.10, 0.20, 0.40)
KINDS = ("diffuse", "clustered")
DEV_CLASSES = frozenset(range(5))
TABLES_DIR = SHARED_DATA / "adbench_classical"
NO_GAP = 0.005


@dataclass(frozen=True)
class Setting:
    """One benchmark case: which data, which half, how contaminated."""

    part: str
    name: str
    half: str
    kind: str
    ratio: float
    seed: int


@dataclass(frozen=True)
class Case:
    """A setting with its embedded data; labels only feed the measurements."""

    setting: Setting
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    kind: str


@dataclass(frozen=True)
class Row:
    """The three fits of one setting."""

    setting: Setting
    refined: float
    unrefined: float
    oracle: float
    true_share: float
    estimate: float
    interval: tuple[float, float] | None
    false_alarm_rate: float
    flagged_normals: float
    flagged_anomalies: float
    rounds: int

    @property
    def closure(self) -> float | None:
        gap = self.oracle - self.unrefined
        return None if gap < NO_GAP else (self.refined - self.unrefined) / gap


def evaluate(case: Case, config: FitConfig) -> Row:
    """Refined, unrefined and oracle fits of one case."""
    setting, x_train, y_train, x_test, y_test = case.setting, case.x_train, case.y_train, case.x_test, case.y_test
    config = config.with_changes(seed=setting.seed).for_data(case.kind)

    def auroc(model) -> tuple[float, np.ndarray]:
        score = -model.detector.score_samples(x_test).astype(np.float64)
        flagged = score > model.threshold
        return detection_metrics(y_test, score, flagged).auroc, flagged

    refined = refine_and_fit(x_train, config)
    refined_auroc, flagged = auroc(refined)
    unrefined_auroc, _ = auroc(refine_and_fit(x_train, config.with_changes(refine=False)))
    oracle_auroc, _ = auroc(refine_and_fit(x_train[y_train == 0], config.with_changes(refine=False)))
    return Row(
        setting=setting, refined=refined_auroc, unrefined=unrefined_auroc, oracle=oracle_auroc,
        true_share=float(np.mean(y_train == 1)), estimate=refined.contamination,
        interval=refined.contamination_interval, false_alarm_rate=config.false_alarm_rate,
        flagged_normals=float(np.mean(flagged[y_test == 0])), flagged_anomalies=float(np.mean(flagged[y_test == 1])),
        rounds=len(refined.rounds),
    )


# ----------------------------------------------------------------------------- Fashion-MNIST

def contaminated_indices(classes: np.ndarray, normals: np.ndarray, ratio: float, kind: str,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training indices (``normals`` + anomalies making up ``ratio``, shuffled) and their labels."""
    normal = int(classes[normals[0]])
    n_normal = len(normals)
    n_anomalous = int(round(n_normal * ratio / (1 - ratio)))
    source = classes == anomaly_class(normal) if kind == "clustered" else classes != normal
    anomalies = rng.choice(np.flatnonzero(source), n_anomalous, replace=False)
    indices = np.concatenate([normals, anomalies])
    labels = np.r_[np.zeros(len(normals), np.int8), np.ones(len(anomalies), np.int8)]
    order = rng.permutation(len(indices))
    return indices[order], labels[order]


def anomaly_class(normal: int) -> int:
    """The one class that makes up a clustered contamination of class ``normal``."""
    return (normal + 1) % 10


def test_indices(classes: np.ndarray, normal: int, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every test image of class ``normal`` against as many anomalies of the setting's kind."""
    normals = np.flatnonzero(classes == normal)
    if kind == "clustered":
        anomalies = np.flatnonzero(classes == anomaly_class(normal))
    else:
        others = [c for c in range(10) if c != normal]
        per_class = len(normals) // len(others)
        anomalies = np.concatenate([rng.choice(np.flatnonzero(classes == c), per_class, replace=False) for c in others])
    indices = np.concatenate([normals, anomalies])
    return indices, np.r_[np.zeros(len(normals), np.int8), np.ones(len(anomalies), np.int8)]


def fashion_mnist_cases(args, config: FitConfig) -> Iterator[Case]:
    """Every Fashion-MNIST setting of ``args`` with its embedded training and test images."""
    pool_images, pool_classes = load_fashion_mnist("train")
    test_images, test_classes = load_fashion_mnist("test")
    pool = materialized_images(pool_images, "fashion-mnist-train")
    test = materialized_images(test_images, "fashion-mnist-test")
    cache = ImageEmbeddingCache()
    for normal in args.classes:
        for seed in args.seeds:
            # The same normal images in every kind and share of contamination: only the anomalies differ.
            normals = np.random.default_rng([seed, normal]).choice(np.flatnonzero(pool_classes == normal),
                                                                  args.n_normal, replace=False)
            for kind in KINDS:
                for ratio in args.ratios:
                    rng = np.random.default_rng([seed, normal, KINDS.index(kind), int(ratio * 1000)])
                    train_idx, y_train = contaminated_indices(pool_classes, normals, ratio, kind, rng)
                    test_idx, y_test = test_indices(test_classes, normal, kind, rng)
                    setting = Setting("fmnist", f"class {normal}", "dev" if normal in DEV_CLASSES else "report",
                                      kind, ratio, seed)
                    yield Case(setting, cache.embed(pool, train_idx, config), y_train,
                               cache.embed(test, test_idx, config), y_test, IMAGES)


# ----------------------------------------------------------------------------- tables

def table_cases(args) -> Iterator[Case]:
    """Every ADBench set and seed of ``args``, split and encoded as ``bench/tables.py`` does."""
    paths = sorted(TABLES_DIR.glob("*.npz"))
    if not paths:
        raise SystemExit(f"no ADBench tables in {TABLES_DIR} (set REFINERY_SHARED_DATA)")
    for path in paths:
        half = adbench_half(path)
        if (args.tables and path.stem not in args.tables) or (args.halves and half not in args.halves):
            continue
        dataset = load_table(path)
        for seed in args.seeds:
            try:
                train_idx, test_idx = split_indices(dataset.labels, args.max_rows, seed)
            except ValueError as error:  # too few anomalies left in a subsample of max_rows to stratify
                progress(f"tables {path.stem} seed {seed} skipped: {error}")
                args.skipped.append(f"{path.stem} (seed {seed}): {error}")
                continue
            train, test = dataset.subset(train_idx), dataset.subset(test_idx)
            encoder = TableEncoder().fit(train.without_labels())
            setting = Setting("tables", path.stem, half, "as given", float(np.mean(train.labels == 1)), seed)
            yield Case(setting, encoder.embed(train), train.labels, encoder.embed(test), test.labels, TABLE)


# ----------------------------------------------------------------------------- MVTec bottle

def bottle_rows(args) -> list[Row]:
    folder = SHARED_DATA / "mvtec_ad_bottle_256" / "bottle"
    if not folder.is_dir():
        raise SystemExit(f"no MVTec bottle in {folder} (set REFINERY_SHARED_DATA)")
    dataset = load_image_folder(folder)
    config = FitConfig()  # 224 px, as refinery fit
    embeddings = ImageEmbeddingCache().embed(dataset, np.arange(len(dataset)), config)
    rows = []
    for ratio in args.bottle_ratios:
        for seed in args.seeds:
            split = softpatch_protocol(dataset, ratio, seed)
            setting = Setting("bottle", "bottle", "dev", "moved test defects", ratio, seed)
            rows.append(evaluate(Case(setting, embeddings[split.train_indices], split.train.labels,
                                      embeddings[split.test_indices], split.test.labels, IMAGES), config))
            progress(describe(rows[-1]))
    return rows


# ----------------------------------------------------------------------------- report

def describe(row: Row) -> str:
    s = row.setting
    closure = "-" if row.closure is None else f"{row.closure:.0%}"
    return (f"{s.part} {s.name} {s.kind} {s.ratio:.0%} seed {s.seed}: refined {row.refined:.3f} unrefined "
            f"{row.unrefined:.3f} oracle {row.oracle:.3f} closure {closure}; contamination {row.estimate:.3f} "
            f"(true {row.true_share:.3f}); flags {row.flagged_normals:.3f} of normals, "
            f"{row.flagged_anomalies:.3f} of anomalies")


def summary(rows: list[Row]) -> list[object]:
    """Means over ``rows``: AUROCs, closure of the means, estimate ratio, flagged shares."""
    refined, unrefined, oracle = (mean([getattr(r, f) for r in rows]) for f in ("refined", "unrefined", "oracle"))
    gap = oracle - unrefined
    closure = None if gap < NO_GAP else (refined - unrefined) / gap
    ratios = [r.estimate / r.true_share for r in rows if r.true_share > 0]
    within = np.mean([1 / 1.5 <= q <= 1.5 for q in ratios]) if ratios else None
    return [len(rows), refined, unrefined, oracle, closure, mean([r.true_share for r in rows]),
            mean([r.estimate for r in rows]), float(np.median(ratios)) if ratios else None, within,
            mean([r.flagged_normals for r in rows]), mean([r.flagged_anomalies for r in rows])]


SUMMARY_HEADERS = ["settings", "refined", "unrefined", "oracle", "closure (of means)", "true share",
                   "estimate", "median estimate/true", "share within x1.5", "flags normals", "flags anomalies"]


def write_report(report: Report, rows: list[Row]) -> None:
    for part in sorted({r.setting.part for r in rows}):
        mine = [r for r in rows if r.setting.part == part]
        by_share = part != "tables"  # tables come with their own contamination
        groups = sorted({(r.setting.kind, r.setting.ratio) for r in mine}) if by_share else [None]
        table = []
        for group in groups:
            chosen = mine if group is None else [r for r in mine if (r.setting.kind, r.setting.ratio) == group]
            for half in ("report", "dev", "all"):
                subset = [r for r in chosen if half == "all" or r.setting.half == half]
                if subset:
                    label = [] if group is None else [group[0], f"{group[1]:.0%}"]
                    table.append([*label, half, *summary(subset)])
        headers = (["contamination", "share"] if by_share else []) + ["half", *SUMMARY_HEADERS]
        report.table(headers, table, title=f"{part}: means (the runs state a false-alarm rate of "
                                           f"{mine[0].false_alarm_rate:.2f})")
        report.table(
            ["name", "half", "kind", "share", "seed", "refined", "unrefined", "oracle", "closure", "estimate",
             "interval", "rounds", "flags normals", "flags anomalies"],
            [[r.setting.name, r.setting.half, r.setting.kind, r.true_share, r.setting.seed, r.refined, r.unrefined,
              r.oracle, r.closure, r.estimate, "-" if r.interval is None else f"{r.interval[0]:.3f}-{r.interval[1]:.3f}",
              r.rounds, r.flagged_normals, r.flagged_anomalies] for r in mine],
            title=f"{part}: every setting",
        )


def add_case_arguments(parser) -> None:
    """The options that choose the Fashion-MNIST and ADBench cases (shared with bench/explore_refinement.py)."""
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="Fashion-MNIST normal classes")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="contamination shares")
    parser.add_argument("--n-normal", type=int, default=500, help="normal training images per Fashion-MNIST setting")
    parser.add_argument("--image-size", type=int, default=64, help="Fashion-MNIST image side (default 64)")
    parser.add_argument("--tables", nargs="*", help="ADBench set names (default: all)")
    parser.add_argument("--halves", nargs="+", choices=("dev", "report"), help="ADBench halves (default: both)")
    parser.add_argument("--max-rows", type=int, default=2000, help="subsample each table to this many rows")


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--part", nargs="+", choices=("fmnist", "tables", "bottle"),
                        default=["fmnist", "tables", "bottle"])
    add_case_arguments(parser)
    parser.add_argument("--bottle-ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                        help="MVTec bottle contamination shares (SoftPatch protocol; 63 test defects cap it near 0.22)")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.ratios, args.tables = [0, 5], [0.1, 0.4], ["4_breastw", "38_thyroid"]
        args.bottle_ratios = [0.1]
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    report = Report(args.out)
    machine_header(report, "Refinement: closure, contamination estimate and the decision")
    config = FitConfig(image_size=args.image_size)
    report.line(f"- fits: core.engine.refine_and_fit with {config}; refined / refine=False / refine=False on the "
                f"training normals (oracle)")
    report.line(f"- seeds {args.seeds}; dev half: Fashion-MNIST classes {sorted(DEV_CLASSES)}, ADBench sets at even "
                f"positions of the sorted names; report half: the rest")
    report.line(f"- Fashion-MNIST: {args.n_normal} normal training images, contamination {args.ratios}, "
                f"kinds {list(KINDS)} (clustered: class (c + 1) % 10); tables: max {args.max_rows} rows")
    report.line()
    rows: list[Row] = []
    args.skipped = []
    with timed() as total:
        cases = []
        if "fmnist" in args.part:
            cases.append(fashion_mnist_cases(args, config))
        if "tables" in args.part:
            cases.append(table_cases(args))
        for case in (case for part in cases for case in part):
            rows.append(evaluate(case, config))
            progress(describe(rows[-1]))
        if "bottle" in args.part:
            rows += bottle_rows(args)
    write_report(report, rows)
    for line in args.skipped:
        report.line(f"- skipped {line}")
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
