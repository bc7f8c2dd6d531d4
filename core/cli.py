"""The ``refinery`` command line: the same engine as the app, headless.

Exit status: 0 on success, 1 when the input or a run cannot be used (one-line message on
stderr), 2 for a wrong command line, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from core import engine
from core.compute import Compute, LocalCompute
from core.config import FIT_PARAMS, FitConfig
from core.data.builtin import DEMO_DIR
from core.distributed import ddp
from core.errors import Cancelled, ConfigError, RefineryError
from core.export import export_kept, export_table
from core.files import atomic_write_text
from core.params import Param, describe, interval_of, options_of, parse
from core.progress import HOLD_AT_VARIABLE, Monitor, ProgressEvent, holding_at
from core.refine import describe_contamination
from core.registry import Registry, refinery_home
from core.report import DEFAULT_TOP, write_report
from core.run_dir import write_maps

FIT_METAVARS = {"learning_rate": "LR", "ensemble": "K", "gamma": "G|auto", "rounds": "R", "min_keep_fraction": "F",
                "false_alarm_rate": "A", "image_size": "PX", "feature_layers": "L1,L2", "label_column": "NAME",
                "id_column": "NAME", "ignore_columns": "NAME,NAME", "weights": "PATH"}
"""How ``fit --help`` names an option's value where the field's name in capitals would not do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery",
        description="Unsupervised anomaly detection on unlabeled, contaminated images and tables, "
        "with STOC data refinement. Scores: higher = more anomalous.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step (refinement rounds, warnings)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="fit a run on DATA and save it to --out",
                              description="Learn a representation, refine the training data, fit the final "
                              "detector on the kept samples and save the run (config, embeddings, "
                              "refinement history, training scores).")
    fit.add_argument("data", type=Path, metavar="DATA", help="image folder (recursive; MVTec layout recognised), "
                     ".zip of images, or a table (.csv, .parquet, .npz with X[,y], .mat with X[,y])")
    fit.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="new folder for the run (must not exist or be empty)")
    fit.add_argument("--resume", action="store_true",
                     help="continue a fit into RUN_DIR that was interrupted (process killed, machine down) from its "
                     "partial folder .RUN_DIR.partial beside it: cached embeddings and training checkpoints are "
                     "reused; same data and settings required; gives the same run as an uninterrupted fit. "
                     "Without a partial folder the fit starts afresh")
    _add_config_options(fit)
    _add_engine_options(fit, "the embedding of frozen features, the detector fits and the scoring")

    score = commands.add_parser("score", help="score DATA with a fitted run and write SCORES.csv",
                                description="Write id, anomaly_score (higher = more anomalous), is_anomaly "
                                "(at the run's threshold) and label (when known) for every sample of DATA.")
    score.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder written by 'refinery fit --out'")
    score.add_argument("data", type=Path, metavar="DATA", help="images or a table of the same kind as the run's")
    score.add_argument("--out", type=Path, required=True, metavar="SCORES.csv", help="where to write the scores")
    score.add_argument("--maps", type=Path, metavar="MAPS_DIR",
                       help="also write one float32 .npy anomaly map per image (same height and width as the "
                       "image, higher = more anomalous) at MAPS_DIR/<id with its suffix replaced by .npy>")
    score.add_argument("--label-column", metavar="NAME", help="table column with labels, for metrics only")
    _add_engine_options(score, "the embedding and scoring")

    explain = commands.add_parser("explain", help="explain anomaly scores: top features of table rows, "
                                  "Grad-CAM maps of images",
                                  description="Tables: for each row (default: the --top most anomalous), list "
                                  "the features that deviate most from the run's kept training rows, with the "
                                  "row's value, the typical range (5th-95th percentile) and the share of the "
                                  "anomaly score. Images: write a Grad-CAM map of each image's anomaly score "
                                  "(float32 .npy, the image's size, higher = raised the score more) into --out.")
    explain.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder written by 'refinery fit --out'")
    explain.add_argument("data", type=Path, metavar="DATA", help="a table with the run's columns, or images")
    explain.add_argument("--method", choices=("gradcam", "gradcam++"), default="gradcam",
                         help="images: Grad-CAM weighting (default: %(default)s)")
    explain.add_argument("--ids", metavar="ID,ID", help="ids of the rows to explain (the table's id column, or 0-based row numbers without one); default: the most anomalous")
    explain.add_argument("--top", type=int, default=5, metavar="N", help="rows to explain without --ids (default: %(default)s)")
    explain.add_argument("--features", type=int, default=5, metavar="K", help="features per row (default: %(default)s)")
    explain.add_argument("--out", type=Path, metavar="EXPLAIN.csv|MAPS_DIR",
                         help="tables: also write one line per row and feature; images (required): folder for "
                         "the maps, named like 'score --maps'")

    export = commands.add_parser("export", help="export the refined data set: the kept samples, or every "
                                 "sample's outcome as a table",
                                 description="--kept: write the samples kept after the last refinement round "
                                 "(image files copied at their paths relative to the data folder, so class "
                                 "folders survive; for a table, its kept rows with all its columns) and "
                                 "refined.csv into a new folder or a .zip. --table: write only refined.csv: every "
                                 "training sample's id, anomaly_score, is_anomaly, label (when known), kept, "
                                 "round_removed, votes and the expert's verdict and note.")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder written by 'refinery fit --out'")
    what = export.add_mutually_exclusive_group(required=True)
    what.add_argument("--kept", action="store_true", help="the kept samples and refined.csv")
    what.add_argument("--table", action="store_true", help="only refined.csv, one line per training sample")
    export.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="--kept: a new or empty folder, or a new file ending in .zip; --table: the CSV to write")

    report = commands.add_parser("report", help="write a run report: one self-contained HTML file that opens offline",
                                 description="Write one HTML file for a colleague without the studio: the data, the "
                                 "settings, the refinement rounds, the score histogram with the threshold and its "
                                 "meaning, the --top most anomalous samples with their images and anomaly maps (tables: "
                                 "their top features), the expert's verdicts and, where labels exist, the metrics. "
                                 "Images are embedded; the file loads nothing from anywhere.")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder written by 'refinery fit --out'")
    report.add_argument("--out", type=Path, required=True, metavar="REPORT.html", help="the HTML file to write")
    report.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                        help="most anomalous samples shown (default: %(default)s)")

    commands.add_parser("runs", help="list the runs in the registry, newest first")

    demo = commands.add_parser("demo", help="fit the built-in demo (300 Fashion-MNIST images, 10%% contaminated)",
                               description="Fit a run on the bundled demo data set and show what refinement "
                               "removed and which images score as most anomalous.")
    demo.add_argument("--out", type=Path, metavar="RUN_DIR",
                      help="folder for the run (default: a new folder under the Refinery home's runs/)")
    return parser


def _add_config_options(command: argparse.ArgumentParser) -> None:
    """One option per :class:`FitConfig` field, built from its declaration (``FIT_PARAMS``): the flag from
    the field's name, the choices, type and help from its constraints and help, the default from the field.
    :func:`_config_from_args` reads them back."""
    defaults = FitConfig()
    for name, spec in FIT_PARAMS.items():
        command.add_argument("--" + name.replace("_", "-"), **_option(name, spec, getattr(defaults, name)))


def _option(name: str, spec: Param, default) -> dict:
    """``add_argument``'s keywords for one declared field."""
    text = spec.help.replace("%", "%%")
    if bool in spec.constraints:
        return {"action": argparse.BooleanOptionalAction, "default": default,
                "help": f"{text} (default: {'on' if default else 'off'})"}
    options, interval = options_of(spec.constraints), interval_of(spec.constraints)
    option = {"metavar": FIT_METAVARS.get(name), "help": text, "default": default}
    if spec.is_tuple:  # a comma-separated list on the command line
        option.update(default=",".join(default), help=f"{text} Comma-separated.")
    elif options and interval is None and str not in spec.constraints:
        option["choices"] = options
    elif options:  # a number or a keyword, e.g. gamma
        option["type"] = lambda typed: parse(name, typed, spec.constraints, error=argparse.ArgumentTypeError)
    elif interval is not None:
        option["type"] = interval.kind
    notes = [describe(spec.constraints)] if interval is not None else []
    if option["default"] not in (None, ""):
        notes.append("default: %(default)s")
    if notes:
        option["help"] += f" ({'; '.join(notes)})"
    return option


def _config_from_args(args: argparse.Namespace) -> FitConfig:
    """The validated :class:`FitConfig` of ``fit``'s options (:func:`_add_config_options`)."""
    values = {name: getattr(args, name) for name in FIT_PARAMS}
    for name, spec in FIT_PARAMS.items():
        if spec.is_tuple:
            values[name] = tuple(part.strip() for part in values[name].split(",") if part.strip())
    return FitConfig(**values).validate()


def _add_engine_options(command: argparse.ArgumentParser, work: str) -> None:
    command.add_argument("--engine", choices=("local", "ray"), default="local",
                         help=f"where {work} run: in this process (local, default) or on a Ray cluster (ray; "
                         "needs pip install 'refinery[distributed]'; data and run folders at the same path on "
                         "every node; see docs/ray.md)")
    command.add_argument("--address", metavar="ADDR",
                         help="with --engine ray: the cluster to join, 'auto' (the one this machine belongs to), "
                         "HOST:PORT or ray://HOST:PORT; default: start a Ray instance on this machine")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "fit":
            _fit(args)
        elif args.command == "score":
            _score(args)
        elif args.command == "explain":
            _explain(args)
        elif args.command == "export":
            _export(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "demo":
            _demo(args)
        else:
            _runs()
    except (Cancelled, KeyboardInterrupt):
        print("refinery: interrupted", file=sys.stderr)
        return 130
    except RefineryError as error:
        print(f"refinery: error: {error}", file=sys.stderr)
        return 1
    return 0


def _fit(args: argparse.Namespace) -> None:
    config = _config_from_args(args)
    if ddp.launched_by_torchrun() and config.objective == "none":
        raise ConfigError("torchrun started several processes, but objective 'none' (frozen pretrained features) "
                          "has nothing to train; choose a self-supervised --objective, or run without torchrun")
    with ddp.torchrun_process_group(config.device):
        if not ddp.is_main():
            _fit_alongside_main(args, config)
            return
        dataset = engine.load_data(args.data, **config.column_choice().load_kwargs())
        _report_skipped(dataset)
        _report_choices(config, engine.suggested_config(dataset, config))
        with _ProgressBar() as monitor, _compute(args) as compute:
            result = engine.fit(dataset, config, args.out, resume=args.resume, monitor=monitor, compute=compute)
    for record in result.rounds:
        print(record.note)
    flagged = int(result.scores.is_anomaly.sum())
    print(f"fitted {len(dataset)} {dataset.kind} samples; kept {int(result.kept.sum())} after "
          f"{len(result.rounds)} refinement round(s); "
          f"{describe_contamination(result.contamination, result.contamination_interval)}")
    if dataset.kind == "images":
        print(f"image score: {result.image_score.describe()}")
    print(f"{flagged} flagged at threshold {result.scores.threshold:.4g}, which "
          f"{engine.threshold_meaning(config.false_alarm_rate)}")
    if result.metrics:
        m = result.metrics
        print(f"training-set metrics (labels used for evaluation only): AUROC {m.auroc:.4f}  AP {m.ap:.4f}  F1 {m.f1:.4f}")
    print(f"run saved to {result.run_dir}")


def _fit_alongside_main(args: argparse.Namespace, config: FitConfig) -> None:
    """A torchrun process of rank > 0: take part in every training step of the fit that rank 0 saves.

    It runs the same fit into a temporary folder, with a temporary registry and workspace, all
    deleted afterwards (also when torchrun stops it with SIGTERM), and prints nothing but errors.
    Training resumes from rank 0's checkpoints.
    """
    logging.getLogger().setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    with tempfile.TemporaryDirectory(prefix="refinery-ddp-") as scratch:
        scratch = Path(scratch)
        dataset = engine.load_data(args.data, **config.column_choice().load_kwargs(), workspace=scratch / "workspace")
        engine.fit(dataset, config, scratch / "run", registry=Registry(scratch / "registry.sqlite"))


def _score(args: argparse.Namespace) -> None:
    run = engine.open_run(args.run_dir)
    roles = run.column_choice().load_kwargs() | ({"label_column": args.label_column} if args.label_column else {})
    dataset = engine.load_data(args.data, **roles, label_required=bool(args.label_column))
    _report_skipped(dataset)
    with _ProgressBar() as monitor, _compute(args) as compute:
        scores = run.score(dataset, monitor=monitor, compute=compute, maps=args.maps)
        atomic_write_text(args.out, scores.to_frame().to_csv(index=False))
        print(f"scored {len(dataset)} samples; {int(scores.is_anomaly.sum())} flagged; written to {args.out}")
    if args.maps:
        print(f"anomaly maps written to {args.maps}")
    metrics = scores.metrics()
    if metrics:
        print(f"metrics (labels used for evaluation only): AUROC {metrics.auroc:.4f}  AP {metrics.ap:.4f}  F1 {metrics.f1:.4f}")


def _compute(args: argparse.Namespace) -> AbstractContextManager[Compute]:
    """Where a fit or scoring runs (``--engine``, ``--address``), as a context manager that closes it."""
    if args.engine == "local":
        if args.address:
            raise ConfigError("--address is the Ray cluster of --engine ray; add --engine ray or drop --address")
        return nullcontext(LocalCompute())
    from core.distributed.ray_compute import RayCompute

    return RayCompute(address=args.address)


EXPLAIN_LEGEND = {
    "mahalanobis": "Each feature: the row's value against the typical range (5-95% of the kept training rows) and "
                   "IQRs from their median; share = the feature's part of the anomaly score (its term of the "
                   "Mahalanobis distance; the terms sum to the score, correlated features can cancel).",
    "robust_z": "Each feature: the row's value against the typical range (5-95% of the kept training rows) and "
                "IQRs from their median; share = the feature's part of the row's summed squared robust z-scores "
                "(how unusual each value is on its own; they do not sum to the detector's score).",
}
"""What the numbers of ``refinery explain`` mean, per attribution method."""


def _explain(args: argparse.Namespace) -> None:
    run = engine.open_run(args.run_dir)
    dataset = engine.load_data(args.data, **run.column_choice().load_kwargs(), label_required=False)
    if dataset.kind == "images":
        _explain_images(run, dataset, args)
        return
    ids = [part.strip() for part in args.ids.split(",") if part.strip()] if args.ids else None
    explanations = run.explain_rows(dataset, ids=ids, k=args.features)
    if ids is None:
        explanations = explanations[: args.top]
    rows = []
    if explanations:
        print(EXPLAIN_LEGEND[explanations[0].method])
    for explanation in explanations:
        print(f"row {explanation.id}: anomaly_score {explanation.anomaly_score:.4g}")
        for item in explanation.features:
            print(f"  {item.feature:24s} {item.describe():64s} share {item.share:6.1%}")
            rows.append({"id": explanation.id, "anomaly_score": explanation.anomaly_score, **asdict(item),
                         "description": item.describe()})
    if args.out:
        atomic_write_text(args.out, pd.DataFrame(rows).to_csv(index=False))
        print(f"written to {args.out}")


def _explain_images(run, dataset, args: argparse.Namespace) -> None:
    if args.out is None:
        raise ConfigError("explaining images writes maps: pass --out MAPS_DIR")
    with _ProgressBar() as monitor:
        write_maps(run.iter_gradcam_maps(dataset, method=args.method, monitor=monitor), args.out)
    print(f"{args.method} maps of {len(dataset)} images written to {args.out}")


def _export(args: argparse.Namespace) -> None:
    if args.table:
        table = export_table(args.run_dir, args.out)
        print(f"{len(table)} samples ({int(table['kept'].sum())} kept) written to {args.out}")
        return
    with _ProgressBar() as monitor:
        exported = export_kept(args.run_dir, args.out, monitor=monitor)
    print(exported.summary)


def _report(args: argparse.Namespace) -> None:
    with _ProgressBar() as monitor:
        out = write_report(args.run_dir, args.out, top=args.top, monitor=monitor)
    print(f"run report written to {out} ({out.stat().st_size / 1e6:.2f} MB); it opens offline in any browser")


def _runs() -> None:
    records = Registry().runs()
    if not records:
        print("no runs yet: start one with 'refinery fit DATA --out RUN_DIR'")
        return
    print(f"{'run_id':12}  {'status':9}  {'kind':6}  {'samples':>7}  {'AUROC':>6}  path")
    for record in records:
        auroc = record.metrics.get("auroc")
        auroc_text = f"{auroc:.4f}" if auroc is not None else "-"
        print(f"{record.run_id:12}  {record.status:9}  {record.kind or '-':6}  {record.n_samples or 0:>7}  {auroc_text:>6}  {record.path}")
        if record.status in ("failed", "cancelled") and record.message:
            print(f"{'':12}  why: {record.message}")


def _demo(args: argparse.Namespace) -> None:
    out = args.out or refinery_home() / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    dataset = engine.load_data(DEMO_DIR)
    config = engine.suggested_config(dataset)
    print(f"demo: {len(dataset)} Fashion-MNIST images from {DEMO_DIR} (sneakers, 10% other classes planted); "
          f"image size {config.image_size} px")
    with _ProgressBar() as monitor:
        result = engine.fit(dataset, config, out, monitor=monitor)
    for record in result.rounds:
        print(record.note)
    order = np.argsort(-result.scores.anomaly_score)[:10]
    print("ten most anomalous images (the folder name is the planted label):")
    for rank, index in enumerate(order, 1):
        print(f"  {rank:2d}. {dataset.ids[index]:40s} anomaly_score {result.scores.anomaly_score[index]:9.2f}")
    if result.metrics:
        print(f"AUROC {result.metrics.auroc:.4f}  AP {result.metrics.ap:.4f} (labels used for evaluation only)")
    print(f"run saved to {out}; score new images with: refinery score {out} FOLDER --out scores.csv")


def _report_choices(requested: FitConfig, resolved: FitConfig) -> None:
    """Print what each ``auto`` setting became for this data (the same choices as the studio's)."""
    chosen = [f"{name.replace('_', ' ')} {getattr(resolved, name)}" for name in FIT_PARAMS
              if getattr(requested, name) == "auto" and getattr(resolved, name) != "auto"]
    if chosen:
        print(f"settings chosen for this data (auto): {', '.join(chosen)}")


def _report_skipped(dataset) -> None:
    if dataset.skipped:
        names = ", ".join(f"{item.name} ({item.reason})" for item in dataset.skipped[:5])
        more = f" and {len(dataset.skipped) - 5} more" if len(dataset.skipped) > 5 else ""
        print(f"refinery: warning: skipped {len(dataset.skipped)} unreadable file(s): {names}{more}", file=sys.stderr)


class _ProgressBar:
    """A tqdm bar per stage on stderr, fed by engine progress events."""

    def __enter__(self) -> Monitor:
        """The monitor to hand the engine; ``REFINERY_HOLD_AT`` (see :func:`holding_at`) stops it at a point.

        Ctrl-C ends the work (KeyboardInterrupt), so the monitor holds no cancel token."""
        self._bar = None
        self._stage = None
        return Monitor(holding_at(self, os.environ.get(HOLD_AT_VARIABLE)))

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm import tqdm

        if event.stage != self._stage:
            self._close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total or None, desc=event.stage, unit="", file=sys.stderr, leave=False,
                             disable=None)
        self._bar.n = event.done
        self._bar.set_postfix_str(event.message, refresh=False)
        self._bar.refresh()

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


if __name__ == "__main__":
    sys.exit(main())
