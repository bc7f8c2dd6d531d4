"""Image folders: recursive scan, cheap validation, layout rules for labels and masks.

Layout rules, applied by :func:`load_image_folder` in this order:

1. **Scan.** Files with a suffix in :data:`IMAGE_SUFFIXES` (any case), found recursively under the
   root, in sorted order; hidden files and folders (name starting with ``.``) and ``__MACOSX`` are
   skipped, symbolic links to folders are not followed. Other files are ignored.
2. **Masks are not samples.** A file whose stem ends in ``_mask`` is a mask; it is attached to the
   image with the same stem without ``_mask`` in the same folder, when there is exactly one.
3. **Sibling masks** (Magnetic Tile Defects layout: ``X.jpg`` beside its pixel mask ``X.png``). A
   ``.png`` is taken as the mask of the ``.jpg``/``.jpeg`` with the same stem in the same folder only
   when it is single-channel (mode ``1`` or ``L``), has the same size, and at least
   :data:`SIBLING_MASK_EXTREME_SHARE` of its pixels are near black or near white (within 16 levels
   of 0 or 255: a binary mask, possibly with soft edges). Anything else keeps both files as samples.
4. **MVTec AD layout.** When the root, or the single visible sub-folder of the root, holds
   ``train/good`` and ``test/``: samples are ``train/good/**`` and ``test/**``; ``train/good`` and
   ``test/good`` are normal (0), any other ``test/<defect>`` is anomalous (1), files directly in
   ``test/`` are unknown (-1); ``ground_truth/<defect>/<stem>_mask.<ext>`` is attached to
   ``test/<defect>/<stem>.<ext>``. Other folders (``ground_truth``, ``validation``...) give no samples.
5. **Plain folders.** Labels exist only when a top-level sub-folder is named ``good``, ``normal`` or
   ``ok`` (any case): that folder is normal (0), every other top-level folder anomalous (1), images
   directly at the top level unknown (-1). When the root holds no image itself and exactly one
   visible sub-folder (a zip usually wraps its content in one folder), "top level" means inside that
   sub-folder. Otherwise there are no labels.

ids are POSIX paths relative to the root the caller gave.

Each image is checked and read by :mod:`core.data.decode` (size limits, any PIL mode). Anything that
is not a regular file (a named pipe would block the reader for ever) is skipped.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from core.data.dataset import IMAGES, Dataset, SkippedFile
from core.data.decode import image_shape, open_image, probe_image
from core.data.fingerprint import fingerprint_files
from core.errors import DataError
from core.progress import QUIET, Monitor

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""Suffixes (lower case; matched case-insensitively) of the files taken as images."""

MASK_STEM_SUFFIX = "_mask"
"""A file whose stem ends with this is a mask, never a sample."""

NORMAL_FOLDER_NAMES = frozenset({"good", "normal", "ok"})
"""Top-level folder names (case-insensitive) that mark normal images in a plain folder."""

SIBLING_MASK_EXTREME_SHARE = 0.9
"""Share of near-black/near-white pixels a sibling ``.png`` needs to be taken as a mask."""

_CHUNK = 256  # files checked per chunk of work queued on the thread pool
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_IGNORED_DIRS = frozenset({"__MACOSX"})


def is_image_file(path: Path | str) -> bool:
    """Whether ``path`` has an image suffix (see :data:`IMAGE_SUFFIXES`)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def largest_image_side(dataset: Dataset, samples: int = 16) -> int | None:
    """The longest side, in pixels, of ``samples`` images spread evenly over ``dataset`` (read from their
    headers); None for a table or an empty data set. What ``image_size="auto"`` is resolved from."""
    if dataset.kind != IMAGES or not dataset.paths:
        return None
    step = max(1, len(dataset.paths) // samples)
    return max(max(image_shape(path)) for path in dataset.paths[::step])


def _looks_like_mask(mask_path: Path, image_path: Path) -> bool:
    """Whether ``mask_path`` is a binary-ish single-channel map of ``image_path``'s size."""
    try:
        with open_image(mask_path) as mask, open_image(image_path) as image:
            if mask.mode not in ("1", "L") or mask.size != image.size:
                return False
            histogram = mask.convert("L").histogram()
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a mask
        return False
    extreme = sum(histogram[:17]) + sum(histogram[239:])
    return extreme >= SIBLING_MASK_EXTREME_SHARE * sum(histogram)


def _scan(root: Path) -> tuple[list[str], int]:
    """Image ids under ``root`` (sorted) and the number of visible files of any kind."""
    ids: list[str] = []
    n_files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _IGNORED_DIRS)
        relative = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith("."):
                continue
            n_files += 1
            if is_image_file(name):
                ids.append((relative / name).as_posix())
    return sorted(ids), n_files


def _is_mask_id(sample_id: str) -> bool:
    return PurePosixPath(sample_id).stem.endswith(MASK_STEM_SUFFIX)


def _mvtec_root(root: Path) -> Path | None:
    """``root`` or its single visible sub-folder when it has the MVTec ``train/good`` + ``test`` layout."""

    def has_layout(folder: Path) -> bool:
        return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()

    if has_layout(root):
        return root
    subfolders = _visible_subfolders(root)
    if len(subfolders) == 1 and has_layout(subfolders[0]):
        return subfolders[0]
    return None


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in _IGNORED_DIRS)


def _by_stem(ids: list[str]) -> dict[tuple[str, str], list[str]]:
    """Group ids by (folder, stem)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for sample_id in ids:
        path = PurePosixPath(sample_id)
        groups[(str(path.parent), path.stem)].append(sample_id)
    return groups


def _attach_stem_masks(samples: list[str], mask_ids: list[str]) -> dict[str, str]:
    """Attach each ``X_mask.*`` to the single sample ``X.*`` in the same folder."""
    by_key = _by_stem(samples)
    masks: dict[str, str] = {}
    for mask_id in mask_ids:
        path = PurePosixPath(mask_id)
        owners = by_key.get((str(path.parent), path.stem[: -len(MASK_STEM_SUFFIX)]), [])
        if len(owners) == 1:
            masks[owners[0]] = mask_id
    return masks


def _sibling_pairs(samples: list[str]) -> list[tuple[str, str]]:
    """(jpeg id, png id) pairs with the same stem in the same folder."""
    pairs = []
    for members in _by_stem(samples).values():
        jpegs = [m for m in members if PurePosixPath(m).suffix.lower() in _JPEG_SUFFIXES]
        pngs = [m for m in members if PurePosixPath(m).suffix.lower() == ".png"]
        if len(jpegs) == 1 and len(pngs) == 1:
            pairs.append((jpegs[0], pngs[0]))
    return pairs


def _mvtec_layout(
    samples: list[str], mask_ids: list[str], prefix: tuple[str, ...]
) -> tuple[list[str], dict[str, int], dict[str, str]]:
    """Samples, labels and ground-truth masks of an MVTec folder whose ids start with ``prefix``."""
    kept: list[str] = []
    labels: dict[str, int] = {}
    for sample_id in samples:
        parts = PurePosixPath(sample_id).parts
        if parts[: len(prefix)] != prefix:
            continue
        rest = parts[len(prefix):]
        if len(rest) >= 3 and rest[0] == "train" and rest[1] == "good":
            labels[sample_id] = 0
        elif len(rest) >= 2 and rest[0] == "test":
            labels[sample_id] = -1 if len(rest) == 2 else int(rest[1].lower() != "good")
        else:
            continue
        kept.append(sample_id)
    ignored = len(samples) - len(kept)
    if ignored:
        logger.info("MVTec layout: %d image(s) outside train/good and test/ ignored", ignored)
    truth: dict[tuple[str, ...], str] = {}
    for mask_id in mask_ids:
        parts = PurePosixPath(mask_id).parts
        rest = parts[len(prefix):] if parts[: len(prefix)] == prefix else ()
        if len(rest) >= 3 and rest[0] == "ground_truth":
            stem = PurePosixPath(rest[-1]).stem[: -len(MASK_STEM_SUFFIX)]
            truth[tuple(rest[1:-1]) + (stem,)] = mask_id
    masks: dict[str, str] = {}
    for sample_id in kept:
        rest = PurePosixPath(sample_id).parts[len(prefix):]
        if rest[0] == "test" and len(rest) >= 3:
            key = tuple(rest[1:-1]) + (PurePosixPath(rest[-1]).stem,)
            if key in truth:
                masks[sample_id] = truth[key]
    return kept, labels, masks


def _plain_labels(root: Path, samples: list[str]) -> dict[str, int] | None:
    """Labels from a top-level good/normal/ok folder, or None (see the module docstring)."""
    prefix: tuple[str, ...] = ()
    subfolders = _visible_subfolders(root)
    if len(subfolders) == 1 and not any(len(PurePosixPath(s).parts) == 1 for s in samples):
        prefix = (subfolders[0].name,)
    tops: dict[str, str | None] = {}
    for sample_id in samples:
        rest = PurePosixPath(sample_id).parts[len(prefix):]
        tops[sample_id] = rest[0] if len(rest) >= 2 else None
    if not any(top is not None and top.lower() in NORMAL_FOLDER_NAMES for top in tops.values()):
        return None
    return {sample_id: -1 if top is None else int(top.lower() not in NORMAL_FOLDER_NAMES)
            for sample_id, top in tops.items()}


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def load_image_folder(
    root: Path | str,
    *,
    monitor: Monitor = QUIET,
) -> Dataset:
    """Load a folder of images (searched recursively) as an image :class:`Dataset`.

    Parameters
    ----------
    root : Path or str
        The folder; ids are relative to it. See the module docstring for the layout rules
        (MVTec AD, good/normal/ok folders, ``_mask`` files, sibling ``.png`` masks).
    monitor : Monitor
        Receives ``("load", images_checked, images_total)`` while images are validated, and is
        checked between chunks of images.

    Returns
    -------
    Dataset
        ``kind="images"``, with ``paths``, ``labels`` (or None), ``masks`` and ``skipped``
        (unreadable files with the reason; they are logged as one warning).

    Raises
    ------
    DataError
        If the folder does not exist, is empty, holds no image file or no readable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder of images, a .zip or a table")
    ids, n_files = _scan(root)
    if n_files == 0:
        raise DataError(f"{root} is empty; add images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not ids:
        raise DataError(f"no image files in {root} ({n_files} other files); "
                        f"supported suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}")

    samples = [i for i in ids if not _is_mask_id(i)]
    mask_ids = [i for i in ids if _is_mask_id(i)]
    masks: dict[str, str] = {}
    pairs = _sibling_pairs(samples)
    is_mask = [flag for _, flags in _map_in_chunks(lambda p: _looks_like_mask(root / p[1], root / p[0]), pairs)
               for flag in flags]
    sibling_masks = {png: jpeg for (jpeg, png), flag in zip(pairs, is_mask) if flag}
    if sibling_masks:
        logger.info("%d .png file(s) taken as masks of the .jpg beside them", len(sibling_masks))
        samples = [s for s in samples if s not in sibling_masks]
        masks.update({jpeg: png for png, jpeg in sibling_masks.items()})
    masks.update(_attach_stem_masks(samples, mask_ids))

    mvtec = _mvtec_root(root)
    label_of: dict[str, int] | None
    if mvtec is not None:
        prefix = mvtec.relative_to(root).parts
        samples, label_of, truth = _mvtec_layout(samples, mask_ids, prefix)
        masks.update(truth)
        logger.info("MVTec layout found at %s", mvtec)
    else:
        label_of = _plain_labels(root, samples)

    if not samples:
        raise DataError(f"no sample image in {root}: every image is a mask"
                        + (" or lies outside train/good and test/" if mvtec is not None else "")
                        + "; add the images themselves")
    kept, skipped = _validate(root, samples, monitor)
    if skipped:
        logger.warning("skipped %d unreadable image(s) in %s", len(skipped), root)
    if not kept:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise DataError(f"no readable image in {root} ({len(skipped)} files skipped: {reasons}); "
                        "replace or remove the damaged files")

    labels = None if label_of is None else np.array([label_of[i] for i in kept], dtype=np.int8)
    return image_dataset(root, kept, labels=labels, masks={i: root / masks[i] for i in kept if i in masks},
                         skipped=skipped)


def image_dataset(
    root: Path,
    ids: list[str],
    *,
    labels: np.ndarray | None = None,
    masks: dict[str, Path] | None = None,
    skipped: list[SkippedFile] | None = None,
) -> Dataset:
    """The image :class:`Dataset` of the files ``ids`` under ``root``, fingerprinted from their content.

    Parameters
    ----------
    root : Path
        The folder the ids are relative to; it becomes ``Dataset.source``.
    ids : list of str
        The images' POSIX paths relative to ``root``, in sample order.
    labels : (N,) int8 array, optional
        1 anomaly, 0 normal, -1 unknown; dropped when no label is known.
    masks : dict id -> Path, optional
        Ground-truth defect masks of the images that have one.
    skipped : list of SkippedFile, optional
        Files left out of ``ids``, with the reason.
    """
    if labels is not None and not np.any(labels >= 0):
        labels = None
    paths = [root / i for i in ids]
    return Dataset(
        kind=IMAGES,
        ids=ids,
        source=root,
        fingerprint=fingerprint_files(root, ids, paths),
        labels=labels,
        paths=paths,
        masks=masks or {},
        skipped=skipped or [],
    )


def _validate(
    root: Path, samples: list[str], monitor: Monitor
) -> tuple[list[str], list[SkippedFile]]:
    """Split ``samples`` into readable ids and skipped files, in order."""
    kept: list[str] = []
    skipped: list[SkippedFile] = []
    total = len(samples)
    for start, reasons in _map_in_chunks(lambda s: probe_image(root / s), samples, monitor):
        for sample_id, reason in zip(samples[start:start + _CHUNK], reasons):
            if reason is None:
                kept.append(sample_id)
            else:
                skipped.append(SkippedFile(sample_id, reason))
        monitor.report("load", min(start + _CHUNK, total), total, "checking images")
    return kept, skipped


def _map_in_chunks(function, items: list, monitor: Monitor = QUIET):
    """Yield ``(start, results)`` for ``items[start:start + _CHUNK]``, chunk by chunk, in order.

    The files are checked on :func:`_workers` threads; only one chunk is queued at a time, so
    memory does not grow with the number of files, and ``monitor`` is checked between chunks.
    """
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        for start in range(0, len(items), _CHUNK):
            monitor.check()
            yield start, list(pool.map(function, items[start:start + _CHUNK]))
