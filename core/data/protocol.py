"""Seeded contamination protocols that build a contaminated training set and a disjoint test set.

- :func:`srr_protocol` (STOC / SRR, arXiv 2106.06115): from a labelled pool of classes, training =
  a seeded subset of the normal classes plus anomalies drawn from the other classes so that anomalies
  make up ``anomaly_ratio`` of training; test = every other sample.
- :func:`softpatch_protocol` (SoftPatch, "no overlap" setting): from an MVTec-layout data set, a
  seeded share of the test anomalies is moved into training so that they make up ``ratio`` of it;
  the test set keeps the remaining images.

Counts: with ``n`` normal training samples the number of anomalies added is the integer ``a`` whose
share ``a / (n + a)`` is closest to the requested ratio (:func:`anomaly_count`); the share is exact
whenever ``ratio * n / (1 - ratio)`` is an integer (e.g. 900 normals at 10% -> 100 anomalies).
Both protocols keep at least one normal and one anomaly in the test set, so that test metrics are
defined, and raise :class:`~core.errors.DataError` when that is impossible.

The returned Datasets carry 0/1 anomaly labels (1 = anomaly) for metrics only; nothing trains on them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from core.data.dataset import IMAGES, Dataset
from core.data.tables import table_dataset
from core.errors import ConfigError, DataError

DEFAULT_TRAIN_NORMAL_SHARE = 0.8
"""Share of the normal samples put in training by :func:`srr_protocol` when not given."""


@dataclass(frozen=True, eq=False)
class ProtocolSplit:
    """A contaminated training set and a disjoint test set built from one source data set.

    Attributes
    ----------
    train, test : Dataset
        Subsets of the source with 0/1 anomaly labels.
    train_indices, test_indices : (M,) int64 arrays
        Positions of their samples in the source, sorted ascending (the Datasets follow this order).
    description : str
        One line saying what was built, for logs and reports.
    """

    train: Dataset
    test: Dataset
    train_indices: np.ndarray
    test_indices: np.ndarray
    description: str


def anomaly_count(n_normal: int, ratio: float) -> int:
    """Anomalies to add to ``n_normal`` normals so that they make up ``ratio`` of the total.

    Returns the integer ``a >= 0`` whose share ``a / (n_normal + a)`` is closest to ``ratio``
    (the smaller on a tie).
    """
    _check_ratio(ratio)
    if ratio == 0 or n_normal == 0:
        return 0
    exact = ratio * n_normal / (1.0 - ratio)
    low = math.floor(exact)
    candidates = [c for c in (low, low + 1) if c >= 0]
    return min(candidates, key=lambda a: (abs(a / (n_normal + a) - ratio), a))


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"anomaly ratio must be in [0, 1), got {ratio}")


def _as_dataset(data: Dataset | np.ndarray | pd.DataFrame) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, pd.DataFrame):
        return table_dataset(data, Path("in-memory"))
    array = np.asarray(data)
    if array.ndim == 2:
        return table_dataset(pd.DataFrame(array, columns=[f"x{j}" for j in range(array.shape[1])]),
                             Path("in-memory"))
    raise DataError(f"an array of shape {array.shape} is not a table; write images to files first "
                    "with core.data.materialize_images and pass the returned Dataset")


def _class_array(dataset: Dataset, class_labels: np.ndarray | Mapping[str, int]) -> np.ndarray:
    if isinstance(class_labels, Mapping):
        missing = [i for i in dataset.ids if i not in class_labels]
        if missing:
            raise DataError(f"no class label for {len(missing)} sample(s), e.g. {missing[0]!r}")
        return np.array([class_labels[i] for i in dataset.ids])
    classes = np.asarray(class_labels)
    if classes.shape != (len(dataset),):
        raise DataError(f"class labels have shape {classes.shape}; expected ({len(dataset)},), "
                        "one per sample in the data set's order")
    return classes


def _finish(dataset: Dataset, anomaly: np.ndarray, train: np.ndarray, test: np.ndarray,
            description: str) -> ProtocolSplit:
    train = np.sort(train).astype(np.int64)
    test = np.sort(test).astype(np.int64)
    return ProtocolSplit(
        train=replace(dataset.subset(train), labels=anomaly[train]),
        test=replace(dataset.subset(test), labels=anomaly[test]),
        train_indices=train,
        test_indices=test,
        description=description,
    )


def srr_protocol(
    data: Dataset | np.ndarray | pd.DataFrame,
    class_labels: np.ndarray | Mapping[str, int],
    normal_classes: int | Iterable[int],
    anomaly_ratio: float,
    n_train_normal: int | None = None,
    seed: int = 0,
) -> ProtocolSplit:
    """Build the SRR contamination protocol from a class-labelled pool.

    Parameters
    ----------
    data : Dataset, (N, D) array or DataFrame
        The pool. Arrays and frames become a table Dataset; images must be files
        (see :func:`core.data.materialize_images`).
    class_labels : (N,) array or mapping id -> class
        Class of each sample, aligned with ``data`` (array) or keyed by id (mapping).
    normal_classes : int or iterable of int
        Classes that are normal; every other class is an anomaly.
    anomaly_ratio : float in [0, 1)
        Share of anomalies in training (see :func:`anomaly_count` for the integer count).
    n_train_normal : int, optional
        Normal samples in training; default 80% of the normals (floor), keeping at least one for
        the test set.
    seed : int
        Seeds every draw; same seed, same split.

    Returns
    -------
    ProtocolSplit
        ``train`` (normals + anomalies), ``test`` (all other samples), 0/1 anomaly labels.

    Raises
    ------
    DataError
        If there are too few normals or anomalies for the requested sizes.
    ConfigError
        If ``anomaly_ratio`` is outside [0, 1) or ``n_train_normal`` is negative.
    """
    dataset = _as_dataset(data)
    classes = _class_array(dataset, class_labels)
    normal_set = [normal_classes] if np.isscalar(normal_classes) else list(normal_classes)
    anomaly = (~np.isin(classes, normal_set)).astype(np.int8)
    normals = np.flatnonzero(anomaly == 0)
    pool = np.flatnonzero(anomaly == 1)
    if len(normals) < 2:
        raise DataError(f"{len(normals)} sample(s) of normal classes {normal_set}; "
                        "need at least 2 (one for training, one for the test set)")
    if n_train_normal is None:
        n_train_normal = min(int(DEFAULT_TRAIN_NORMAL_SHARE * len(normals)), len(normals) - 1)
        n_train_normal = max(n_train_normal, 1)
    if n_train_normal < 1:
        raise ConfigError(f"n_train_normal must be at least 1, got {n_train_normal}")
    if n_train_normal > len(normals) - 1:
        raise DataError(f"n_train_normal={n_train_normal} but there are {len(normals)} normal samples; "
                        "use at most one less, so the test set keeps a normal sample")
    n_anomalies = anomaly_count(n_train_normal, anomaly_ratio)
    if n_anomalies > len(pool) - 1:
        raise DataError(f"{n_anomalies} anomalies needed for a ratio of {anomaly_ratio} with "
                        f"{n_train_normal} normals, but only {len(pool)} exist (one must stay in the test set); "
                        "lower the ratio or n_train_normal")
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(normals, n_train_normal, replace=False),
                            rng.choice(pool, n_anomalies, replace=False)])
    test = np.setdiff1d(np.arange(len(dataset)), train)
    n_train = n_train_normal + n_anomalies
    description = (
        f"SRR protocol: normal classes {normal_set}; train {n_train_normal} normal + {n_anomalies} anomalous "
        f"({n_anomalies / n_train:.2%} anomalies, requested {anomaly_ratio:.2%}); "
        f"test {len(normals) - n_train_normal} normal + {len(pool) - n_anomalies} anomalous; seed {seed}"
    )
    return _finish(dataset, anomaly, train, test, description)


def _mvtec_split(ids: list[str]) -> np.ndarray:
    """"train" or "test" for each id of an MVTec-layout Dataset (ids may share one leading folder)."""
    parts = [PurePosixPath(i).parts for i in ids]
    for offset in (0, 1):
        if all(len(p) > offset + 1 and p[offset] in ("train", "test") for p in parts) and \
                len({p[:offset] for p in parts}) == 1:
            return np.array([p[offset] for p in parts])
    raise DataError("the data set does not have the MVTec layout (ids under train/ and test/); "
                    "load a folder with train/good and test/<defect> sub-folders")


def softpatch_protocol(dataset: Dataset, ratio: float, seed: int = 0) -> ProtocolSplit:
    """Move a seeded share of an MVTec data set's test anomalies into its training set.

    Parameters
    ----------
    dataset : Dataset
        Loaded from an MVTec-layout folder (labels required): ``train/good`` and ``test/<defect>``.
    ratio : float in [0, 1)
        Share of anomalies in the new training set; the number moved is
        ``anomaly_count(len(train/good), ratio)``, drawn uniformly over all defect types.
    seed : int
        Seeds the draw; same seed, same split.

    Returns
    -------
    ProtocolSplit
        ``train`` = train/good + moved anomalies; ``test`` = the remaining test images (no overlap).

    Raises
    ------
    DataError
        If the data set has no labels, is not MVTec-shaped, or has too few test anomalies
        (at least one stays in the test set).
    """
    _check_ratio(ratio)
    if dataset.kind != IMAGES or dataset.labels is None:
        raise DataError("softpatch_protocol needs a labelled image data set in the MVTec layout")
    split = _mvtec_split(dataset.ids)
    labels = dataset.labels
    train_good = np.flatnonzero(split == "train")
    test_anomalies = np.flatnonzero((split == "test") & (labels == 1))
    if len(train_good) == 0:
        raise DataError("the data set has no train/good image to contaminate")
    n_move = anomaly_count(len(train_good), ratio)
    if n_move > len(test_anomalies) - 1:
        raise DataError(f"{n_move} test anomalies needed for a ratio of {ratio} with {len(train_good)} "
                        f"training images, but only {len(test_anomalies)} exist (one must stay in the test set); "
                        "lower the ratio")
    rng = np.random.default_rng(seed)
    moved = rng.choice(test_anomalies, n_move, replace=False)
    train = np.concatenate([train_good, moved])
    test = np.setdiff1d(np.flatnonzero(split == "test"), moved)
    description = (
        f"SoftPatch protocol: train {len(train_good)} good + {n_move} moved test anomalies "
        f"({n_move / len(train):.2%} anomalies, requested {ratio:.2%}); "
        f"test {int(np.sum(labels[test] == 0))} normal + {int(np.sum(labels[test] == 1))} anomalous; seed {seed}"
    )
    return _finish(dataset, labels, train, test, description)


def contaminate(dataset: Dataset, anomaly_ratio: float, seed: int = 0) -> ProtocolSplit:
    """:func:`srr_protocol` on a data set labelled normal (0) / anomaly (1), e.g. good/ and other/ folders.

    Training gets 80% of the normals plus anomalies making up ``anomaly_ratio`` of it; every sample
    must be labelled (unknown labels cannot be placed on either side).
    """
    if dataset.labels is None or np.any(dataset.labels < 0):
        raise DataError("a contamination protocol needs every sample labelled normal or anomaly "
                        "(e.g. folders good/ and other/); this data has unlabelled samples")
    return srr_protocol(dataset, dataset.labels, normal_classes=0, anomaly_ratio=anomaly_ratio, seed=seed)
