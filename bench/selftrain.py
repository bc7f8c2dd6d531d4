"""STOC self-training (issue 5): learned representations with and without refinement + retraining.

Three parts, each comparing, in one run and on one seed set, a self-supervised encoder trained on
all (contaminated) training data without refinement, the same encoder with refinement on its frozen
embeddings, STOC (refinement rounds with retraining on the kept data between them: the encoder keeps
training for ``retrain_epochs`` on the kept samples after every round, and once more after the last)
and a clean oracle (the same objective trained on the labelled training normals only: an upper
bound, not a competitor):

- ``fmnist``: Fashion-MNIST, SRR protocol (``core.data.srr_protocol``, ``--ratio`` 10%) per normal
  class, contrastive learning with distribution augmentation (``objective="contrastive"``), small CNN
  at 32 px; test on a stratified subset of the official test set (normal class = 0, others = 1).
  A gamma sweep (0.5x, 1x, 2x, 3x the true training ratio and ``auto``) runs STOC on one class.
- ``bottle``: MVTec bottle. Clean protocol (train/good, test/*): frozen pretrained features
  (``objective="none"``), CutPaste 3-way / binary / scar from scratch (small CNN), CutPaste
  fine-tuning of the pretrained EfficientNet-Lite0 (``encoder="pretrained-finetune"``); then the
  SoftPatch protocol (``softpatch_protocol``, 10%) for the frozen and fine-tuned encoders with and
  without refinement and STOC. All at ``--bottle-size`` px.
- ``tables``: ADBench sets (the split of bench/tables.py), MLP encoder with ``contrastive`` and
  ``contrastive-imix`` against the scaled columns (``objective="none"``).

How a method is fitted: exactly what ``core.engine.fit`` does after loading (``engine._fit``):
``make_encoder(config, train).fit(train)``, ``embed_training_data()``, then
``core.engine.refine_and_fit(embeddings, config, retrain=...)`` where ``retrain(kept)`` is
``encoder.retrain(kept)`` followed by ``encoder.embed_training_data()``; test data are embedded with
the final encoder (``encoder.embed(test)``) and scored with ``-detector.score_samples``. The first
training stage does not depend on refinement, so it runs once per (data, objective, seed) and the
variants start from copies of that encoder (same weights as separate fits under the same seed).
Labels never reach a fit; they give AUROC / AP and the removal precision / recall.

Run: ``python bench/selftrain.py`` (all parts, about 20 minutes on 2 cores), ``--part fmnist``,
``--quick`` (about 2 minutes).
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (
    SHARED_DATA,
    Outcome,
    Report,
    base_parser,
    machine_footer,
    machine_header,
    mean,
    progress,
    removal_stats,
    setup_logging,
    timed,
)
from core.config import FitConfig
from core.data import FASHION_MNIST_CLASSES, IMAGES, TABLE, load_image_folder, load_table, srr_protocol, softpatch_protocol
from core.engine import refine_and_fit
from core.metrics import detection_metrics
from core.models.encoder import make_encoder

PARTS = ("fmnist", "bottle", "tables")
BOTTLE = SHARED_DATA / "mvtec_ad_bottle_256" / "bottle"
TABLE_SETS = ("14_glass", "18_Ionosphere", "4_breastw", "42_WBC", "38_thyroid")
STOC_TARGET = 0.03
NO_REFINE, REFINE_FROZEN, STOC, CLEAN = ("no refinement", "refine, frozen encoder", "STOC (refine + retrain)",
                                         "clean oracle")


# ----------------------------------------------------------------------------- fitting

@dataclass
class Trained:
    """An encoder after its first training stage on all of ``train``, and its training embeddings."""

    encoder: object
    x_train: np.ndarray
    seconds: float


def train_encoder(train, config: FitConfig) -> Trained:
    """``make_encoder(config, train).fit(train)`` and the training embeddings, as ``engine._fit`` does."""
    unlabeled = train.without_labels()
    with timed() as watch:
        encoder = make_encoder(config, train)
        encoder.fit(unlabeled)
        x_train = encoder.embed_training_data() if config.objective != "none" else encoder.embed(unlabeled)
    return Trained(encoder, x_train, watch.seconds)


def self_training(config: FitConfig) -> bool:
    return config.objective != "none" and config.refine and config.rounds > 0 and config.retrain_epochs > 0


def evaluate(trained: Trained, config: FitConfig, test, y_test: np.ndarray,
             y_train: np.ndarray | None) -> Outcome:
    """Refinement (STOC retraining a copy of the encoder when ``config`` asks for it), detector, test metrics."""
    encoder = trained.encoder
    retrain = None
    if self_training(config):
        encoder = copy.deepcopy(encoder)
        encoder.config = config  # same resolved config except refine / gamma / retrain_epochs

        def retrain_copy(kept: np.ndarray) -> np.ndarray:
            encoder.retrain(kept)
            return encoder.embed_training_data()

        retrain = retrain_copy

    with timed() as watch:
        model = refine_and_fit(trained.x_train, config, labels=y_train, retrain=retrain)
    x_test = encoder.embed(test)
    score = -model.detector.score_samples(x_test).astype(np.float64)
    metrics = detection_metrics(np.asarray(y_test), score, score > model.threshold)
    precision = recall = None
    if y_train is not None and model.rounds:
        precision, recall = removal_stats(model.kept, y_train)
    return Outcome(auroc=metrics.auroc, ap=metrics.ap, f1=metrics.f1, removal_precision=precision,
                   removal_recall=recall, contamination=model.contamination, n_rounds=len(model.rounds),
                   kept_share=float(np.mean(model.kept)), fit_seconds=watch.seconds)


def compare(train, test, y_train, y_test, config: FitConfig, *, clean: Trained | None = None,
            clean_needed: bool = True, extra: dict[str, FitConfig] | None = None) -> tuple[dict, Trained, Trained]:
    """No refinement, refinement on frozen embeddings, STOC (when the objective trains) and the clean oracle.

    ``clean`` reuses an encoder already trained on the training normals; ``extra`` adds named
    variants evaluated from the same first-stage encoder.
    """
    trained = train_encoder(train, config)
    variants = {NO_REFINE: config.with_changes(refine=False), REFINE_FROZEN: config.with_changes(retrain_epochs=0)}
    if config.objective != "none":
        variants[STOC] = config
    variants.update(extra or {})
    out = {name: evaluate(trained, variant, test, y_test, y_train) for name, variant in variants.items()}
    if clean is None and clean_needed:
        clean = train_encoder(train.subset(np.flatnonzero(y_train == 0)), config)
    if clean is not None:
        out[CLEAN] = evaluate(clean, config.with_changes(refine=False), test, y_test, None)
    return out, trained, clean


def outcome_row(name: str, outs: list[Outcome]) -> list:
    return [name, mean([o.auroc for o in outs]), mean([o.ap for o in outs]),
            mean([o.removal_precision for o in outs]), mean([o.removal_recall for o in outs]),
            mean([o.kept_share for o in outs]), mean([o.contamination for o in outs]),
            mean([o.fit_seconds for o in outs])]


OUTCOME_HEADERS = ["method", "AUROC", "AP", "removal precision", "removal recall", "kept share",
                   "contamination used", "refine+fit s"]


# ----------------------------------------------------------------------------- Fashion-MNIST

def part_fmnist(report: Report, args) -> None:
    from bench.fashion_mnist import fashion_mnist_files
    from core.data import load_fashion_mnist

    base = FitConfig(objective="contrastive", encoder=args.fmnist_encoder, image_size=args.fmnist_size,
                     epochs=args.fmnist_epochs, retrain_epochs=args.fmnist_retrain_epochs, rounds=args.rounds,
                     localization="none", device="cpu").for_data(IMAGES)
    pool, pool_classes = fashion_mnist_files("train")
    _, test_classes_all = load_fashion_mnist("test")
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(test_classes_all == c), args.test_size // 10,
                                              replace=False) for c in range(10)]))
    test_all, test_classes = fashion_mnist_files("test", keep)
    report.line("## Fashion-MNIST, SRR protocol")
    report.line()
    report.line(f"- srr_protocol(train pool of {len(pool)}, normal class, anomaly_ratio={args.ratio}, "
                f"n_train_normal={args.n_normal}, seed); test: stratified {len(test_all)} images of the official "
                f"test set (normal class = 0, others = 1); classes {args.classes}; seeds {args.seeds}")
    report.line(f"- encoder: {base.objective} (distribution augmentation), {base.encoder} at {base.image_size} px, "
                f"{base.epochs} epochs on all training data; STOC: {base.rounds} rounds, {base.retrain_epochs} "
                f"retrain epochs after each (and after the last); detector {base.detector}, K={base.ensemble}, "
                f"gamma {base.gamma}")
    report.line()

    results: dict[int, dict[int, dict]] = {}
    first: dict[tuple[int, int], tuple] = {}
    for normal in args.classes:
        results[normal] = {}
        for seed in args.seeds:
            split = srr_protocol(pool, pool_classes, normal, args.ratio, n_train_normal=args.n_normal, seed=seed)
            y_test = (test_classes != normal).astype(np.int8)
            config = base.with_changes(seed=seed)
            with timed() as watch:
                out, trained, _ = compare(split.train, test_all, split.train.labels, y_test, config)
            results[normal][seed] = out
            first[(normal, seed)] = (split, trained, y_test, config)
            progress(f"fmnist class {normal} seed {seed} ({watch.seconds:.0f}s, first stage {trained.seconds:.0f}s): "
                     + " ".join(f"{m}={o.auroc:.3f}" for m, o in out.items()))
    methods = list(next(iter(next(iter(results.values())).values())))

    rows = []
    for normal, per_seed in results.items():
        rows.append([f"{normal} {FASHION_MNIST_CLASSES[normal]}",
                     *[mean([o[m].auroc for o in per_seed.values()]) for m in methods]])
    rows.append(["MEAN", *[mean([row[j] for row in rows]) for j in range(1, len(methods) + 1)]])
    report.table(["normal class", *methods], rows, title=f"Fashion-MNIST test AUROC (mean over seeds {args.seeds})")
    outs = {m: [o[m] for per_seed in results.values() for o in per_seed.values()] for m in methods}
    report.table(OUTCOME_HEADERS, [outcome_row(m, outs[m]) for m in methods],
                 title="Fashion-MNIST, all classes and seeds: metrics and refinement on training")
    gain = mean([o.auroc for o in outs[STOC]]) - mean([o.auroc for o in outs[NO_REFINE]])
    frozen_gain = mean([o.auroc for o in outs[REFINE_FROZEN]]) - mean([o.auroc for o in outs[NO_REFINE]])
    report.line(f"**STOC - no refinement mean AUROC = {gain:+.4f}** (target >= +{STOC_TARGET:.2f}: "
                f"{'MET' if gain >= STOC_TARGET else 'NOT met'}); refinement on frozen embeddings - no "
                f"refinement = {frozen_gain:+.4f}; clean oracle - STOC = "
                f"{mean([o.auroc for o in outs[CLEAN]]) - mean([o.auroc for o in outs[STOC]]):+.4f}")
    report.line()

    if args.gamma_class is not None:
        normal, seed = args.gamma_class, args.seeds[0]
        if (normal, seed) not in first:
            raise SystemExit(f"--gamma-class {normal} must be one of --classes {args.classes}")
        split, trained, y_test, config = first[(normal, seed)]
        truth = float(np.mean(split.train.labels == 1))
        rows = []
        for factor in (0.5, 1.0, 2.0, 3.0, "auto"):
            if factor == "auto":
                outcome = results[normal][seed][STOC]
            else:
                with timed() as watch:
                    outcome = evaluate(trained, config.with_changes(gamma=round(factor * truth, 4)), test_all,
                                       y_test, split.train.labels)
                progress(f"gamma {factor}x: AUROC {outcome.auroc:.3f} ({watch.seconds:.0f}s)")
            rows.append([f"{factor}x" if factor != "auto" else "auto",
                         *outcome_row("", [outcome])[1:]])
        rows.append(["(no refinement)", *outcome_row("", [results[normal][seed][NO_REFINE]])[1:]])
        report.table(["gamma", *OUTCOME_HEADERS[1:]], rows,
                     title=f"STOC gamma sweep, class {normal} {FASHION_MNIST_CLASSES[normal]}, seed {seed} "
                           f"(true training ratio {truth:.4f}; 'contamination used' = gamma, or the auto estimate)")


# ----------------------------------------------------------------------------- MVTec bottle

def part_bottle(report: Report, args) -> None:
    report.line("## MVTec AD bottle")
    report.line()
    if not BOTTLE.is_dir():
        report.line(f"SKIPPED: {BOTTLE} is absent.")
        report.line()
        return
    dataset = load_image_folder(BOTTLE)
    top = np.array([i.split("/")[0] for i in dataset.ids])
    train_idx, test_idx = np.flatnonzero(top == "train"), np.flatnonzero(top == "test")
    train, test = dataset.subset(train_idx), dataset.subset(test_idx)
    y_test = dataset.labels[test_idx]
    size = args.bottle_size
    common = dict(image_size=size, localization="none", device="cpu", rounds=args.rounds)
    scratch = dict(encoder="small-cnn" if size <= 64 else "resnet18", epochs=args.bottle_epochs,
                   retrain_epochs=args.bottle_retrain_epochs)
    finetune = dict(encoder="pretrained-finetune", epochs=args.bottle_finetune_epochs,
                    retrain_epochs=args.bottle_retrain_epochs, learning_rate=args.finetune_lr)
    encoders = {
        "frozen pretrained (objective none)": FitConfig(**common),
        "CutPaste 3-way, scratch": FitConfig(objective="cutpaste", **scratch, **common),
        "CutPaste binary, scratch": FitConfig(objective="cutpaste-binary", **scratch, **common),
        "CutPaste scar, scratch": FitConfig(objective="cutpaste-scar", **scratch, **common),
        "CutPaste 3-way, fine-tuned pretrained": FitConfig(objective="cutpaste", **finetune, **common),
    }
    encoders = {name: c.with_changes(seed=args.seeds[0]).for_data(IMAGES) for name, c in encoders.items()}
    if args.quick:
        encoders = {n: c for n, c in encoders.items() if "binary" not in n and "scar" not in n}
    report.line(f"- data: {BOTTLE} ({len(train)} train/good; test {int(np.sum(y_test == 0))} good + "
                f"{int(np.sum(y_test == 1))} defective); every image at {size} px; seed {args.seeds[0]}")
    for name, c in encoders.items():
        detail = (f"{c.backbone} {'+'.join(c.feature_layers)}" if c.objective == "none" else
                  f"encoder {c.encoder}, {c.epochs} epochs, learning rate {c.learning_rate or 'default'}, "
                  f"STOC retrain {c.retrain_epochs} epochs x {c.rounds} rounds")
        report.line(f"  - {name}: objective {c.objective}, {detail}; detector {c.detector}")
    report.line()

    clean_rows, cleans = [], {}
    for name, config in encoders.items():
        trained = train_encoder(train, config)
        cleans[name] = trained
        outcome = evaluate(trained, config.with_changes(refine=False), test, y_test, None)
        clean_rows.append([name, outcome.auroc, outcome.ap, trained.seconds])
        progress(f"bottle clean {name}: AUROC {outcome.auroc:.3f} (train {trained.seconds:.0f}s)")
    report.table(["encoder", "AUROC", "AP", "train + embed s"], clean_rows,
                 title="Bottle, clean protocol (train/good -> test/*), no refinement")

    contaminated = [n for n in encoders if "scratch" not in n or n.startswith("CutPaste 3-way")]
    split = softpatch_protocol(dataset, args.ratio, args.seeds[0])
    report.line(f"Contaminated: {split.description}")
    report.line()
    rows = []
    for name in contaminated:
        with timed() as watch:
            out, _, _ = compare(split.train, split.test, split.train.labels, split.test.labels, encoders[name],
                                clean=cleans[name])
        progress(f"bottle contaminated {name} ({watch.seconds:.0f}s): "
                 + " ".join(f"{m}={o.auroc:.3f}" for m, o in out.items()))
        for method, outcome in out.items():
            rows.append(outcome_row(f"{name}: {method}", [outcome]))
    report.table(OUTCOME_HEADERS, rows, title="Bottle, SoftPatch protocol: contaminated training, same test images "
                                              "(clean oracle = the clean-protocol encoder, train/good only)")


# ----------------------------------------------------------------------------- tables

def part_tables(report: Report, args) -> None:
    from bench.tables import DATA_DIR, split_indices

    sets = [DATA_DIR / f"{name}.npz" for name in (TABLE_SETS[:2] if args.quick else args.table_sets)]
    sets = [p for p in sets if p.is_file()]
    report.line("## Tables (ADBench), MLP encoder")
    report.line()
    if not sets:
        report.line(f"SKIPPED: none of {args.table_sets} in {DATA_DIR}.")
        report.line()
        return
    seeds = args.table_seeds
    configs = {objective: FitConfig(objective=objective, epochs=args.table_epochs,
                                    retrain_epochs=args.table_retrain_epochs, rounds=args.rounds, device="cpu")
               for objective in ("none", "contrastive", "contrastive-imix")}
    report.line(f"- sets {[p.stem for p in sets]}; split of bench/tables.py (subsample to {args.max_rows} rows, "
                f"stratified 70/30, training keeps its anomalies); seeds {seeds}")
    report.line(f"- objective none: scaled columns (TableEncoder); contrastive / contrastive-imix: MLP encoder, "
                f"{args.table_epochs} epochs, STOC {args.rounds} rounds x {args.table_retrain_epochs} retrain "
                f"epochs; detector {configs['none'].for_data(TABLE).detector}; clean oracle trains on the "
                f"training normals")
    report.line()
    results: dict[str, dict[str, list[Outcome]]] = {}
    for path in sets:
        table = load_table(path)
        per: dict[str, list[Outcome]] = {}
        with timed() as watch:
            for seed in seeds:
                train_idx, test_idx = split_indices(table.labels, args.max_rows, seed)
                train, test = table.subset(train_idx), table.subset(test_idx)
                for objective, config in configs.items():
                    out, _, _ = compare(train, test, train.labels, test.labels,
                                        config.with_changes(seed=seed).for_data(TABLE))
                    for method, outcome in out.items():
                        per.setdefault(f"{objective}: {method}", []).append(outcome)
        results[path.stem] = per
        progress(f"{path.stem} ({watch.seconds:.0f}s): " + " ".join(
            f"{m}={mean([o.auroc for o in outs]):.3f}" for m, outs in per.items()))

    methods = list(next(iter(results.values())))
    short = [m.replace("contrastive-imix", "imix").replace("contrastive", "contr.") for m in methods]
    rows = [[stem, *[mean([o.auroc for o in per[m]]) for m in methods]] for stem, per in results.items()]
    rows.append(["MEAN", *[mean([row[j] for row in rows]) for j in range(1, len(methods) + 1)]])
    report.table(["dataset", *short], rows, title=f"Tables: test AUROC (mean over seeds {seeds})")
    outs = {m: [o for per in results.values() for o in per[m]] for m in methods}
    report.table(OUTCOME_HEADERS, [outcome_row(m, outs[m]) for m in methods],
                 title="Tables, all sets and seeds: metrics and refinement on training")


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    parser.add_argument("--rounds", type=int, default=2, help="refinement rounds (STOC retrains after each)")
    parser.add_argument("--ratio", type=float, default=0.1, help="training anomaly share (SRR and SoftPatch)")
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 2, 4, 6, 8], help="Fashion-MNIST normal classes")
    parser.add_argument("--gamma-class", type=int, default=0, help="class of the gamma sweep (-1: none)")
    parser.add_argument("--n-normal", type=int, default=500, help="Fashion-MNIST normal training images")
    parser.add_argument("--test-size", type=int, default=2000, help="Fashion-MNIST test images (stratified)")
    parser.add_argument("--fmnist-encoder", default="small-cnn", help="small-cnn or resnet18")
    parser.add_argument("--fmnist-size", type=int, default=32)
    parser.add_argument("--fmnist-epochs", type=int, default=10)
    parser.add_argument("--fmnist-retrain-epochs", type=int, default=2)
    parser.add_argument("--bottle-size", type=int, default=64)
    parser.add_argument("--bottle-epochs", type=int, default=10, help="CutPaste from scratch")
    parser.add_argument("--bottle-finetune-epochs", type=int, default=3)
    parser.add_argument("--bottle-retrain-epochs", type=int, default=2)
    parser.add_argument("--finetune-lr", type=float, default=0.005, help="peak learning rate for fine-tuning")
    parser.add_argument("--table-sets", nargs="+", default=list(TABLE_SETS))
    parser.add_argument("--table-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--table-epochs", type=int, default=20)
    parser.add_argument("--table-retrain-epochs", type=int, default=5)
    parser.add_argument("--max-rows", type=int, default=2000, help="subsample larger tables to this many rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.seeds, args.n_normal, args.test_size = args.classes[:1], args.seeds[:1], 200, 500
        args.fmnist_epochs, args.fmnist_retrain_epochs = 2, 1
        args.bottle_epochs, args.bottle_finetune_epochs, args.bottle_retrain_epochs = 2, 1, 1
        args.table_seeds, args.table_epochs, args.table_retrain_epochs = [0], 5, 2
        args.gamma_class = args.classes[0] if args.gamma_class >= 0 else -1
    args.gamma_class = None if args.gamma_class < 0 else args.gamma_class
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    os.environ.setdefault("REFINERY_HOME", tempfile.mkdtemp(prefix="refinery-selftrain-"))

    report = Report(args.out)
    machine_header(report, "STOC self-training: learned representations with refinement and retraining")
    report.line(f"- parts {args.part}; settings: {vars(args)}")
    report.line(f"- methods: `{NO_REFINE}` (refine=False), `{REFINE_FROZEN}` (refine=True, retrain_epochs=0), "
                f"`{STOC}` (refine=True, retrain_epochs>0), `{CLEAN}` (trained and fitted on the labelled "
                "training normals only: an UPPER BOUND that uses labels)")
    report.line()
    with timed() as total:
        for part in args.part:
            with timed() as watch:
                {"fmnist": part_fmnist, "bottle": part_bottle, "tables": part_tables}[part](report, args)
            report.line(f"Part {part}: {watch.seconds:.0f} s")
            report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
