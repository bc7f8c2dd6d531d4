"""Tables: a random categorical column must not drive the scores (issue 15, "Categorical columns").

Protocol: every ADBench classical ``.npz`` (``../shared/data/adbench_classical``), subsampled to
``--max-rows`` and split 70/30 as in ``bench/tables.py``; the default refined pipeline
(``core.engine.refine_and_fit`` with ``FitConfig()`` for tables) is fitted on the training part
twice: on the table as it is, and with one added column ``site`` holding 3 values drawn uniformly
at random (seeded). Reported per weighting of the one-hot block (``TableEncoder(category_spread=)``):
the change in test AUROC, and the training rows flagged at the run's threshold that change (the
symmetric difference, as a share of training rows).

Weightings: ``onehot`` (plain 0/1 columns, the encoder before issue 15), ``balanced`` (the column
adds as much squared distance between two random rows as a normal numeric column: the default),
``quarter`` (a quarter of that). Defaults are chosen on the dev half only (bench/README.md); the
report half is reported beside it.

Run: ``python bench/categorical.py --out bench/results/categorical.txt`` (about 10 minutes on 2 cores).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from bench.common import (
    SHARED_DATA,
    Report,
    adbench_half,
    base_parser,
    machine_footer,
    machine_header,
    mean,
    progress,
    setup_logging,
    timed,
)
from bench.tables import split_indices
from core.config import FitConfig
from core.data import TABLE, load_table, table_dataset
from core.engine import refine_and_fit
from core.metrics import detection_metrics
from core.models.tabular import NUMERIC_SPREAD, TableEncoder

DATA_DIR = SHARED_DATA / "adbench_classical"
WEIGHTINGS = {"onehot": None, "balanced": NUMERIC_SPREAD, "quarter": NUMERIC_SPREAD / 4}
TARGET_AUROC_CHANGE = 0.01


def with_random_site(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``frame`` plus a column ``site`` of 3 values drawn uniformly at random."""
    sites = np.random.default_rng(seed + 1000).choice(["north", "south", "east"], len(frame))
    return frame.assign(site=sites)


def fit_once(train: pd.DataFrame, test: pd.DataFrame, test_labels: np.ndarray, spread: float | None,
             seed: int) -> tuple[float, np.ndarray]:
    """(test AUROC, training rows flagged) of the default pipeline on ``train``."""
    encoder = TableEncoder(category_spread=spread).fit(table_dataset(train, "train"))
    x_train, x_test = encoder.embed(table_dataset(train, "train")), encoder.embed(table_dataset(test, "test"))
    model = refine_and_fit(x_train, FitConfig(seed=seed).validate().for_data(TABLE))
    score = -model.detector.score_samples(x_test).astype(np.float64)
    metrics = detection_metrics(test_labels, score, score > model.threshold)
    flagged = -model.detector.score_samples(x_train) > model.threshold
    return metrics.auroc, flagged


def run_set(path: Path, seed: int, max_rows: int) -> dict[str, tuple[float, float]]:
    """For each weighting: (AUROC with the random column - without, share of training rows whose flag changed)."""
    dataset = load_table(path)
    train_idx, test_idx = split_indices(dataset.labels, max_rows, seed)
    train, test = dataset.table.iloc[train_idx].reset_index(drop=True), dataset.table.iloc[test_idx].reset_index(drop=True)
    labels = dataset.labels[test_idx]
    plain_auroc, plain_flags = fit_once(train, test, labels, NUMERIC_SPREAD, seed)  # no category: weighting moot
    out = {}
    for name, spread in WEIGHTINGS.items():
        auroc, flags = fit_once(with_random_site(train, seed), with_random_site(test, seed + 1), labels, spread, seed)
        out[name] = (auroc - plain_auroc, float(np.mean(flags != plain_flags)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--max-rows", type=int, default=5_000, help="subsample larger sets to this many rows")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    files = sorted(DATA_DIR.glob("*.npz"), key=lambda p: int(p.name.split("_")[0]))
    if args.quick:
        files = files[:6]
    if not files:
        raise SystemExit(f"no .npz table found in {DATA_DIR}")

    report = Report(args.out)
    machine_header(report, "Tables: a random 3-valued categorical column")
    report.line(f"- {len(files)} ADBench sets from {DATA_DIR}; subsampled to {args.max_rows} rows; 70/30 split as in "
                f"bench/tables.py; seeds {args.seeds}; default pipeline (FitConfig() for tables)")
    report.line("- each cell: mean over sets of (test AUROC with the random column `site` - without it); "
                "mean share of training rows whose is_anomaly flag changed")
    report.line()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    skipped = []
    with timed() as total:
        for path in files:
            for seed in args.seeds:
                try:
                    with timed() as watch:
                        outcome = run_set(path, seed, args.max_rows)
                except ValueError as error:  # too few anomalies to stratify a subsample
                    skipped.append(f"{path.stem}: {error}")
                    break
                results.setdefault(path.stem, {}).update({seed: outcome})
                progress(f"{path.stem} seed {seed} ({watch.seconds:.0f} s): " + "  ".join(
                    f"{name} {d:+.4f} / {f:.3f}" for name, (d, f) in outcome.items()))

    rows = []
    for half in ("dev", "report", "all"):
        stems = [s for s in results if half == "all" or adbench_half(DATA_DIR / f"{s}.npz") == half]
        cells = []
        for name in WEIGHTINGS:
            changes = [mean([results[s][seed][name][0] for seed in results[s]]) for s in stems]
            flips = [mean([results[s][seed][name][1] for seed in results[s]]) for s in stems]
            cells.append(f"{mean(changes):+.4f} (largest {max(changes, key=abs):+.3f}); {mean(flips):.3f}")
        rows.append([half, len(stems), *cells])
    report.table(["half", "sets", *WEIGHTINGS], rows,
                 title="Mean AUROC change (largest single-set change); share of training rows flagged differently")
    for name in WEIGHTINGS:
        change = mean([mean([results[s][seed][name][0] for seed in results[s]]) for s in results])
        verdict = "MET" if abs(change) < TARGET_AUROC_CHANGE else "NOT met"
        report.line(f"- `{name}`: mean AUROC change over all sets {change:+.4f}; target |change| < "
                    f"{TARGET_AUROC_CHANGE}: {verdict}")
    for line in skipped:
        report.line(f"- skipped {line}")
    report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
