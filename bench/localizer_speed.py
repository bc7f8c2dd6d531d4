"""Localizer fit speed (issue 18): the patch model's share of a fit, maps/s, map quality, before vs after.

Parts (``--part``, both by default):

- **speed**: the same measurement run by two checkouts of Refinery, each in its own process, one
  after the other (``--baseline DIR``, e.g. ``git archive <commit> | tar -x -C DIR``, then this
  checkout; ``--repeats 2`` alternates the order). Each process:

  1. fits a run (``core.engine.fit``, ``FitConfig(device="cpu")`` defaults) on the first 120
     images (sorted names) of MVTec bottle ``train/good``, linked into a flat folder, so no label
     reaches the fit, as a studio job does (``core.jobs.JobRunner`` with ``core.pipeline.fit_plan``):
     total seconds, the engine's per-step timings, the ``patch model (memory) fitted on N images in
     X s`` log line, and every ETA the job showed (stage ``eta_s`` and whole-job ``overall_eta_s``):
     the coreset stage's range and how often either ETA rose;
  2. draws maps with the run's localizer for 100 images it never saw (bottle ``test`` and the next
     ``train/good`` images): maps/s, and bottle image AUROC from those maps (max, top-1% mean);
  3. fits ``PatchLocalizer("memory")`` (defaults, 224 px) on the quick magnetic-tile split of
     ``bench/localization.py`` (seed 0: 60 MT_Free to fit; 20 held-out MT_Free + 40 defective to
     test): pixel AUROC, AUPRO (FPR <= 0.3), image AUROC (top-1% mean of the map).

- **defaults**: the memory's pool and coreset size (``max_pool_patches``, ``coreset_ratio``) chosen
  on the localization benchmark's dev half, MVTec bottle (fit on all of ``train/good``, maps of
  ``test``: image AUROC, and how closely each candidate's maps follow the current default's, a
  pixel-level Pearson correlation), and confirmed on its report half, the quick magnetic-tile split
  (pixel AUROC, AUPRO, image AUROC). Fit seconds and maps/s come from the same process, in turn.

Run: ``python bench/localizer_speed.py --threads 1 --baseline /tmp/refinery-before --out
bench/results/localizer_speed.txt``. ``--threads 1``: on a shared, oversubscribed CPU two spinning
torch threads are far slower than one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOTTLE_PART = ("mvtec_ad_bottle_256", "bottle")
FIT_IMAGES = 120
MAP_IMAGES = 100
TOPK_FRACTION = 0.01
WORKER_MARK = "LOCALIZER_SPEED_RESULT "
CANDIDATES = {  # report name -> PatchLocalizer options of the memory's size; the first is the reference
    "pool 65536, ratio 0.1": {"max_pool_patches": 65536, "coreset_ratio": 0.1},
    "pool 32768, ratio 0.2": {"max_pool_patches": 32768, "coreset_ratio": 0.2},
    "pool 32768, ratio 0.1": {"max_pool_patches": 32768, "coreset_ratio": 0.1},
    "pool 16384, ratio 0.25": {"max_pool_patches": 16384, "coreset_ratio": 0.25},
}


# ----------------------------------------------------------------------------- one checkout (worker process)

def worker(root: Path, threads: int | None, shared_data: Path) -> dict:
    """Every measurement of the speed part, with ``core`` and ``bench`` imported from ``root``."""
    sys.path.insert(0, str(root))
    import logging
    import tempfile
    import time

    import numpy as np
    import torch

    from bench.localization import load_mtd, make_split, score_maps
    from core import engine
    from core.config import FitConfig
    from core.explain import PatchLocalizer, image_scores_from_maps
    from core.jobs import JobRunner
    from core.pipeline import fit_plan
    from core.progress import Monitor
    from core.registry import Registry
    from sklearn.metrics import roc_auc_score

    if threads:
        torch.set_num_threads(threads)
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("core").addHandler(Lines())
    logging.getLogger("core").setLevel(logging.INFO)
    bottle = shared_data.joinpath(*BOTTLE_PART)
    good = sorted((bottle / "train" / "good").glob("*.png"))
    out: dict = {"root": str(root)}
    with tempfile.TemporaryDirectory(prefix="localizer-speed-") as scratch:
        scratch = Path(scratch)
        folder = scratch / "bottle_train"
        folder.mkdir()
        for path in good[:FIT_IMAGES]:
            (folder / path.name).symlink_to(path)
        dataset = engine.load_data(folder)
        config = FitConfig(device="cpu")
        runner, shown, spans, last = JobRunner(), [], {}, [time.perf_counter()]

        def work(context):
            context.plan(fit_plan(dataset, config))

            def on_progress(event):
                context.on_progress(event)
                status = runner.status(job_id)
                shown.append((status.stage, status.eta_s, status.overall_eta_s))
                spans[event.stage] = spans.get(event.stage, 0.0) + time.perf_counter() - last[0]
                last[0] = time.perf_counter()

            return engine.fit(dataset, config, scratch / "run", registry=Registry(scratch / "registry.sqlite"),
                              monitor=Monitor(on_progress, context.cancel))

        started = time.perf_counter()
        job_id = runner.submit("fit", work)
        status = runner.wait(job_id, timeout=7200)
        out["fit_s"] = time.perf_counter() - started
        if status.state != "done":
            raise RuntimeError(f"the fit ended {status.state}: {status.message}")
        out["timings"] = dict(status.result.timings)
        out["stage_s"] = spans  # seconds from the event before each event to it, summed by the event's stage
        out["patch_log"] = [line for line in lines if line.startswith("patch model")]
        out["memory_log"] = [line for line in lines if line.startswith("memory bank")]
        coreset = [eta for stage, eta, _ in shown if stage == "coreset" and eta is not None]
        overall = [eta for _, _, eta in shown if eta is not None]
        stage_rises = sum(later > earlier for (s1, earlier, _), (s2, later, _) in zip(shown, shown[1:])
                          if s1 == s2 and earlier is not None and later is not None)
        out["eta"] = {"coreset_first": coreset[0] if coreset else None, "coreset_min": min(coreset, default=None),
                      "coreset_max": max(coreset, default=None), "coreset_events": len(coreset),
                      "stage_rises": stage_rises,
                      "overall_rises": sum(later > earlier for earlier, later in zip(overall, overall[1:]))}

        localizer = PatchLocalizer.load(scratch / "run", device="cpu")
        tests = sorted((bottle / "test").glob("*/*.png"))
        unseen = (tests + good[FIT_IMAGES:])[:MAP_IMAGES]
        localizer.anomaly_maps(unseen[:2])                                   # warm-up
        started = time.perf_counter()
        maps = localizer.anomaly_maps(unseen)
        out["maps_per_s"] = len(unseen) / (time.perf_counter() - started)
        labels = np.array([0 if path.parent.name == "good" else 1 for path in tests])
        test_maps = maps[:len(tests)]
        out["bottle_image_auroc_max"] = float(roc_auc_score(labels, image_scores_from_maps(test_maps, "max")))
        out["bottle_image_auroc_topk"] = float(roc_auc_score(
            labels, image_scores_from_maps(test_maps, "topk_mean", TOPK_FRACTION)))

    out["tiles"] = tile_quality(PatchLocalizer, image_scores_from_maps, load_mtd, make_split, score_maps, {})
    return out


def tile_quality(localizer_class, image_scores, load_mtd, make_split, score_maps, options: dict) -> dict:
    """Pixel AUROC, AUPRO and image AUROC on the quick magnetic-tile split (seed 0) of a memory localizer."""
    import time

    from sklearn.metrics import roc_auc_score

    dataset, labels = load_mtd()
    split = make_split(labels, 0, 60, 20, 40, 0.1)
    started = time.perf_counter()
    model = localizer_class("memory", image_size=224, device="cpu", **options).fit(
        [dataset.paths[i] for i in split.train_free])
    fit_s = time.perf_counter() - started
    test_paths = [dataset.paths[i] for i in split.test]
    started = time.perf_counter()
    maps = model.anomaly_maps(test_paths)
    maps_per_s = len(test_paths) / (time.perf_counter() - started)
    scores = score_maps(maps, dataset, split.test, split.paired)
    topk = image_scores(maps, "topk_mean", TOPK_FRACTION)
    return {"pixel_auroc": scores.pixel_all.auroc, "aupro": scores.pixel_all.aupro,
            "image_auroc": float(roc_auc_score(labels[split.test], topk)), "fit_s": fit_s, "maps_per_s": maps_per_s,
            "memory": int(model.memory_bank_.shape[0])}


def run_worker(root: Path, threads: int | None, shared_data: Path) -> dict:
    """:func:`worker` in a fresh process (so each checkout imports its own ``core``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(root), "--shared-data", str(shared_data)]
    if threads:
        command += ["--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="localizer-speed-home-") as home:  # the worker's own registry home
        done = subprocess.run(command, capture_output=True, text=True, cwd=root,
                              env={**os.environ, "REFINERY_HOME": home, "REFINERY_SHARED_DATA": str(shared_data)})
    results = [line for line in done.stdout.splitlines() if line.startswith(WORKER_MARK)]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"the measurement of {root} failed:\n{done.stderr[-4000:]}")
    return json.loads(results[-1][len(WORKER_MARK):])


# ----------------------------------------------------------------------------- report (this checkout)

def speed_part(report, args, shared_data: Path) -> None:
    from bench.common import progress

    roots = {"before": args.baseline.resolve(), "after": REPO}
    order = ["before", "after", "after", "before"][: 2 * args.repeats] if args.repeats > 1 else ["before", "after"]
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for name in order:
        progress(f"speed: {name} ({roots[name]})")
        results[name].append(run_worker(roots[name], args.threads, shared_data))
    for name in ("before", "after"):
        report.line(f"- {name}: {roots[name]}")
    report.line()
    rows = []
    for name in ("before", "after"):
        for run in results[name]:
            timings = run["timings"]
            localizer = timings.get("localization_s", float("nan"))
            rows.append([name, run["fit_s"], timings.get("embed_s"), timings.get("refine_and_detector_s"), localizer,
                         timings.get("image_score_s"), localizer / run["fit_s"], run["maps_per_s"]])
    report.table(["code", "fit s (job)", "embed s", "refine + detector s", "localizer s", "image score s",
                  "localizer share", f"maps/s ({MAP_IMAGES} unseen)"], rows,
                 title=f"MVTec bottle, first {FIT_IMAGES} train/good images at 224 px, `core.engine.fit` defaults "
                       f"as a studio job")
    for name in ("before", "after"):
        for run in results[name]:
            report.line(f"- {name}: {'; '.join(run['patch_log'] + run['memory_log'])}")
    report.line()
    stages = [stage for stage in results["after"][0]["stage_s"] if stage in ("embed", "patch_fit", "coreset",
                                                                             "display_scale")]
    rows = [[name, *[run["stage_s"].get(stage) for stage in stages],
             *[run["stage_s"].get(stage, 0.0) / run["stage_s"]["embed"] for stage in stages[1:]]]
            for name in ("before", "after") for run in results[name]]
    report.table(["code", *[f"{stage} s" for stage in stages], *[f"{stage} / embed" for stage in stages[1:]]], rows,
                 title="Seconds per progress stage (between its events), and as a share of the embed pass "
                       "(core.pipeline.fit_plan's unit)")
    rows = [[name, run["eta"]["coreset_events"], run["eta"]["coreset_first"], run["eta"]["coreset_min"],
             run["eta"]["coreset_max"], run["eta"]["stage_rises"], run["eta"]["overall_rises"]]
            for name in ("before", "after") for run in results[name]]
    report.table(["code", "coreset ETA events", "first s", "min s", "max s", "stage ETA rises (all stages)",
                  "whole-job ETA rises"], rows, title="The ETAs the job showed during that fit")
    rows = [[name, run["bottle_image_auroc_max"], run["bottle_image_auroc_topk"], run["tiles"]["pixel_auroc"],
             run["tiles"]["aupro"], run["tiles"]["image_auroc"], run["tiles"]["memory"]]
            for name in ("before", "after") for run in results[name]]
    report.table(["code", "bottle image AUROC (map max)", "bottle image AUROC (top-1% mean)", "tiles pixel AUROC",
                  "tiles AUPRO", "tiles image AUROC (top-1% mean)", "tiles memory patches"], rows,
                 title="Quality: bottle (120-image run above, its 83 test images); magnetic tiles quick split, seed 0")


def defaults_part(report, args, shared_data: Path) -> None:
    import time

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from bench.common import progress
    from bench.localization import load_mtd, make_split, score_maps
    from core.explain import PatchLocalizer, image_scores_from_maps

    bottle = shared_data.joinpath(*BOTTLE_PART)
    train = sorted((bottle / "train" / "good").glob("*.png"))
    tests = sorted((bottle / "test").glob("*/*.png"))
    labels = np.array([0 if path.parent.name == "good" else 1 for path in tests])
    rows, reference = [], None
    for name, options in CANDIDATES.items():
        progress(f"defaults, bottle (dev half): {name}")
        started = time.perf_counter()
        model = PatchLocalizer("memory", image_size=224, device="cpu", **options).fit(train)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        maps = np.stack(model.anomaly_maps(tests, output_size=224))
        maps_per_s = len(tests) / (time.perf_counter() - started)
        reference = maps if reference is None else reference
        agreement = float(np.corrcoef(maps.ravel(), reference.ravel())[0, 1])
        rows.append([name, int(model.memory_bank_.shape[0]), fit_s, maps_per_s,
                     float(roc_auc_score(labels, image_scores_from_maps(list(maps), "max"))),
                     float(roc_auc_score(labels, image_scores_from_maps(list(maps), "topk_mean", TOPK_FRACTION))),
                     agreement])
    report.table(["candidate", "memory patches", "fit s", "maps/s", "image AUROC (max)", "image AUROC (top-1%)",
                  "map correlation with the first"], rows,
                 title=f"Dev half, MVTec bottle: fit on all {len(train)} train/good, maps of the {len(tests)} test "
                       f"images (224 px)")
    rows = []
    for name, options in CANDIDATES.items():
        progress(f"defaults, tiles (report half): {name}")
        tiles = tile_quality(PatchLocalizer, image_scores_from_maps, load_mtd, make_split, score_maps, options)
        rows.append([name, tiles["memory"], tiles["fit_s"], tiles["maps_per_s"], tiles["pixel_auroc"], tiles["aupro"],
                     tiles["image_auroc"]])
    report.table(["candidate", "memory patches", "fit s", "maps/s", "pixel AUROC", "AUPRO (FPR<=0.3)",
                  "image AUROC (top-1%)"], rows,
                 title="Report half, magnetic tiles quick split (seed 0: 60 MT_Free fitted, 60 test images)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=("speed", "defaults"), default=["speed", "defaults"])
    parser.add_argument("--baseline", type=Path, help="another checkout of Refinery to compare with (part speed)")
    parser.add_argument("--repeats", type=int, default=1, help="1: before, after; 2: before, after, after, before")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the printed report to this file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shared-data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(WORKER_MARK + json.dumps(worker(args.worker, args.threads, args.shared_data)), flush=True)
        return
    sys.path.insert(0, str(REPO))
    import torch

    from bench.common import SHARED_DATA, Report, machine_footer, machine_header, timed

    if args.threads:
        torch.set_num_threads(args.threads)
    if "speed" in args.part and args.baseline is None:
        parser.error("--part speed needs --baseline DIR (another checkout to compare with)")
    report = Report(args.out)
    machine_header(report, "Localizer fit speed (issue 18)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    report.line(f"- git HEAD {commit.stdout.strip()} (plus the working tree's changes)")
    report.line()
    with timed() as total:
        if "speed" in args.part:
            speed_part(report, args, SHARED_DATA)
        if "defaults" in args.part:
            defaults_part(report, args, SHARED_DATA)
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
