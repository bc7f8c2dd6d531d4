"""Tables, ADBench protocol: the default refined pipeline against peers on 26 classical sets.

Protocol (issue 2, "Benchmarks" 1): every ``.npz`` of ``../shared/data/adbench_classical`` loaded with
``core.data.load_table``; sets over ``--max-rows`` rows are first subsampled to that many (stratified,
seeded); then a stratified 70/30 split whose training part keeps its anomalies (unlabelled,
contaminated training). ``TableEncoder`` is fitted on the training part. Every method is
``core.engine.refine_and_fit`` with a ``FitConfig`` (the defaults, changing only what the method
names) and is scored on the 30% test part with ``-detector.score_samples``.

Methods: ``default`` (FitConfig defaults), ``unrefined`` (same, refine=False), ``iforest``, ``ecod``,
``ocsvm`` (each refine=False), ``oracle`` (the default detector fitted on the training normals only,
chosen with the labels: an upper bound, not a competitor). Extra candidates with ``--methods``:
``DETECTOR:MODE[:FIELD=VALUE...]``, MODE one of refined / unrefined / oracle and FIELD any FitConfig
field, e.g. ``knn:refined`` or ``gde:refined:rounds=3:ensemble=10``.

Run: ``python bench/tables.py`` (3 seeds, about 10-20 minutes on 2 cores) or ``--quick``.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from sklearn.model_selection import train_test_split

from bench.common import (
    SHARED_DATA,
    Outcome,
    Report,
    adbench_half,
    base_parser,
    fit_and_score,
    machine_footer,
    machine_header,
    mean,
    progress,
    setup_logging,
    timed,
)
from core.config import FIT_PARAMS, FitConfig
from core.data import TABLE, load_table
from core.models.tabular import TableEncoder
from core.params import parse

DATA_DIR = SHARED_DATA / "adbench_classical"
BUILT_IN = ("default", "unrefined", "iforest", "ecod", "ocsvm", "oracle")
QUICK_SETS = ("14_glass", "18_Ionosphere", "4_breastw", "38_thyroid", "27_PageBlocks", "32_shuttle")
TARGET_GAIN = 0.02


@dataclass(frozen=True)
class Method:
    """A named FitConfig change; ``oracle`` fits on the labelled training normals only."""

    name: str
    changes: dict = field(default_factory=dict)
    oracle: bool = False

    def config(self, seed: int) -> FitConfig:
        return FitConfig(seed=seed).with_changes(**self.changes)

    @property
    def refined(self) -> bool:
        return self.config(0).refine and self.config(0).rounds > 0 and not self.oracle


def built_in_method(name: str) -> Method:
    if name == "default":
        return Method(name)
    if name == "unrefined":
        return Method(name, {"refine": False})
    if name == "oracle":
        return Method(name, {"refine": False}, oracle=True)
    return Method(name, {"detector": name, "refine": False})


def parse_method(spec: str) -> Method:
    """``DETECTOR:MODE[:FIELD=VALUE...]`` -> Method (see the module docstring)."""
    if spec in BUILT_IN:
        return built_in_method(spec)
    parts = spec.split(":")
    if len(parts) < 2 or parts[1] not in ("refined", "unrefined", "oracle"):
        raise SystemExit(f"--methods {spec!r}: write DETECTOR:MODE[:FIELD=VALUE...], "
                         "MODE one of refined, unrefined, oracle (or a built-in: " + ", ".join(BUILT_IN) + ")")
    changes: dict = {"detector": parts[0], "refine": parts[1] == "refined"}
    defaults = {f.name: f.default for f in fields(FitConfig)}
    for item in parts[2:]:
        key, _, text = item.partition("=")
        if key not in defaults or not text:
            raise SystemExit(f"--methods {spec!r}: {item!r} is not FIELD=VALUE with a FitConfig field "
                             f"({', '.join(defaults)})")
        changes[key] = _parse_value(key, text, defaults[key])
    method = Method(spec, changes, oracle=parts[1] == "oracle")
    method.config(0)  # validate now, not after an hour
    return method


def _parse_value(key: str, text: str, default: object) -> object:
    """A ``FIELD=VALUE`` value typed in ``--methods``: booleans as 1/true/yes, lists joined by ``+``,
    everything else read by the field's declared constraints (:func:`core.params.parse`)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        return tuple(text.split("+"))
    return parse(key, text, FIT_PARAMS[key].constraints)


def split_indices(labels: np.ndarray, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded subsample to ``max_rows``, then a stratified 70/30 train/test split."""
    rows = np.arange(len(labels))
    if len(rows) > max_rows:
        rows, _ = train_test_split(rows, train_size=max_rows, stratify=labels, random_state=seed)
    train, test = train_test_split(rows, test_size=0.3, stratify=labels[rows], random_state=seed)
    return np.sort(train), np.sort(test)


def run_dataset(path: Path, methods: list[Method], seeds: list[int], max_rows: int) -> dict:
    """Outcomes[method][seed] for one table, plus the training contamination per seed."""
    dataset = load_table(path)
    if dataset.labels is None:
        raise SystemExit(f"{path.name} has no labels")
    outcomes: dict[str, dict[int, Outcome]] = {m.name: {} for m in methods}
    truth: dict[int, float] = {}
    n_train = 0
    for seed in seeds:
        train_idx, test_idx = split_indices(dataset.labels, max_rows, seed)
        train, test = dataset.subset(train_idx), dataset.subset(test_idx)
        encoder = TableEncoder().fit(train.without_labels())
        x_train, x_test = encoder.embed(train), encoder.embed(test)
        y_train = train.labels
        truth[seed] = float(np.mean(y_train == 1))
        n_train = len(train_idx)
        for method in methods:
            features = x_train[y_train == 0] if method.oracle else x_train
            outcomes[method.name][seed] = fit_and_score(
                features, x_test, test.labels, method.config(seed), TABLE,
                train_labels=None if method.oracle else y_train,
            )
    return {"outcomes": outcomes, "truth": truth, "n_train": n_train, "n_features": x_train.shape[1]}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0, 1, 2))
    parser.add_argument("--methods", nargs="*", default=[],
                        help="extra methods DETECTOR:MODE[:FIELD=VALUE...], e.g. knn:refined")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="only sets whose file name contains one of these strings")
    parser.add_argument("--max-rows", type=int, default=10_000, help="subsample larger sets to this many rows")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    files = sorted(DATA_DIR.glob("*.npz"), key=lambda p: int(p.name.split("_")[0]))
    wanted = args.datasets or (QUICK_SETS if args.quick else None)
    if wanted:
        files = [f for f in files if any(w in f.name for w in wanted)]
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = [built_in_method(name) for name in BUILT_IN] + [parse_method(s) for s in args.methods]
    if not files:
        raise SystemExit(f"no .npz table found in {DATA_DIR}")

    report = Report(args.out)
    machine_header(report, "Tables: ADBench classical protocol")
    report.line(f"- {len(files)} sets from {DATA_DIR}; subsample to {args.max_rows} rows (stratified) where larger; "
                f"stratified 70/30 split, training keeps its anomalies; seeds {seeds}")
    report.line("- every method: core.engine.refine_and_fit(train, FitConfig(...)); test anomaly_score = "
                "-detector.score_samples(test). Methods and their FitConfig changes:")
    for method in methods:
        note = " + trained on labelled training normals only (UPPER BOUND, uses labels)" if method.oracle else ""
        report.line(f"  - `{method.name}`: {method.changes or 'FitConfig defaults'}{note}")
    report.line(f"- FitConfig defaults: {FitConfig()}; for tables detector resolves to "
                f"`{FitConfig().for_data(TABLE).detector}`")
    report.line()

    results, skipped = {}, []
    with timed() as total:
        for path in files:
            with timed() as watch:
                try:
                    results[path.stem] = run_dataset(path, methods, seeds, args.max_rows)
                except ValueError as error:  # too few anomalies in a subsample of max_rows to stratify
                    skipped.append(f"{path.stem}: {error}")
                    progress(f"{path.stem} skipped: {error}")
                    continue
            progress(f"{path.stem}: {watch.seconds:.1f}s  " + " ".join(
                f"{m.name}={mean([o.auroc for o in results[path.stem]['outcomes'][m.name].values()]):.3f}"
                for m in methods))

    names = [m.name for m in methods]
    for metric in ("auroc", "ap"):
        rows = []
        for stem, result in results.items():
            per = [mean([getattr(o, metric) for o in result["outcomes"][n].values()]) for n in names]
            rows.append([stem, result["n_train"], result["n_features"], mean(list(result["truth"].values())), *per])
        column_means = [mean([row[4 + j] for row in rows]) for j in range(len(names))]
        rows.append(["MEAN", "", "", mean([row[3] for row in rows]), *column_means])
        report.table(["dataset", "n_train", "dims", "train anomaly share", *names], rows,
                     title=f"Test {metric.upper()} (mean over seeds {seeds}); "
                           "`oracle` is an upper bound that uses labels")

    per_seed_rows = []
    for seed in seeds:
        per_seed_rows.append([seed, *[mean([r["outcomes"][n][seed].auroc for r in results.values()]) for n in names]])
    report.table(["seed", *names], per_seed_rows, title="Mean AUROC over sets, per seed")

    default_minus = [
        [r["outcomes"]["default"][s].auroc - r["outcomes"]["iforest"][s].auroc for s in seeds] for r in results.values()
    ]
    gain = float(np.mean(default_minus))
    per_seed_gain = [float(np.mean([d[i] for d in default_minus])) for i in range(len(seeds))]
    wins = sum(np.mean(d) > 0 for d in default_minus)
    report.line(f"**default - iforest mean AUROC: {gain:+.4f}** (per seed: "
                + ", ".join(f"{g:+.4f}" for g in per_seed_gain)
                + f"; default better on {wins}/{len(default_minus)} sets). "
                + f"Target >= +{TARGET_GAIN:.2f}: {'MET' if gain >= TARGET_GAIN else 'NOT met'}.")
    report.line()
    half_rows = []
    for half in ("report", "dev", "all"):
        chosen = [stem for stem in results if half == "all" or adbench_half(DATA_DIR / f"{stem}.npz") == half]
        gains = [float(np.mean([default_minus[list(results).index(stem)][i] for stem in chosen])) for i in range(len(seeds))]
        half_rows.append([half, len(chosen), *[mean([mean([o.auroc for o in results[stem]["outcomes"][n].values()])
                                                     for stem in chosen]) for n in ("default", "unrefined", "iforest", "oracle")],
                          float(np.mean(gains)), ", ".join(f"{g:+.3f}" for g in gains)])
    report.table(["half", "sets", "default", "unrefined", "iforest", "oracle", "default - iforest", "per seed"], half_rows,
                 title="Mean AUROC by half (bench/README.md: defaults are chosen on the dev half only)")
    for line in skipped:
        report.line(f"- skipped {line}")

    refined = [m for m in methods if m.refined]
    for method in refined[:1]:
        rows = []
        for stem, result in results.items():
            outs = list(result["outcomes"][method.name].values())
            rows.append([stem, mean(list(result["truth"].values())), mean([o.contamination for o in outs]),
                         mean([o.removal_precision for o in outs]), mean([o.removal_recall for o in outs]),
                         mean([o.kept_share for o in outs]), mean([o.n_rounds for o in outs])])
        rows.append(["MEAN", *[mean([row[j] for row in rows]) for j in range(1, 7)]])
        report.table(["dataset", "true contamination", "estimated", "removal precision", "removal recall",
                      "kept share", "rounds"], rows,
                     title=f"Refinement of `{method.name}` on the training part (mean over seeds; "
                           "precision '-' = nothing removed)")

    summary = []
    for method in methods:
        outs = [o for r in results.values() for o in r["outcomes"][method.name].values()]
        summary.append([method.name, mean([o.auroc for o in outs]), mean([o.ap for o in outs]),
                        mean([o.f1 for o in outs]),
                        mean([o.removal_precision for o in outs]) if method.refined else None,
                        mean([o.removal_recall for o in outs]) if method.refined else None,
                        mean([o.contamination for o in outs]), sum(o.fit_seconds for o in outs)])
    report.table(["method", "AUROC", "AP", "F1 at threshold", "removal precision", "removal recall",
                  "estimated contamination", "fit seconds (all)"], summary,
                 title="Summary over all sets and seeds (true mean training contamination "
                       f"{mean([t for r in results.values() for t in r['truth'].values()]):.3f})")
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
