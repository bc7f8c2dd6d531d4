"""Built-in data sets: small labelled sets to try Refinery on, prepared once per workspace and seed.

Built-in data sets (:func:`builtin_sources`, :func:`prepare_builtin`) are small, labelled and
contaminated with 10% anomalies, so a user can try Refinery without data of their own:

- ``demo``: the bundled 300-image Fashion-MNIST folder (:data:`DEMO_DIR`), read in place.
- ``granite``: 216 defect-free + 24 defective granite tiles rendered from the seed
  (:mod:`core.data.textures`), each defective tile with its pixel mask: the set to try localization on.
- ``fashion-mnist``: 900 sneakers + 100 images of the nine other classes, drawn with the seed from
  Debian's Fashion-MNIST training split (``apt-get install dataset-fashion-mnist``).
- ``elpv``: 540 defect-free solar cells (defect probability 0) + 60 defective ones (probability at
  least 0.5) from the ELPV data set (``pip install elpv-dataset``, CC BY-NC-SA 4.0).
- ``digits``: 180 handwritten ones + 20 other digits from scikit-learn's ``load_digits``, as a csv
  table whose ``label`` column (1 = anomaly) is used for metrics only.

The training sets are drawn with :func:`~core.data.protocol.srr_protocol` (its training part), so a
seed gives the same set everywhere. Image sets are written as ``good/`` (normal) and ``other/``
(anomalies) sub-folders, which :func:`~core.data.images.load_image_folder` reads as labels (and a
``<name>_mask.png`` beside an image as its mask).
Each set is written once into ``<workspace>/builtin/<key>-<seed>``: first into a hidden temporary
folder that is renamed when complete, so a folder with the final name is always complete and is
reused as is.

Examples
--------
>>> source = next(s for s in builtin_sources() if s.key == "digits")                 # doctest: +SKIP
>>> path = prepare_builtin("digits", workspace, seed=0)                              # doctest: +SKIP
>>> data = load_dataset(path, workspace=workspace, label_column=source.label_column)  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from core.data import idx
from core.data.dataset import IMAGES, TABLE
from core.data.folders import new_folder, removed_on_error
from core.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist, materialize_images
from core.data.protocol import anomaly_count, srr_protocol
from core.data.textures import DEFECT_KINDS, TILE_SIZE, write_texture_set
from core.errors import ConfigError, DataError
from core.progress import QUIET, Monitor

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo" / "fashion-mnist-sneakers"
"""The bundled demo folder: 270 Fashion-MNIST sneakers (``good/``) + 30 other images (``other/``)."""

ANOMALY_RATIO = 0.1
"""Share of anomalies in every built-in data set."""

FASHION_MNIST_NORMAL_CLASS = FASHION_MNIST_CLASSES.index("Sneaker")
FASHION_MNIST_NORMALS = 900
"""Normal images (sneakers) in the ``fashion-mnist`` set; anomalies are added to make 10%."""

GRANITE_NORMALS = 216
"""Defect-free tiles in the ``granite`` set; defective tiles are added to make 10%."""

ELPV_NORMALS = 540
"""Defect-free cells in the ``elpv`` set; anomalies are added to make 10%."""

ELPV_ANOMALY_PROBABILITY = 0.5
"""ELPV cells with at least this defect probability are anomalies; those above 0 and below are dropped."""

DIGITS_NORMAL_CLASS = 1
DIGITS_NORMALS = 180
"""Normal rows (the digit 1) in the ``digits`` table; anomalies are added to make 10%."""

DIGITS_FILE = "digits.csv"
DIGITS_LABEL_COLUMN = "label"


@dataclass(frozen=True)
class BuiltinSource:
    """A built-in data set the user can pick instead of their own data.

    Attributes
    ----------
    key : str
        Identifier passed to :func:`prepare_builtin`: ``"demo"``, ``"granite"``, ``"fashion-mnist"``,
        ``"elpv"`` or ``"digits"``.
    title : str
        Short label for the UI.
    description : str
        What it is, its size and contamination, and its licence.
    kind : {"images", "table"}
    available : bool
        Whether it can be prepared on this machine.
    unavailable_reason : str
        ``""`` when available; otherwise what is missing and how to install it.
    label_column : str or None
        For tables, the column holding the 0/1 labels (pass it to ``load_dataset``); None for images.
    """

    key: str
    title: str
    description: str
    kind: str
    available: bool
    unavailable_reason: str
    label_column: str | None


_Builder = Callable[[Path, int, Monitor], None]
"""Writes a built-in set into an empty folder: ``build(folder, seed, monitor)``."""


@dataclass(frozen=True)
class _Recipe:
    """How to describe, check and build one built-in data set."""

    key: str
    title: str
    description: str
    kind: str
    label_column: str | None
    missing: Callable[[], str]
    """Returns ``""`` when the set can be prepared, else what is missing and how to get it."""
    build: _Builder | None
    """Writes the set into an empty folder; None for a folder read in place (the demo)."""
    entry: str = ""
    """The file inside the built folder to load; ``""`` loads the folder itself."""


# --------------------------------------------------------------------------------------- selection

def _training_draw(classes: np.ndarray, normal_class: int, n_normal: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and 0/1 labels of the SRR training set: ``n_normal`` normals + 10% anomalies."""
    pool = pd.DataFrame({"position": np.arange(len(classes))})
    split = srr_protocol(pool, classes, normal_class, ANOMALY_RATIO, n_train_normal=n_normal, seed=seed)
    logger.info("%s", split.description)
    return split.train_indices, split.train.labels


def _class_slug(name: str) -> str:
    return name.split("/")[0].lower().replace(" ", "-")


# ------------------------------------------------------------------------------------------ recipes

def _demo_missing() -> str:
    if DEMO_DIR.is_dir():
        return ""
    return f"the bundled demo folder {DEMO_DIR} is missing; run Refinery from a complete source checkout"


def _build_granite(folder: Path, seed: int, monitor: Monitor) -> None:
    write_texture_set(folder, GRANITE_NORMALS, anomaly_count(GRANITE_NORMALS, ANOMALY_RATIO), seed=seed,
                      monitor=monitor)


def _fashion_mnist_files() -> tuple[Path, Path]:
    root = Path(idx.FASHION_MNIST_DIR)
    return root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"


def _fashion_mnist_missing() -> str:
    if all(path.is_file() for path in _fashion_mnist_files()):
        return ""
    return (f"Fashion-MNIST is not installed ({idx.FASHION_MNIST_DIR} has no training files); "
            "run: apt-get install -y dataset-fashion-mnist")


def _build_fashion_mnist(folder: Path, seed: int, monitor: Monitor) -> None:
    monitor.report("prepare", 0, 0, "reading Fashion-MNIST")
    images, classes = load_fashion_mnist("train", root=idx.FASHION_MNIST_DIR)
    monitor.check()
    positions, labels = _training_draw(classes, FASHION_MNIST_NORMAL_CLASS, FASHION_MNIST_NORMALS, seed)
    ids = [f"good/{i:05d}.png" if label == 0
           else f"other/{_class_slug(FASHION_MNIST_CLASSES[classes[i]])}-{i:05d}.png"
           for i, label in zip(positions, labels)]
    materialize_images(images[positions], ids, folder, labels=labels, monitor=monitor)


def _elpv_labels_file() -> Path:
    """The label file of the installed ``elpv_dataset`` package (ImportError when not installed)."""
    utils = importlib.import_module("elpv_dataset.utils")
    # elpv_dataset.utils.load_dataset reads this same file, then decodes all 2,624 images (236 MB);
    # only the few hundred selected files are needed, and they are PNGs already, so they are copied.
    return Path(utils.__file__).resolve().parent / "data" / "labels.csv"


def _elpv_missing() -> str:
    try:
        labels_file = _elpv_labels_file()
    except ImportError:
        return "the ELPV data set is not installed; run: pip install elpv-dataset"
    if not labels_file.is_file():
        return (f"elpv-dataset is installed but its label file {labels_file} is missing; "
                "reinstall it: pip install --force-reinstall elpv-dataset")
    return ""


def _read_elpv_labels(labels_file: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Image paths (relative to the label file), defect probabilities and cell types."""
    paths: list[str] = []
    probabilities: list[float] = []
    types: list[str] = []
    reinstall = "reinstall it: pip install --force-reinstall elpv-dataset"
    for number, line in enumerate(labels_file.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        relative = PurePosixPath(fields[0]) if len(fields) == 3 else None
        if relative is None or relative.is_absolute() or ".." in relative.parts or relative.suffix.lower() != ".png":
            raise DataError(f"{labels_file} line {number} is not 'images/<name>.png <probability> <type>'; "
                            f"{reinstall}")
        try:
            probability = float(fields[1])
        except ValueError:
            raise DataError(f"{labels_file} line {number}: {fields[1]!r} is not a probability; {reinstall}") from None
        paths.append(relative.as_posix())
        probabilities.append(probability)
        types.append(re.sub(r"[^a-z0-9]+", "-", fields[2].lower()))
    return paths, np.asarray(probabilities), types


def _build_elpv(folder: Path, seed: int, monitor: Monitor) -> None:
    labels_file = _elpv_labels_file()
    paths, probabilities, types = _read_elpv_labels(labels_file)
    eligible = np.flatnonzero((probabilities == 0) | (probabilities >= ELPV_ANOMALY_PROBABILITY))
    classes = (probabilities[eligible] > 0).astype(np.int64)
    positions, labels = _training_draw(classes, 0, ELPV_NORMALS, seed)
    for done, (position, label) in enumerate(zip(eligible[positions], labels)):
        monitor.check()
        if done % 100 == 0:
            monitor.report("prepare", done, len(positions), "copying ELPV images")
        relative = PurePosixPath(paths[position])
        target = folder / ("good" if label == 0 else "other") / f"{types[position]}-{relative.name}"
        target.parent.mkdir(exist_ok=True)
        try:
            shutil.copyfile(labels_file.parent / relative, target)
        except OSError as exc:
            raise DataError(f"cannot copy the ELPV image {relative} ({exc}); check the workspace is writable, "
                            "or reinstall elpv-dataset if the image is missing") from exc
    monitor.report("prepare", len(positions), len(positions), "ELPV images copied")


def _build_digits(folder: Path, seed: int, monitor: Monitor) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits(as_frame=True)
    positions, labels = _training_draw(digits.target.to_numpy(), DIGITS_NORMAL_CLASS, DIGITS_NORMALS, seed)
    table = digits.data.iloc[positions].assign(**{DIGITS_LABEL_COLUMN: labels})
    monitor.check()
    table.to_csv(folder / DIGITS_FILE, index=False)
    monitor.report("prepare", 1, 1, "digits table written")


def _contamination(n_normal: int, what: str, normals: str, anomalies: str) -> str:
    """``"<total> <what>, drawn with the seed: <n> <normals> are normal and <a> <anomalies> (10%) are anomalies"``."""
    n_anomalies = anomaly_count(n_normal, ANOMALY_RATIO)
    return (f"{n_normal + n_anomalies:,} {what}, drawn with the seed: {n_normal:,} {normals} are normal and "
            f"{n_anomalies:,} {anomalies} ({ANOMALY_RATIO:.0%}) are anomalies")


_RECIPES = (
    _Recipe(
        key="demo",
        title="Demo: Fashion-MNIST sneakers (300 images)",
        description="300 Fashion-MNIST test images (28 x 28 grayscale) bundled with Refinery: 270 sneakers are "
                    "normal, 30 images of other classes (10%) are anomalies. MIT licence.",
        kind=IMAGES, label_column=None, missing=_demo_missing, build=None),
    _Recipe(
        key="granite",
        title="Granite tiles with defects and masks (240 images)",
        description=_contamination(GRANITE_NORMALS, f"granite tiles ({TILE_SIZE} x {TILE_SIZE} colour) rendered "
                                   "by Refinery (core.data.textures)", "defect-free tiles",
                                   f"tiles with one {', '.join(DEFECT_KINDS[:-1])} or {DEFECT_KINDS[-1]}")
                    + "; every defect has its pixel mask, so the anomaly maps can be checked. No outside data, "
                    "no licence terms.",
        kind=IMAGES, label_column=None, missing=lambda: "", build=_build_granite),
    _Recipe(
        key="fashion-mnist",
        title="Fashion-MNIST sneakers (1,000 images)",
        description=_contamination(FASHION_MNIST_NORMALS, "Fashion-MNIST training images (28 x 28 grayscale)",
                                   "sneakers", "images of the nine other classes")
                    + ". MIT licence.",
        kind=IMAGES, label_column=None, missing=_fashion_mnist_missing, build=_build_fashion_mnist),
    _Recipe(
        key="elpv",
        title="ELPV solar cells (600 images)",
        description=_contamination(ELPV_NORMALS, "electroluminescence images of solar cells (300 x 300 grayscale, "
                                   "ELPV data set)", "cells with defect probability 0",
                                   f"cells with probability {ELPV_ANOMALY_PROBABILITY:g} or more")
                    + "; cells in between are left out. Licence CC BY-NC-SA 4.0: non-commercial use only, "
                    "share alike, credit the authors (Buerhop-Lutz et al. 2018; Deitsch et al. 2019).",
        kind=IMAGES, label_column=None, missing=_elpv_missing, build=_build_elpv),
    _Recipe(
        key="digits",
        title="Handwritten digits table (200 rows)",
        description=_contamination(DIGITS_NORMALS, "rows of scikit-learn's 8 x 8 handwritten digits (64 pixel "
                                   "columns)", "ones", "other digits")
                    + f"; column '{DIGITS_LABEL_COLUMN}' marks them (1 = anomaly). From the UCI Optical "
                    "Recognition of Handwritten Digits data set, CC BY 4.0.",
        kind=TABLE, label_column=DIGITS_LABEL_COLUMN, missing=lambda: "", build=_build_digits,
        entry=DIGITS_FILE),
)
_RECIPE_BY_KEY = {recipe.key: recipe for recipe in _RECIPES}


# ------------------------------------------------------------------------------------ public API

def builtin_sources() -> list[BuiltinSource]:
    """The built-in data sets, with whether each can be prepared on this machine.

    Returns
    -------
    list of BuiltinSource
        ``demo``, ``granite``, ``fashion-mnist``, ``elpv``, ``digits``, in that order; availability is checked on
        every call (cheap: file checks and one import).
    """
    sources = []
    for recipe in _RECIPES:
        reason = recipe.missing()
        sources.append(BuiltinSource(key=recipe.key, title=recipe.title, description=recipe.description,
                                     kind=recipe.kind, available=not reason, unavailable_reason=reason,
                                     label_column=recipe.label_column))
    return sources


def prepare_builtin(
    key: str,
    workspace: Path | str,
    *,
    seed: int = 0,
    monitor: Monitor = QUIET,
) -> Path:
    """Write a built-in data set into the workspace once and return the path to load.

    Parameters
    ----------
    key : str
        One of the keys of :func:`builtin_sources`.
    workspace : Path or str
        The set is written into ``<workspace>/builtin/<key>-<seed>`` (created if missing). An
        existing folder of that name is complete by construction and is reused without rewriting.
        The demo is read in place from :data:`DEMO_DIR` and ignores ``workspace`` and ``seed``.
    seed : int
        Seeds the draw of normals and anomalies (a non-negative integer); same seed, same set.
    monitor : Monitor
        Receives the stages ``"prepare"`` and ``"materialize"`` while files are written, and is
        checked between files; a cancelled preparation leaves nothing behind.

    Returns
    -------
    Path
        An image folder with ``good/`` and ``other/`` sub-folders, or a csv table; load it with
        ``load_dataset(path, workspace=..., label_column=source.label_column)``.

    Raises
    ------
    ConfigError
        If ``key`` is unknown or ``seed`` is not a non-negative integer.
    DataError
        If the set is not available on this machine (the message says how to install it) or
        cannot be written.
    Cancelled
        If ``monitor`` was cancelled.
    """
    recipe = _RECIPE_BY_KEY.get(key)
    if recipe is None:
        raise ConfigError(f"unknown built-in data set {key!r}; choose one of {', '.join(_RECIPE_BY_KEY)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    reason = recipe.missing()
    if reason:
        raise DataError(f"built-in data set {key!r} is not available: {reason}")
    if recipe.build is None:
        return DEMO_DIR

    parent = Path(workspace) / "builtin"
    final = parent / f"{key}-{int(seed)}"
    entry = final / recipe.entry if recipe.entry else final
    if final.is_dir():
        logger.info("reusing the built-in data set %s", final)
        return entry
    scratch = new_folder(parent, f".{final.name}-", "a folder")
    with removed_on_error(scratch):
        try:
            recipe.build(scratch, int(seed), monitor)
        except OSError as exc:
            raise DataError(f"cannot write the built-in data set {key!r} into {parent} ({exc}); "
                            "check the workspace is writable and has free space") from exc
    try:
        os.rename(scratch, final)
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if not final.is_dir():
            raise DataError(f"cannot create {final} ({exc}); check the workspace is writable") from exc
        logger.info("built-in data set %s was prepared concurrently; using that copy", final)
    else:
        logger.info("prepared the built-in data set %r in %s", key, final)
    return entry
