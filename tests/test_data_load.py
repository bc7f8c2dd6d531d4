"""load_dataset dispatch: folder, zip, tables, and clear errors for everything else."""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.data.load import load_dataset
from core.errors import DataError


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def test_folder(tmp_path):
    _png(tmp_path / "imgs" / "good" / "a.png")
    _png(tmp_path / "imgs" / "bad" / "b.png", 1)
    data = load_dataset(tmp_path / "imgs", workspace=tmp_path / "ws")
    assert data.kind == "images" and data.ids == ["bad/b.png", "good/a.png"]
    assert not (tmp_path / "ws").exists()  # a folder is read in place


def test_zip_ids_are_relative_to_the_extracted_root(tmp_path):
    folder = tmp_path / "imgs"
    _png(folder / "good" / "a.png")
    _png(folder / "bad" / "b.png", 1)
    archive = tmp_path / "Upload.ZIP"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*.png")):
            out.write(path, path.relative_to(folder).as_posix())
    data = load_dataset(archive, workspace=tmp_path / "ws")
    assert data.ids == ["bad/b.png", "good/a.png"] and data.labels.tolist() == [1, 0]
    assert data.source.parent == (tmp_path / "ws").resolve()
    assert all(p.is_file() and p.is_relative_to(data.source) for p in data.paths)
    assert data.fingerprint == load_dataset(folder, workspace=tmp_path / "ws").fingerprint


def test_table(tmp_path):
    pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}).to_csv(tmp_path / "t.csv", index=False)
    data = load_dataset(tmp_path / "t.csv", workspace=tmp_path / "ws", label_column="y")
    assert data.kind == "table" and data.labels.tolist() == [0, 1]


def test_label_column_on_images_is_ignored_with_a_warning(tmp_path, caplog):
    _png(tmp_path / "imgs" / "a.png")
    with caplog.at_level(logging.WARNING, logger="core.data.load"):
        data = load_dataset(tmp_path / "imgs", workspace=tmp_path / "ws", label_column="y")
    assert data.labels is None and "ignored" in caplog.text


@pytest.mark.parametrize("name, message", [
    ("missing.csv", "does not exist"),
    ("train-images-idx3-ubyte.gz", "IDX"),
    ("t10k-labels-idx1-ubyte", "IDX"),
    ("photo.png", "single image"),
    ("data.xlsx", r"unsupported format .xlsx; pass a folder of images, a .zip of images, or a table \(.csv"),
    ("README", r"unsupported format \(no suffix\)"),
])
def test_clear_errors(tmp_path, name, message):
    if name != "missing.csv":
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x01")
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / name, workspace=tmp_path / "ws")


def test_zip_without_images(tmp_path):
    with zipfile.ZipFile(tmp_path / "t.zip", "w") as out:
        out.writestr("table.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match="no image files"):
        load_dataset(tmp_path / "t.zip", workspace=tmp_path / "ws")
