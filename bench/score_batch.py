"""Scoring a new batch from the studio against ``refinery score`` (issue 17): same run, same data, one process.

The studio path is the job the Score page submits (:func:`core.batches.score_work`) run by a
:class:`core.jobs.JobRunner`, timed from submission to its end: it opens the run, loads the data,
scores it, writes the maps, places the samples on the run's map and saves the batch. The CLI path is
``refinery score RUN DATA --out SCORES.csv --maps MAPS`` called in-process (``core.cli.main``), so
neither pays Python's and torch's start. The run's map is laid out before timing (a studio fit lays
it out as part of the fit job), and one untimed ``refinery score`` warms the file cache and the engine
(the first pass over cold images took 9x longer). The two paths then alternate, ``--repeats`` times
each; the median of each is compared, and their CSVs must be identical.

Run: ``python bench/score_batch.py`` (a demo fit, then 1,000 Fashion-MNIST images; about 4 minutes on
2 cores) or ``--quick`` (the 300 demo images, one repeat).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Report, base_parser, machine_footer, machine_header, progress, setup_logging  # noqa: E402


def main() -> None:
    parser = base_parser("Studio scoring job against refinery score on a 1,000-image batch", default_seeds=[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (default: %(default)s)")
    parser.add_argument("--run", type=Path, help="an existing image run to score with (default: fit the demo)")
    args = parser.parse_args()
    setup_logging(args.verbose)
    home = Path(tempfile.mkdtemp(prefix="refinery-score-batch-"))
    os.environ.setdefault("REFINERY_HOME", str(home / "refinery-home"))

    from core import engine
    from core.batches import score_work
    from core.cli import main as refinery
    from core.data.builtin import DEMO_DIR, prepare_builtin
    from core.jobs import DONE, JobRunner
    from core.layouts import run_layouts

    report = Report(args.out)
    machine_header(report, "Issue 17: scoring a new batch, studio job against refinery score")
    started = time.perf_counter()
    run_dir = args.run
    if run_dir is None:
        progress("fitting the demo (300 images) as the run")
        dataset = engine.load_data(DEMO_DIR, workspace=home / "workspace")
        run_dir = engine.fit(dataset, engine.suggested_config(dataset), home / "run").run_dir
    run_layouts(run_dir)
    data = DEMO_DIR if args.quick else prepare_builtin("fashion-mnist", home / "workspace")
    repeats = 1 if args.quick else args.repeats
    runner = JobRunner()
    times: dict[str, list[float]] = {"studio job": [], "refinery score": []}
    csvs: dict[str, str] = {}
    progress("warm-up (untimed): refinery score once; the first pass reads the images cold and starts the engine")
    assert refinery(["score", str(run_dir), str(data), "--out", str(home / "warm.csv"), "--maps", str(home / "warm")]) == 0
    for repeat in range(repeats):
        progress(f"repeat {repeat + 1}/{repeats}: refinery score")
        out = home / f"cli-{repeat}"
        begun = time.perf_counter()
        assert refinery(["score", str(run_dir), str(data), "--out", str(out / "scores.csv"), "--maps", str(out / "maps")]) == 0
        times["refinery score"].append(time.perf_counter() - begun)
        csvs["refinery score"] = (out / "scores.csv").read_text()
        progress(f"repeat {repeat + 1}/{repeats}: studio job")
        begun = time.perf_counter()
        status = runner.wait(runner.submit("score", score_work(run_dir, data, name=f"bench-{repeat}",
                                                               workspace=home / "workspace")), timeout=3600)
        times["studio job"].append(time.perf_counter() - begun)
        assert status.state == DONE, status.message
        csvs["studio job"] = (status.result.directory / "scores.csv").read_text()
    assert csvs["studio job"] == csvs["refinery score"], "the studio's scores.csv differs from refinery score's"
    n = csvs["studio job"].count("\n") - 1
    medians = {path: statistics.median(values) for path, values in times.items()}
    report.line(f"Run: {Path(run_dir).name} ({engine.open_run(run_dir).config.image_size} px); batch: {n} images "
                f"from {data}; maps written by both; scores.csv identical.")
    report.line()
    report.table(["path", "runs (s)", "median (s)", "images/s"],
                 [[path, ", ".join(f"{t:.1f}" for t in values), medians[path], n / medians[path]]
                  for path, values in times.items()])
    ratio = medians["studio job"] / medians["refinery score"]
    report.line(f"studio / CLI: {ratio:.3f} (target: at most 1.10)")
    report.line()
    machine_footer(report, time.perf_counter() - started)


if __name__ == "__main__":
    main()
