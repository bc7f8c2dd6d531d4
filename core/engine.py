"""The facade the app and the CLI call: load data, fit a run, open a run, score data.

A fit: encode the training data -> STOC refinement rounds -> final detector on the kept samples
-> anomaly scores, threshold and metrics -> run directory + registry entry. Labels, when present,
are used only for metrics; the fit itself never reads them.

The work lives in its own modules; this one gathers what a caller needs:

- :func:`load_data`, :func:`suggested_config`, :func:`run_dataset` (here);
- :func:`fit` and :func:`fit_work` (:mod:`core.pipeline`), which return a :class:`FitResult`;
- :func:`refine_and_fit` on embeddings (:mod:`core.decision`);
- :func:`open_run` and :class:`RunModel` to score new data (:mod:`core.run_model`);
- :class:`FitResult`, :func:`new_run_dir`, :func:`threshold_meaning` (:mod:`core.run_dir`);
- :func:`pinned_from_verdicts` (:mod:`core.refine`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from core.config import FitConfig
from core.data import Dataset, load_dataset
from core.data.images import largest_image_side
from core.decision import refine_and_fit
from core.errors import RunError
from core.pipeline import fit, fit_work
from core.progress import QUIET, Monitor
from core.refine import pinned_from_verdicts
from core.registry import refinery_home
from core.run_dir import FitResult, new_run_dir, read_config, read_info, read_samples, saved_column_choice, threshold_meaning
from core.run_model import RunModel, open_run

__all__ = [
    "FitResult", "RunModel", "fit", "fit_work", "load_data", "new_run_dir", "open_run", "pinned_from_verdicts",
    "refine_and_fit", "run_dataset", "suggested_config", "threshold_meaning",
]


def load_data(
    path: Path | str,
    *,
    label_column: str | None = None,
    id_column: str = "auto",
    ignore_columns: tuple[str, ...] = (),
    label_required: bool = True,
    workspace: Path | None = None,
    monitor: Monitor = QUIET,
) -> Dataset:
    """Load a folder, zip or table; archives are extracted under ``workspace`` (default: the Refinery home).

    ``label_column``, ``id_column`` and ``ignore_columns`` give a table's column roles (see
    :mod:`core.data.columns`; ``RunModel.column_choice()`` holds a run's). ``label_required=False``
    lets a table lack those columns (scoring new data with the run's roles).
    """
    workspace = Path(workspace) if workspace else refinery_home() / "workspace"
    return load_dataset(
        Path(path), workspace=workspace, label_column=label_column, id_column=id_column,
        ignore_columns=ignore_columns, label_required=label_required, monitor=monitor,
    )


def suggested_config(dataset: Dataset, base: FitConfig | None = None) -> FitConfig:
    """``base`` (default: the defaults) with every ``auto`` resolved for ``dataset``, as a fit would resolve
    it (:meth:`FitConfig.for_data`): what the Refine form offers first and ``refinery fit`` reports."""
    return (base or FitConfig()).for_data(dataset.kind, largest_image_side(dataset))


def run_dataset(run_dir: Path | str, *, workspace: Path | None = None) -> Dataset:
    """The training data of a saved run, in the run's sample order, with its labels and masks.

    Reloads the run's data source and keeps the run's samples (a run may have used a subset, e.g.
    a contamination protocol); fails clearly when the data moved or changed.
    """
    saved = read_info(Path(run_dir))
    frame = read_samples(Path(run_dir))
    dataset = load_data(saved["data_source"], label_required=False, workspace=workspace,
                        **saved_column_choice(saved, read_config(Path(run_dir))).load_kwargs())
    position = {sample_id: index for index, sample_id in enumerate(dataset.ids)}
    missing = [i for i in frame["id"] if i not in position]
    if missing:
        raise RunError(f"{len(missing)} of the run's samples (e.g. {missing[0]}) are no longer in "
                       f"{saved['data_source']}; the data was moved or changed")
    indices = np.array([position[i] for i in frame["id"]], dtype=np.int64)
    # A run on the whole data set keeps its fingerprint, so a re-run on it compares with this run.
    subset = dataset if np.array_equal(indices, np.arange(len(dataset))) else dataset.subset(indices)
    if "label" in frame:
        subset = replace(subset, labels=frame["label"].to_numpy().astype(np.int8))
    return subset
