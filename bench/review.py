"""Review queue (issue 17.3): how fast an expert's verdicts lift AUROC, review queue vs plain score order.

An expert is simulated with the labels (verdict ``anomaly`` for label 1, ``normal`` for label 0; always
right). Starting from a verdict-free fit, the expert judges ``--step`` unjudged samples, the run is refitted
with every verdict so far as pins (``core.engine.refine_and_fit(..., pinned=core.refine.pinned_from_verdicts
(ids, verdicts))``, FitConfig defaults, frozen cached embeddings), and so on up to ``--budget`` verdicts.
Two ways to pick the next samples, both recomputed from the latest fit:

- ``review queue``: ``core.review.review_order`` (what Inspect's "review next" shows);
- ``score order``: the unjudged samples by ``anomaly_score``, highest first (Inspect's "most anomalous first").

Data:

- ``demo``: the bundled demo folder (``core.data.builtin.DEMO_DIR``: 270 sneakers + 30 other Fashion-MNIST
  images, the whole training set), at the studio's suggested config (``engine.suggested_config``: 64 px).
  The demo has no held-out samples, so AUROC is that of the run's ``anomaly_score`` against the training
  labels, as Results shows it (judged samples included). The seed is the fit's seed.
- ``bottle``: MVTec AD bottle, SoftPatch contaminated protocol (``core.data.softpatch_protocol``, 10%),
  FitConfig defaults; AUROC of ``-detector.score_samples`` on the held-out test images of the split.
  The seed draws the split and seeds the fit.

Goal per data set: the verdict-free AUROC + ``--lift`` (0.02) or the oracle's AUROC (``refine=False`` on
the labelled normals only: demo, scored on the training set; bottle, train/good scored on the same test
images), whichever is lower. Reported: the number of verdicts each way needs to reach it (a multiple of
``--step``; ``>budget`` when not reached), per seed and on the curve averaged over seeds. Target: the score
order needs at least twice the review queue's verdicts on both data sets (on the averaged curves).

Run: ``python bench/review.py --threads 1 --out bench/results/review.txt`` (embeddings cached under bench/.cache).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from bench.common import (
    SHARED_DATA,
    ImageEmbeddingCache,
    Report,
    base_parser,
    machine_footer,
    machine_header,
    progress,
    setup_logging,
    timed,
)
from core import engine
from core.config import FitConfig
from core.data import IMAGES, load_image_folder, softpatch_protocol
from core.data.builtin import DEMO_DIR
from core.refine import pinned_from_verdicts
from core.review import review_order

BOTTLE = SHARED_DATA / "mvtec_ad_bottle_256" / "bottle"
WAYS = ("review queue", "score order")
SPEED_TARGET = 2.0


@dataclass(frozen=True)
class Problem:
    """One data set under one seed: training embeddings and labels, and how a fit is scored.

    ``test`` / ``test_labels`` are held-out embeddings and labels; None scores the run's training
    ``anomaly_score`` against the training labels instead.
    """

    name: str
    ids: list[str]
    train: np.ndarray
    train_labels: np.ndarray
    config: FitConfig
    test: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    description: str = ""

    def fit(self, verdicts: dict[str, str]):
        return engine.refine_and_fit(self.train, self.config, pinned=pinned_from_verdicts(self.ids, verdicts))

    def auroc(self, model) -> float:
        if self.test is None:  # scored on the training labels, as the run's Results page shows it
            return float(roc_auc_score(self.train_labels, model.train_score))
        return float(roc_auc_score(self.test_labels, -model.detector.score_samples(self.test)))

    def oracle(self) -> float:
        """AUROC of the unrefined detector fitted on the labelled normals only (an upper bound)."""
        normals = self.train[self.train_labels == 0]
        model = engine.refine_and_fit(normals, self.config.with_changes(refine=False))
        test = self.train if self.test is None else self.test
        labels = self.train_labels if self.test is None else self.test_labels
        return float(roc_auc_score(labels, -model.detector.score_samples(test)))


def demo_problems(seeds, cache) -> list[Problem]:
    dataset = load_image_folder(DEMO_DIR)
    config = engine.suggested_config(dataset)
    embeddings = cache.embed(dataset, np.arange(len(dataset)), config)
    labels = np.asarray(dataset.labels)
    description = (f"demo: {DEMO_DIR.name}, {len(dataset)} images ({int(np.sum(labels == 1))} anomalous), "
                   f"{config.image_size} px; AUROC on the training labels (no held-out samples)")
    return [Problem("demo", list(dataset.ids), embeddings, labels, config.with_changes(seed=seed),
                    description=description) for seed in seeds]


def bottle_problems(seeds, cache, ratio) -> list[Problem]:
    dataset = load_image_folder(BOTTLE)
    config = FitConfig().validate().for_data(IMAGES)
    embeddings = cache.embed(dataset, np.arange(len(dataset)), config)
    problems = []
    for seed in seeds:
        split = softpatch_protocol(dataset, ratio, seed)
        problems.append(Problem(
            "bottle", [dataset.ids[i] for i in split.train_indices], embeddings[split.train_indices],
            np.asarray(split.train.labels), config.with_changes(seed=seed), embeddings[split.test_indices],
            np.asarray(split.test.labels),
            description=f"bottle seed {seed}: {split.description}; AUROC on the held-out test images"))
    return problems


def next_samples(way: str, model, problem: Problem, verdicts: dict[str, str], step: int) -> np.ndarray:
    """Positions of the ``step`` samples judged next, from the latest fit."""
    if way == "review queue":
        samples = pd.DataFrame({"id": problem.ids, "anomaly_score": model.train_score})
        return review_order(samples, model.rounds, model.threshold, verdicts.keys())[:step]
    by_score = np.argsort(-model.train_score, kind="stable")
    judged = np.isin(np.asarray(problem.ids), list(verdicts))
    return by_score[~judged[by_score]][:step]


def curve(problem: Problem, way: str, step: int, budget: int, verdict_free) -> list[float]:
    """AUROC after 0, step, 2 step, ... budget verdicts judged ``way``; ``verdict_free`` is the fit without any."""
    verdicts: dict[str, str] = {}
    aurocs = []
    for done in range(0, budget + 1, step):
        model = problem.fit(verdicts) if verdicts else verdict_free
        aurocs.append(problem.auroc(model))
        if done == budget:
            break
        for index in next_samples(way, model, problem, verdicts, step):
            verdicts[problem.ids[index]] = "anomaly" if problem.train_labels[index] == 1 else "normal"
    return aurocs


def verdicts_to(goal: float, aurocs, step: int) -> int | None:
    """Verdicts at the first point of the curve at or above ``goal``; None if never."""
    reached = np.flatnonzero(np.asarray(aurocs) >= goal - 1e-12)
    return int(reached[0]) * step if len(reached) else None


def auroc_text(value: float) -> str:
    """AUROC with 4 decimals: on bottle one misordered test pair moves it by about 0.001."""
    return f"{value:.4f}"


def count_text(count: int | None, budget: int) -> str:
    return f">{budget}" if count is None else str(count)


def speed_up(queue: int | None, score: int | None, budget: int, step: int) -> tuple[str, bool]:
    """Score-order verdicts / queue verdicts and whether it is >= the target; when score order never got there,
    a lower bound (it would need at least ``budget + step``)."""
    if queue is None:
        return "-", False
    if queue == 0:
        return "goal met without verdicts", False
    if score is None:
        return f">={(budget + step) / queue:.1f}", (budget + step) / queue >= SPEED_TARGET
    return f"{score / queue:.1f}", score / queue >= SPEED_TARGET


def run_dataset(report: Report, name: str, problems: list[Problem], args) -> bool:
    """The curves, the per-seed counts and the verdict on the target for one data set."""
    steps = list(range(0, args.budget + 1, args.step))
    curves = {way: [] for way in WAYS}
    rows, goals = [], []
    for problem in problems:
        with timed() as watch:
            oracle = problem.oracle()
            verdict_free = problem.fit({})
            for way in WAYS:
                curves[way].append(curve(problem, way, args.step, args.budget, verdict_free))
        free = curves[WAYS[0]][-1][0]
        goal = min(free + args.lift, oracle)
        goals.append((free, oracle))
        counts = [verdicts_to(goal, curves[way][-1], args.step) for way in WAYS]
        rows.append([problem.config.seed, auroc_text(free), auroc_text(oracle), auroc_text(goal), *[count_text(c, args.budget) for c in counts],
                     speed_up(*counts, args.budget, args.step)[0], f"{watch.seconds:.0f}"])
        progress(f"{name} seed {problem.config.seed}: goal {goal:.4f}, verdicts {counts} ({watch.seconds:.0f}s)")
    mean = {way: np.mean(curves[way], axis=0) for way in WAYS}
    free, oracle = (float(np.mean([g[i] for g in goals])) for i in (0, 1))
    goal = min(free + args.lift, oracle)
    counts = [verdicts_to(goal, mean[way], args.step) for way in WAYS]
    ratio, met = speed_up(*counts, args.budget, args.step)
    rows.append(["MEAN CURVE", auroc_text(free), auroc_text(oracle), auroc_text(goal), *[count_text(c, args.budget) for c in counts], ratio, ""])

    report.line(f"## {name}")
    report.line()
    for problem in problems[:1] if name == "demo" else problems:
        report.line(f"- {problem.description}")
    report.line()
    headers = ["verdicts", *[f"AUROC {way}" for way in WAYS], "queue - score order"]
    table = [[s, *map(auroc_text, (mean[WAYS[0]][j], mean[WAYS[1]][j])), f"{mean[WAYS[0]][j] - mean[WAYS[1]][j]:+.4f}"]
             for j, s in enumerate(steps)]
    seeds = [p.config.seed for p in problems]
    report.table(headers, table, title=f"{name}: AUROC after n verdicts (mean over seeds {seeds})")
    per_seed = [[s, *[auroc_text(curves[way][i][j]) for i in range(len(problems)) for way in WAYS]]
                for j, s in enumerate(steps)]
    report.table(["verdicts", *[f"s{seed} {'queue' if way == WAYS[0] else 'score'}" for seed in seeds for way in WAYS]],
                 per_seed, title=f"{name}: AUROC per seed")
    report.table(["seed", "verdict-free AUROC", "oracle AUROC", "goal", "verdicts: review queue",
                  "verdicts: score order", "score / queue", "seconds"], rows,
                 title=f"{name}: verdicts to reach min(verdict-free + {args.lift}, oracle)")
    lift = {way: float(np.mean(mean[way][1:] - mean[way][0])) for way in WAYS}
    report.line(f"- mean AUROC lift over the verdict-free fit, averaged over the {len(steps) - 1} points after it: "
                f"review queue {lift[WAYS[0]]:+.4f}, score order {lift[WAYS[1]]:+.4f}")
    report.line(f"- target (score order needs >= {SPEED_TARGET:g}x the queue's verdicts, mean curve): "
                f"{ratio} -> **{'MET' if met else 'NOT met'}**")
    report.line()
    return met


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0, 1, 2))
    parser.add_argument("--step", type=int, default=5, help="verdicts between refits (default 5)")
    parser.add_argument("--budget", type=int, default=80, help="verdicts per way and seed (default 80)")
    parser.add_argument("--lift", type=float, default=0.02, help="AUROC lift over the verdict-free fit to reach")
    parser.add_argument("--ratio", type=float, default=0.1, help="bottle: anomaly share of the contaminated training set")
    parser.add_argument("--data", nargs="+", default=["demo", "bottle"], choices=["demo", "bottle"])
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS and torch threads (default: their own); 1 on a shared, oversubscribed CPU")
    args = parser.parse_args(argv)
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    setup_logging(args.verbose)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    if args.quick:
        args.seeds, args.budget = args.seeds[:1], min(args.budget, 20)

    report = Report(args.out)
    machine_header(report, "Review queue: verdicts needed to lift AUROC, review queue vs score order")
    report.line(f"- simulated expert (labels, always right); {args.step} verdicts between refits, {args.budget} per way "
                f"and seed; refits: core.engine.refine_and_fit(embeddings, config, pinned=pinned_from_verdicts(...)) "
                "with FitConfig defaults on cached frozen embeddings")
    report.line()
    met = {}
    with timed() as total:
        cache = ImageEmbeddingCache()
        for name in args.data:
            problems = (demo_problems(args.seeds, cache) if name == "demo"
                        else bottle_problems(args.seeds, cache, args.ratio))
            met[name] = run_dataset(report, name, problems, args)
    report.line(f"**Target** (the review queue lifts AUROC at least {SPEED_TARGET:g}x as fast per verdict as score "
                f"order, on {' and '.join(args.data)}): "
                + ", ".join(f"{name} {'MET' if ok else 'NOT met'}" for name, ok in met.items()))
    report.line()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
