"""A run report: one self-contained HTML file that a colleague opens offline, without the studio."""
from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

from core.data import IMAGES
from core.errors import ConfigError, RefineryError
from core.files import atomic_write_text
from core.progress import QUIET, Monitor
from core.registry import Registry
from core.report import sections
from core.report.markup import Html, join, tag
from core.results import RunResults

DEFAULT_TOP = 12
"""Most anomalous samples shown, with their images and maps (or their top features)."""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
padding:0 20px 40px;color:#222}
h1{margin:24px 0 4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:12px}.meta{color:#666}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}caption{text-align:left;font-weight:600;padding:4px 0}
table.facts th{display:none}table.settings td:nth-child(3){color:#555;font-size:12px;max-width:560px}
code{font-size:12px;overflow-wrap:break-word}.missing{color:#a33}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px;width:min-content}
.pictures{display:flex;gap:6px}
.card dl{display:grid;grid-template-columns:auto 1fr;gap:0 8px;margin:6px 0 0;font-size:12px}
.card dt{color:#666}.card dd{margin:0}.curves{display:flex;gap:16px}
ul.features{margin:0;padding-left:16px;font-size:12px}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""The page's Content-Security-Policy: it may load nothing but its own data: images and inline style, and
runs no script, so a hostile sample id that escaping missed could still neither run nor call out."""
SECTIONS = (("data", "Data"), ("settings", "Settings"), ("rounds", "Rounds"), ("scores", "Scores"),
            ("top", "Most anomalous"), ("verdicts", "Verdicts"), ("metrics", "Metrics"))


def report_html(
    run_dir: Path | str, *, top: int = DEFAULT_TOP, verdicts: dict[str, tuple[str, str]] | None = None,
    model=None, workspace: Path | None = None, monitor: Monitor = QUIET,
) -> str:
    """The run report of ``run_dir`` as one HTML page: images as ``data:`` URIs, style inline, no script.

    Parameters
    ----------
    run_dir : Path or str
        A finished run.
    top : int
        How many of the most anomalous samples to show with their images and anomaly maps (tables:
        their top features, for a run on the columns themselves).
    verdicts : dict, optional
        Sample id -> (verdict, note), as :meth:`core.registry.Registry.verdicts` gives them; default:
        every verdict the registry holds on the run's data.
    model : RunModel, optional
        The run's models, when the caller has them open (the studio caches them); opened here otherwise.
    workspace : Path, optional
        Where the run's data is reloaded for a table's feature explanations (see
        :func:`core.engine.run_dataset`); the studio passes its workspace.
    monitor : Monitor
        Progress of the anomaly maps (stage ``maps``) and cancellation.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError(f"top must be a whole number of samples, 0 or more; got {top!r}")
    run = RunResults(run_dir)
    if verdicts is None:
        verdicts = Registry().verdicts(run.fingerprint)
    if top and model is None:
        from core.run_model import RunModel  # torch: only a report with samples needs it

        model = RunModel(run.run_dir)
    dataset = None
    if top and run.kind != IMAGES and run.config.objective == "none":  # feature explanations read the rows
        dataset = _table_dataset(run.run_dir, workspace)
    monitor.check()
    body = [
        sections.data_section(run), sections.settings_section(run), sections.rounds_section(run),
        sections.scores_section(run), sections.samples_section(run, model, dataset, top, verdicts, monitor),
        sections.verdicts_section(run, verdicts), sections.metrics_section(run),
    ]
    return _page(run, body)


def write_report(
    run_dir: Path | str, out: Path | str, *, top: int = DEFAULT_TOP, verdicts: dict[str, tuple[str, str]] | None = None,
    model=None, workspace: Path | None = None, monitor: Monitor = QUIET,
) -> Path:
    """Write :func:`report_html` of ``run_dir`` to ``out`` (atomically); returns ``out``."""
    text = report_html(run_dir, top=top, verdicts=verdicts, model=model, workspace=workspace, monitor=monitor)
    atomic_write_text(Path(out), text)
    return Path(out)


def _table_dataset(run_dir: Path, workspace: Path | None):
    """A table run's training data, or None when it cannot be read again (the report then says so)."""
    from core.engine import run_dataset

    try:
        return run_dataset(run_dir, workspace=workspace)
    except RefineryError:
        return None


def _page(run: RunResults, body: list[Html]) -> str:
    try:
        version = metadata.version("refinery")
    except metadata.PackageNotFoundError:
        version = "unknown"
    heading = [
        tag("h1", f"Run report: {run.name}"),
        tag("p", f"Run id {run.run_id} · {run.config.detector} detector on {run.kind} · written "
                 f"{time.strftime('%Y-%m-%d %H:%M')} by Refinery {version}. anomaly_score: higher = more anomalous.",
            class_="meta"),
        tag("nav", [tag("a", title, href=f"#{anchor}") for anchor, title in SECTIONS]),
    ]
    head = join([Html('<meta charset="utf-8">'), Html(f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'),
                 Html('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                 tag("title", f"Refinery run report: {run.name}"), Html(f"<style>{CSS}</style>")])
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>{head}</head>\n<body>{join(heading + body)}</body>\n</html>\n'
