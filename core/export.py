"""The refined data set of a run, taken away: every sample's outcome as a table, and the kept samples.

Refinement's product is also a cleaner training set for the user's own model. :func:`refined_table`
says what happened to each training sample (``refined.csv``); :func:`export_kept` writes the samples
kept after the last round, as a folder or a zip:

- images: the kept image files, byte for byte, at their ids (the path relative to the data folder,
  so a class-folder or MVTec layout survives), plus ``refined.csv``;
- tables: ``<table>-kept.csv``, the kept rows of the original table file with all its columns in
  their order (id, label and ignored columns included), plus ``refined.csv``.

The run is read through :class:`core.results.RunResults`; nothing is written outside the destination
(a zip is written atomically beside it, as every file of Refinery is).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import pandas as pd

from core.data.columns import ID, NO_LABEL, profile_columns, role_of
from core.data.dataset import IMAGES
from core.data.tables import ARRAY_LABEL_KEY, read_frame
from core.errors import DataError, RunError
from core.files import atomic_write_text, atomic_writer, disk_errors
from core.progress import QUIET, Monitor
from core.registry import Registry
from core.results import RunResults
from core.run_dir import saved_column_choice

REFINED_CSV = "refined.csv"
"""The outcome of every training sample (:func:`refined_table`), in every export."""
STAGE = "export"
"""Progress stage of :func:`export_kept`: one unit per file written."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_kept` wrote.

    Attributes
    ----------
    path : Path
        The folder or zip.
    kind : {"images", "table"}
    n_kept, n_samples : int
        Samples exported (kept after the last round) and training samples of the run.
    n_bytes : int
        Size of what was written (the zip's size; the files' total for a folder).
    """

    path: Path
    kind: str
    n_kept: int
    n_samples: int
    n_bytes: int

    @property
    def summary(self) -> str:
        """One line for the CLI and the studio."""
        what = "images" if self.kind == IMAGES else "rows"
        return (f"{self.n_kept} of {self.n_samples} {what} kept after refinement, "
                f"{size_text(self.n_bytes)}, written to {self.path}")


def size_text(n_bytes: int) -> str:
    """A file size in words: ``"12.3 MB"``, ``"45 kB"``."""
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{max(n_bytes / 1e3, 0.1):.1f} kB"


def refined_table(run: RunResults | Path | str, verdicts: dict[str, tuple[str, str]] | None = None) -> pd.DataFrame:
    """Every training sample of ``run`` with the outcome of refinement and the expert's verdict.

    Parameters
    ----------
    run : RunResults, or the run's folder
    verdicts : dict id -> (verdict, note), optional
        As :meth:`core.registry.Registry.verdicts` gives them (ids of other samples are ignored);
        None: every verdict on the run's data in the registry (the command line's view).

    Returns
    -------
    DataFrame, one row per training sample in run order, columns:

    ``id``
        The sample's id: for images its path relative to the data folder (POSIX separators; where it
        lies in an export of the kept samples), for tables the id column's value or the 0-based row.
    ``anomaly_score``
        The final detector's score (higher = more anomalous).
    ``is_anomaly``
        1 when ``anomaly_score`` is above the run's threshold, else 0.
    ``label``
        Only when the data had labels: 1 anomaly, 0 normal, -1 unknown (for evaluation only).
    ``kept``
        1 when the sample is in the refined set after the last round (the final detector trained
        on it), 0 when refinement removed it.
    ``round_removed``
        The round that last removed it; 0 for kept samples (also those that came back).
    ``votes``
        How many of the ``ensemble`` detectors called it anomalous in the round that removed it, or
        in the last round for kept samples; -1 where no detector judged it (a confirmed anomaly
        removed by the expert's verdict, or a run without refinement).
    ``verdict``, ``verdict_note``
        The expert's verdict (``normal``, ``anomaly``, ``unsure``) and note; empty where none.
    """
    results = run if isinstance(run, RunResults) else RunResults(run)
    if verdicts is None:
        verdicts = Registry().verdicts(results.fingerprint)
    frame = results.export_frame(verdicts)
    frame.insert(frame.columns.get_loc("round_removed") + 1, "votes", _deciding_votes(results))
    return frame


def _deciding_votes(results: RunResults) -> np.ndarray:
    """(N,) int: each sample's votes in the round that removed it, else in the last round (-1: not judged)."""
    if not results.rounds:
        return np.full(len(results.samples), -1, dtype=np.int64)
    votes = results.rounds[-1].votes.astype(np.int64)
    removed_in = results.samples["round_removed"].to_numpy()
    for record in results.rounds[:-1]:
        votes = np.where(removed_in == record.round, record.votes, votes)
    return votes


def export_table(run_dir: Path | str, out: Path | str, verdicts: dict[str, tuple[str, str]] | None = None) -> pd.DataFrame:
    """Write :func:`refined_table` as CSV to ``out`` (atomically; an existing file is replaced, as by
    ``refinery score``, unless it is the run's own data) and return it."""
    results = RunResults(run_dir)
    _check_outside_data(results, Path(out))
    table = refined_table(results, verdicts)
    atomic_write_text(Path(out), table.to_csv(index=False))
    return table


def export_kept(
    run_dir: Path | str,
    out: Path | str,
    *,
    verdicts: dict[str, tuple[str, str]] | None = None,
    monitor: Monitor = QUIET,
) -> Exported:
    """Write the samples kept after the last round, and ``refined.csv``, to the folder or zip ``out``.

    Parameters
    ----------
    run_dir : Path or str
        A finished run.
    out : Path or str
        A new or empty folder, or a new file ending in ``.zip`` (files are streamed into it, never
        held in memory). Built whole or not at all: on an error nothing is left behind.
    verdicts : dict id -> (verdict, note), optional
        For ``refined.csv`` (see :func:`refined_table`).
    monitor : Monitor
        Reports stage ``"export"`` after each file; checked between files.

    Raises
    ------
    RunError
        If ``out`` exists (a non-empty folder, a file), lies in the run's data folder, or the data
        folder or table was moved or deleted.
    DataError
        If an image id points outside the data folder or is not a plain relative path.
    """
    results = RunResults(run_dir)
    out = Path(out)
    table = refined_table(results, verdicts)
    kept = table["kept"].to_numpy().astype(bool)
    _check_source(results, out)
    if results.kind == IMAGES:
        names = [safe_member(sample_id) for sample_id in table["id"][kept]]
        files = [results.image_path(sample_id) for sample_id in table["id"][kept]]  # all checked before writing
        rows = None
    else:
        names, files = [], []
        rows = original_rows(results)[kept]
    with _destination(out) as sink:
        total = len(files) + 1 + (rows is not None)
        for done, (source, name) in enumerate(zip(files, names), start=1):
            monitor.check()
            sink.add_file(source, name)
            monitor.report(STAGE, done, total, name)
        if rows is not None:
            sink.add_frame(rows, f"{results.source.stem}-kept.csv")
        sink.add_frame(table, REFINED_CSV)
        monitor.report(STAGE, total, total, REFINED_CSV)
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return Exported(out, results.kind, int(kept.sum()), len(table), size)


def archive_name(run: RunResults, verdicts: dict[str, tuple[str, str]]) -> str:
    """The file name of ``run``'s kept-samples zip with ``verdicts``: the verdicts' digest is part of
    it, so a zip built before a verdict changed is not taken for the current one."""
    digest = hashlib.sha256(json.dumps(sorted(verdicts.items())).encode()).hexdigest()[:10]
    return f"{run.name}-kept-{digest}.zip"


def original_rows(results: RunResults) -> pd.DataFrame:
    """The run's training rows as its table file holds them (every column, in file order), one row per
    sample in run order. ``.npz`` / ``.mat``: the columns ``x0..`` of ``X`` and the label array."""
    source = results.source
    choice = saved_column_choice(results.info, results.config)
    if source.suffix.lower() in (".csv", ".parquet"):
        frame = read_frame(source)
        [id_name] = role_of(profile_columns(frame, **choice.load_kwargs()), ID) or [None]
        by_name = {str(column): column for column in frame.columns}  # a Parquet file may name columns by numbers
        file_ids = (frame[by_name[id_name]].astype(str).tolist() if id_name is not None
                    else [str(i) for i in range(len(frame))])
    else:
        from core.engine import run_dataset  # the engine imports the models: only this branch needs it

        dataset = run_dataset(results.run_dir)
        frame = dataset.table.copy()
        if dataset.labels is not None:
            labels = pd.Series(dataset.labels, dtype="Int8")
            frame[choice.label_column if choice.label_column not in (None, NO_LABEL) else ARRAY_LABEL_KEY] = (
                labels.where(labels >= 0))
        file_ids = list(dataset.ids)
    position = {sample_id: index for index, sample_id in enumerate(file_ids)}
    missing = [i for i in results.samples["id"] if i not in position]
    if missing:
        raise RunError(f"{len(missing)} of the run's samples (e.g. {missing[0]!r}) are no longer in {source}; "
                       "the table was changed: put back the file the run was fitted on")
    return frame.iloc[[position[i] for i in results.samples["id"]]].reset_index(drop=True)


def _check_outside_data(results: RunResults, out: Path) -> None:
    """RunError when writing ``out`` would change the run's data: its table file, or a path in its data folder."""
    source = results.source.resolve()
    if out.resolve() == source or out.resolve().is_relative_to(source):
        raise RunError(f"{out} is the run's data {'folder' if results.kind == IMAGES else 'file'} or inside it; "
                       "choose an --out elsewhere")


def safe_member(sample_id: str) -> str:
    """``sample_id`` as a path inside an export: relative, no ``..``, no drive; DataError otherwise."""
    path = PurePosixPath(sample_id.replace("\\", "/"))
    if not sample_id or path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        raise DataError(f"sample id {sample_id!r} is not a plain path inside the data folder; it cannot be exported")
    return path.as_posix()


def _check_source(results: RunResults, out: Path) -> None:
    """RunError when the run's data is gone, or ``out`` would write into it or exists already."""
    source = results.source
    if not (source.is_dir() if results.kind == IMAGES else source.is_file()):
        what = "data folder" if results.kind == IMAGES else "table"
        raise RunError(f"the run's {what} {source} is gone (moved or deleted); put it back at that path to export "
                       "its kept samples")
    _check_outside_data(results, out)
    if out.suffix.lower() == ".zip" and out.exists():
        raise RunError(f"{out} already exists; choose another --out or remove it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out} already exists and is not empty; choose another --out or remove it")


@contextmanager
def _destination(out: Path) -> Iterator["_Folder | _Zip"]:
    """Where the export's files go: a zip written atomically, or a folder removed again on an error."""
    if out.suffix.lower() == ".zip":
        with atomic_writer(out) as handle, zipfile.ZipFile(handle, "w", allowZip64=True) as archive:
            yield _Zip(archive)
        return
    created = not out.exists()
    with disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    try:
        with disk_errors(out):
            yield _Folder(out)
    except BaseException:
        for entry in out.iterdir():  # the folder was empty before
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if created:
            out.rmdir()
        raise


class _Folder:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _target(self, name: str) -> Path:
        target = (self.root / name).resolve()
        if not target.is_relative_to(self.root):  # safe_member makes this impossible; a last guard
            raise DataError(f"{name!r} would be written outside {self.root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_file(self, source: Path, name: str) -> None:
        shutil.copyfile(source, self._target(name))

    def add_frame(self, frame: pd.DataFrame, name: str) -> None:
        with open(self._target(name), "w", encoding="utf-8", newline="") as handle:
            frame.to_csv(handle, index=False)


class _Zip:
    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive

    def add_file(self, source: Path, name: str) -> None:
        """Streamed from the file; stored as is (image formats are compressed already)."""
        self.archive.write(source, name, compress_type=zipfile.ZIP_STORED)

    def add_frame(self, frame: pd.DataFrame, name: str) -> None:
        info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        with self.archive.open(info, "w", force_zip64=True) as member:
            with io.TextIOWrapper(member, encoding="utf-8", newline="") as text:
                frame.to_csv(text, index=False)
