"""One entry point that turns whatever the user gave (folder, zip, table) into a :class:`Dataset`."""
from __future__ import annotations

import logging
from pathlib import Path

from core.data.archive import extract_zip
from core.data.columns import AUTO, NO_LABEL
from core.data.dataset import Dataset
from core.data.folders import removed_on_error
from core.data.images import IMAGE_SUFFIXES, load_image_folder
from core.data.tables import TABLE_SUFFIXES, load_table
from core.errors import DataError
from core.progress import QUIET, Monitor

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = "a folder of images, a .zip of images, or a table (" + ", ".join(sorted(TABLE_SUFFIXES)) + ")"


def _looks_like_idx(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".gz") or ("idx" in name and "ubyte" in name)


def load_dataset(
    path: Path | str,
    *,
    workspace: Path | str,
    label_column: str | None = None,
    id_column: str = AUTO,
    ignore_columns: tuple[str, ...] | list[str] = (),
    label_required: bool = True,
    monitor: Monitor = QUIET,
) -> Dataset:
    """Load a folder, zip archive or table as a :class:`Dataset`.

    Parameters
    ----------
    path : Path or str
        A folder of images (searched recursively; MVTec layout recognised), a ``.zip`` of images, or
        a table (``.csv``, ``.parquet``, ``.npz``, ``.mat``).
    workspace : Path or str
        Folder where a zip is extracted (into a new sub-folder); ids are then relative to that
        extracted folder, which becomes ``Dataset.source``.
    label_column : str, optional
        Label column or array of a table (ignored, with a warning, for images); see
        :func:`~core.data.tables.load_table` for None and ``"none"``.
    id_column, ignore_columns
        Column roles of a table (see :func:`~core.data.tables.load_table`); ignored for images.
    label_required : bool
        When False, columns named above that a table lacks are not an error (scoring new data).
    monitor : Monitor
        Receives progress while extracting and checking images, and is checked between files.

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        If the path is missing, of an unsupported kind, or its content cannot be used.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if not path.is_dir() and not path.is_file():  # reading a named pipe would block for ever
        raise DataError(f"{path} is neither a folder nor a regular file; pass {SUPPORTED_FORMATS}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".zip":
        if label_column not in (None, NO_LABEL) and label_required:
            logger.warning("label_column=%r ignored: image labels come from folder names", label_column)
        if path.is_dir():
            return load_image_folder(path, monitor=monitor)
        return _load_zip(path, workspace, monitor)
    if suffix in TABLE_SUFFIXES:
        return load_table(path, label_column=label_column, id_column=id_column, ignore_columns=ignore_columns,
                          label_required=label_required)
    if _looks_like_idx(path):
        raise DataError(f"{path.name} looks like an IDX (MNIST-style) or gzip file, which is not loaded directly; "
                        "use core.data.load_idx_images and materialize_images, or pass a folder or .zip of images")
    if suffix in IMAGE_SUFFIXES:
        raise DataError(f"{path.name} is a single image; put the images in a folder (or a .zip) and pass that")
    raise DataError(f"{path.name}: unsupported format {suffix or '(no suffix)'}; pass {SUPPORTED_FORMATS}")


def _load_zip(path: Path, workspace: Path | str, monitor: Monitor) -> Dataset:
    """Extract ``path`` and load the images; an archive that gives no usable data is removed again."""
    folder = extract_zip(path, workspace, monitor=monitor)
    with removed_on_error(folder):
        try:
            return load_image_folder(folder, monitor=monitor)
        except DataError as exc:
            raise DataError(f"{path.name}: {str(exc).replace(str(folder), 'the archive')}") from exc
