"""The parts of an MVTec-layout folder (``train/good``, ``test/<defect>``): fit on one, score the other.

A folder with that layout loads as one data set (:func:`core.data.images.load_image_folder`); its
``train/`` part alone is what a fit on defect-free training images takes, and its ``test/`` part is
then new data for that run (:mod:`core.batches`). A part is a subset of the whole data set, with its
labels, masks and a fingerprint of its own.
"""
from __future__ import annotations

import numpy as np

from core.data.dataset import IMAGES, Dataset
from core.data.protocol import _mvtec_split
from core.errors import DataError

TRAIN_PART, TEST_PART = "train", "test"


def mvtec_parts(ids: list[str]) -> np.ndarray | None:
    """``"train"`` or ``"test"`` for each id of an MVTec-layout data set; None for any other ids."""
    try:
        return _mvtec_split(ids)
    except DataError:
        return None


def has_mvtec_layout(dataset: Dataset) -> bool:
    """Whether ``dataset`` was loaded from an MVTec-layout folder (every image under ``train/`` or ``test/``)."""
    return dataset.kind == IMAGES and mvtec_parts(dataset.ids) is not None


def mvtec_part(dataset: Dataset, part: str) -> Dataset:
    """The samples of an MVTec-layout ``dataset`` under ``part`` (``train`` or ``test``); DataError without
    that layout or part."""
    if part not in (TRAIN_PART, TEST_PART):
        raise DataError(f"an MVTec folder's part is {TRAIN_PART!r} or {TEST_PART!r}, not {part!r}")
    chosen = np.flatnonzero(_mvtec_split(dataset.ids) == part)
    if len(chosen) == 0:
        raise DataError(f"{dataset.source} has no image under {part}/")
    return dataset.subset(chosen)
