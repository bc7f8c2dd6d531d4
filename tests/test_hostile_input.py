"""Bad and hostile input, end to end (issue 6): every case ends in a clear error or a documented handling.

The contract, checked for every case:

- **refused** cases go through ``refinery fit`` (:func:`core.cli.main`): exit status 1 and one line
  ``refinery: error: ...`` that names the problem and what to do. ``main`` returns 1 only for a
  :class:`~core.errors.RefineryError`; any other exception would escape and fail the test. No run
  is left behind: no ``running`` row in the registry (a refusal during the fit leaves one
  ``failed`` row), no run folder, no partial folder;
- **handled** cases load through the engine (:func:`core.engine.load_data`) with the documented
  outcome: an unusable file is skipped and reported by name with a reason, an odd image mode is
  read as RGB, a pickle is never touched;
- in both, nothing is written outside the Refinery home (the test's whole ``tmp_path`` is
  compared before and after, the home excluded), a refused archive leaves nothing in the
  workspace, and nothing hangs (every call runs under a time limit);
- for a subset (image folder, zips, a table), the studio's Data page shows the message for the
  path typed into "Folder or file on the server", with no exception.

Unit-level variants are tested beside their module and not repeated here:
``tests/test_data_archive.py`` (eight spellings of escaping entry names, symlinks, duplicates,
ratio and total-size bombs at unit level, file count, lying sizes, encryption, garbage bytes,
cancel, a fuzz of damaged archive bytes), ``tests/test_data_images.py`` (corrupt, truncated,
empty and text images skipped with one warning; every PIL mode converted by ``read_rgb``; the
pixel limit), ``tests/test_data_tables.py`` (delimiters, BOM, duplicate names in csv and
parquet, npz/mat without ``X``, object arrays, a fuzz of random csv bytes) and
``tests/test_cli.py`` (missing path, empty folder, no readable image, corrupt images skipped, a
single-row table, a text column, NaN/inf imputed).

Limits lowered for speed are patched per case and said so in the case (``zip-bomb-total``,
``table-npz-over-size-limit``); the 100,000-file zip and the 64 MiB zip bomb use the defaults.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import hostile_samples as hostile
from app_fixtures import ROOT, clear_streamlit_caches, studio
from core import engine
from core.cli import main
from core.config import FitConfig
from core.data import archive as archive_module
from core.data import tables as tables_module
from core.data.archive import extract_zip
from core.data.dataset import Dataset
from core.data.decode import read_rgb
from core.data.tables import load_table
from core.errors import DataError, RunError
from core.models.tabular import TableEncoder
from core.registry import Registry
from sample_data import write_digits_images, write_digits_table
from test_cli import fails_cleanly
from test_data_archive import make_zip, safe_entries
from test_data_images import write_image

MARKER = "UNPICKLED"
"""File a pickle payload creates if anything unpickles it; it must never exist."""
CALL_LIMIT_S = 60.0
"""Time limit of one load or CLI call: a hostile file must not make anything hang."""
READ_SIZE = 32


# ------------------------------------------------------------------------------------- helpers


def within(seconds: float, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on a daemon thread; fails the test when it does not finish in ``seconds``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(function, '__name__', function)} still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def tree(root: Path, skip: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` except ``skip`` and what is inside it: path -> (type, size, mtime)."""
    entries = {}
    for folder, dirnames, filenames in os.walk(root):
        here = Path(folder)
        dirnames[:] = [name for name in dirnames if here / name != skip]
        for name in dirnames + filenames:
            info = (here / name).lstat()
            size = info.st_size if stat.S_ISREG(info.st_mode) else 0
            entries[(here / name).relative_to(root).as_posix()] = (stat.S_IFMT(info.st_mode), size, info.st_mtime_ns)
    return entries


def good_images(folder: Path, n: int = 3) -> None:
    for index in range(n):
        write_image(folder / f"good{index}.png", seed=index)


def skipped_as(expected: dict[str, str], n_kept: int = 3) -> Callable[[Dataset], None]:
    """Check: the files in ``expected`` are skipped, each with a reason containing its text."""

    def check(dataset: Dataset) -> None:
        reasons = {item.name: item.reason for item in dataset.skipped}
        assert set(reasons) == set(expected), reasons
        for name, text in expected.items():
            assert text in reasons[name], (name, reasons[name])
        assert len(dataset) == n_kept and not set(dataset.ids) & set(expected)

    return check


def reads_as(rgb: tuple[int, int, int], n_kept: int = 4, tolerance: int = 2) -> Callable[[Dataset], None]:
    """Check: nothing skipped; every image reads as (32, 32, 3) uint8; ``hostile*`` images have colour ``rgb``."""

    def check(dataset: Dataset) -> None:
        assert dataset.skipped == [] and len(dataset) == n_kept, dataset.skipped
        for sample_id, path in zip(dataset.ids, dataset.paths):
            pixels = read_rgb(path, READ_SIZE)
            assert pixels.shape == (READ_SIZE, READ_SIZE, 3) and pixels.dtype == np.uint8
            if Path(sample_id).name.startswith("hostile"):
                assert np.abs(pixels.reshape(-1, 3).astype(int) - rgb).max() <= tolerance, (sample_id, pixels[0, 0])

    return check


@dataclass(frozen=True)
class Case:
    """One hostile input: ``build(inputs)`` writes it into the empty folder ``inputs`` and returns
    the path to pass. ``message`` set: refused, the one-line error contains it (and ``advice``);
    else ``check`` receives the loaded Dataset (the documented handling)."""

    id: str
    build: Callable[[Path], Path]
    message: str = ""
    advice: str = ""
    """What the error says to do, when it is not already part of ``message``."""
    check: Callable[[Dataset], None] | None = None
    stage: str = "load"
    """Where a refusal happens: ``load`` (before any run exists) or ``fit`` (after the run started)."""
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    label_column: str | None = None
    fitted: Callable[[pd.DataFrame], None] | None = None
    """For a handled table that must also fit through ``refinery fit``: checks its ``scores.csv``."""


# ---------------------------------------------------------------------------------- image cases


def _image_folder(name: str, write_hostile: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(inputs: Path) -> Path:
        folder = inputs / name
        good_images(folder)
        write_hostile(folder)
        return folder

    return build


def _truncated(suffix: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        full = write_image(folder / f"cut{suffix}", size=(64, 64)).read_bytes()
        (folder / f"cut{suffix}").write_bytes(full[: len(full) // 2])

    return write


def _save(name: str, image: Image.Image, **kwargs) -> Callable[[Path], None]:
    return lambda folder: image.save(folder / name, **kwargs)


def _all_unreadable(inputs: Path) -> Path:
    folder = inputs / "broken"
    folder.mkdir()
    hostile.png_noise(folder / "noise.png", 200)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("I am not a PNG")
    return folder


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe.png")


def _symlink_loop(folder: Path) -> None:
    (folder / "sub").mkdir()
    write_image(folder / "sub" / "inner.png")
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)


def _symlink_loop_check(dataset: Dataset) -> None:
    assert sorted(dataset.ids) == ["good0.png", "good1.png", "good2.png", "sub/inner.png"]


def _mixed_sizes(folder: Path) -> None:
    for name, size in {"hostile-1x1.png": (1, 1), "hostile-wide.png": (3000, 2), "hostile-tall.bmp": (3, 900)}.items():
        Image.new("RGB", size, (0, 0, 255)).save(folder / name)


IMAGE_CASES = [
    Case("image-random-bytes", _image_folder("imgs", lambda f: hostile.png_noise(f / "noise.png", 500)),
         check=skipped_as({"noise.png": "not an image file PIL can read"})),
    Case("image-truncated-png", _image_folder("imgs", _truncated(".png")), check=skipped_as({"cut.png": "unreadable"})),
    Case("image-truncated-jpeg", _image_folder("imgs", _truncated(".jpg")),
         check=skipped_as({"cut.jpg": "unreadable"})),
    Case("image-zero-bytes", _image_folder("imgs", lambda f: (f / "zero.png").write_bytes(b"")),
         check=skipped_as({"zero.png": "not an image file PIL can read"})),
    Case("image-text-named-png", _image_folder("imgs", lambda f: (f / "readme.png").write_text("# hello\n")),
         check=skipped_as({"readme.png": "not an image file PIL can read"})),
    Case("image-decompression-bomb-header", _image_folder("imgs", lambda f: hostile.png_header_bomb(f / "bomb.png")),
         check=skipped_as({"bomb.png": "too large to decode safely"})),
    Case("image-text-chunk-bomb", _image_folder("imgs", lambda f: hostile.png_text_bomb(f / "ztxt.png")),
         check=skipped_as({"ztxt.png": "MAX_TEXT_CHUNK"})),
    # 100 megapixels is the limit itself: decoded, then downsized by read_rgb (memory: see
    # test_a_100_megapixel_image_is_read_in_bounded_memory).
    Case("image-100-megapixels", _image_folder("imgs", lambda f: hostile.constant_png(
        f / "hostile-huge.png", 10_000, 10_000, "1-bit")), check=reads_as((255, 255, 255))),
    Case("image-16-bit", _image_folder("imgs", _save("hostile16.png", Image.fromarray(
        np.full((20, 30), 40_000, np.uint16)))), check=reads_as((156, 156, 156))),  # 40000 / 257
    Case("image-cmyk-jpeg", _image_folder("imgs", _save("hostile.jpg", Image.new("CMYK", (20, 10), (0, 255, 0, 0)))),
         check=reads_as((255, 0, 255), tolerance=40)),  # magenta, through JPEG
    Case("image-cmyk-tiff", _image_folder("imgs", _save("hostile.tif", Image.new("CMYK", (20, 10), (0, 255, 0, 0)))),
         check=reads_as((255, 0, 255))),
    Case("image-palette-with-transparency", _image_folder("imgs", _save(
        "hostile.png", Image.new("P", (9, 7), 0), transparency=0)), check=reads_as((0, 0, 0))),
    Case("image-alpha", _image_folder("imgs", _save("hostile.png", Image.new("RGBA", (9, 7), (255, 0, 0, 0)))),
         check=reads_as((0, 0, 0))),  # fully transparent: composited over black
    Case("image-mixed-sizes", _image_folder("imgs", _mixed_sizes), check=reads_as((0, 0, 255), n_kept=6)),
    Case("image-named-pipe", _image_folder("imgs", _fifo), check=skipped_as({"pipe.png": "not a regular file"})),
    Case("image-folder-symlink-loop", _image_folder("imgs", _symlink_loop), check=_symlink_loop_check),
    Case("images-all-unreadable", _all_unreadable,
         message="(3 files skipped: noise.png: not an image file PIL can read",
         advice="; replace or remove the damaged files"),
]


# ------------------------------------------------------------------------------------ zip cases


def _zip(name: str, entries: Callable[[Path], list], compression: int = zipfile.ZIP_DEFLATED) -> Callable[[Path], Path]:
    def build(inputs: Path) -> Path:
        return make_zip(inputs / name, [("data/good.png", write_image(inputs / "good.png").read_bytes()),
                                        *entries(inputs)], compression)

    return build


def _symlink_entry(inputs: Path) -> list:
    link = zipfile.ZipInfo("data/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return [(link, str(inputs.parent / "outside").encode())]


def _zip_bytes(inputs: Path, entries: list) -> bytes:
    scratch = inputs / ".scratch.zip"
    data = make_zip(scratch, entries).read_bytes()
    scratch.unlink()
    return data


def _nested(inputs: Path) -> Path:
    inner = _zip_bytes(inputs, [(f"inner/{i}.png", write_image(inputs / f"in{i}.png", seed=9).read_bytes())
                                for i in range(3)])
    pngs = [(f"data/good{i}.png", write_image(inputs / f"g{i}.png", seed=i).read_bytes()) for i in range(3)]
    return make_zip(inputs / "nested.zip", [*pngs, ("data/inner.zip", inner)])


def _nested_check(dataset: Dataset) -> None:
    assert dataset.ids == ["data/good0.png", "data/good1.png", "data/good2.png"]
    extracted = sorted(path.relative_to(dataset.source).as_posix() for path in dataset.source.rglob("*"))
    assert extracted == ["data", *dataset.ids, "data/inner.zip"]  # the inner zip stays a plain file


def _unicode(inputs: Path) -> Path:
    png = write_image(inputs / "x.png").read_bytes()
    names = ("donn\u00e9es/\u00e9t\u00e9.png", "\u6570\u636e/\u56fe\u50cf 1.png", "ok/\u00f1.PNG")
    return make_zip(inputs / "unicode.zip", [(name, png) for name in names])


def _unicode_check(dataset: Dataset) -> None:
    assert dataset.ids == ["donn\u00e9es/\u00e9t\u00e9.png", "ok/\u00f1.PNG", "\u6570\u636e/\u56fe\u50cf 1.png"]


def _truncated_zip(inputs: Path) -> Path:
    full = _zip("full.zip", lambda _: [("data/b.png", os.urandom(4000))], zipfile.ZIP_STORED)(inputs)
    cut = inputs / "cut.zip"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    return cut


def _small_total_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 MB stands in for the 2 GiB default, which a test cannot afford to exceed.
    monkeypatch.setitem(archive_module.extract_zip.__kwdefaults__, "max_total_bytes", 2_000_000)


ZIP_CASES = [
    Case("zip-parent-traversal", _zip("evil.zip", lambda _: [("../../../evil.png", b"pwned")]),
         message="'..' would write outside the extraction folder; re-create the archive"),
    Case("zip-absolute-path", _zip("abs.zip", lambda inputs: [(str(inputs.parent / "outside" / "evil.png"), b"pwned")]),
         message="absolute path; re-create the archive"),
    Case("zip-symlink", _zip("link.zip", _symlink_entry), message="symbolic links are refused; re-create the archive"),
    Case("zip-entry-name-starting-with-nul", lambda inputs: hostile.zip_with_nul_name(
        inputs / "nul.zip", write_image(inputs / "good.png").read_bytes()),
         message="unsafe entry with an empty name (or one starting with a NUL character); re-create the archive"),
    Case("zip-bomb-ratio", _zip("bomb.zip", lambda _: [("data/zeros.png", bytes(64 * 1024**2))]),
         message="refused as a possible zip bomb: if the data is genuine, unzip it yourself"),
    # Entries under 1 MiB are exempt from the ratio check; their sum must still stay under the cap.
    Case("zip-bomb-total", _zip("total.zip", lambda _: [(f"data/{i}.png", bytes(900_000)) for i in range(3)]),
         message="uncompressed size over the limit of 2000000 bytes; split the archive or pass a folder",
         patch=_small_total_limit),
    Case("zip-too-many-files", lambda inputs: hostile.zip_of_empty_files(inputs / "many.zip", 100_000),
         message="more than 50000 files; split the archive or pass a folder"),
    Case("zip-empty", lambda inputs: make_zip(inputs / "empty.zip", []),
         message="empty.zip: the archive is empty; add images"),
    Case("zip-truncated", _truncated_zip, message="cut.zip is not a readable zip archive",
         advice="; re-create it with a standard zip tool"),
    Case("zip-entry-name-too-long", _zip("long.zip", lambda _: [("data/" + "a" * 300 + ".png", b"x")]),
         message="File name too long", advice="; re-create it with a standard zip tool"),
    Case("zip-only-a-nested-zip", lambda inputs: make_zip(inputs / "only.zip", [("inner.zip", _zip_bytes(
        inputs, [("a.png", write_image(inputs / "a.png").read_bytes())]))]),
         message="only.zip: no image files in the archive (1 other files); supported suffixes"),
    Case("zip-nested-archive", _nested, check=_nested_check),
    Case("zip-unicode-names", _unicode, check=_unicode_check),
]


# ---------------------------------------------------------------------------------- table cases


def _csv(name: str, frame: Callable[[np.random.Generator], pd.DataFrame]) -> Callable[[Path], Path]:
    def build(inputs: Path) -> Path:
        frame(np.random.default_rng(0)).to_csv(inputs / name, index=False)
        return inputs / name

    return build


def _no_finite_column(rng: np.random.Generator) -> pd.DataFrame:
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    frame["dead"] = np.where(np.arange(60) % 2, np.inf, np.nan)
    return frame


def _text_in_numbers(rng: np.random.Generator) -> pd.DataFrame:
    frame = pd.DataFrame({"temp": rng.normal(size=80), "pressure": rng.normal(size=80).astype(object)})
    frame.loc[41, "pressure"] = "oops"
    return frame


def _wide_with_repeat(inputs: Path) -> Path:
    names = [f"feature_{i:05d}" for i in range(10_000)]
    names[9_000] = names[1]  # the header is 140 kB: the repeat lies beyond the 64 kB delimiter sample
    rows = np.random.default_rng(0).normal(size=(20, len(names))).round(3)
    pd.DataFrame(rows).to_csv(inputs / "wide.csv", index=False, header=names)
    return inputs / "wide.csv"


def _npz(name: str, **arrays: np.ndarray) -> Callable[[Path], Path]:
    def build(inputs: Path) -> Path:
        np.savez(inputs / name, **arrays)
        return inputs / name

    return build


def _mat_without_x(inputs: Path) -> Path:
    scipy.io.savemat(inputs / "odds.mat", {"data": np.zeros((30, 3)), "y": np.zeros((30, 1))})
    return inputs / "odds.mat"


def _fifo_table(inputs: Path) -> Path:
    os.mkfifo(inputs / "pipe.csv")
    return inputs / "pipe.csv"


def _over_size_limit(inputs: Path) -> Path:
    np.savez_compressed(inputs / "big.npz", X=np.zeros((1000, 300)))  # 2.4 MB of zeros, a few kB on disk
    return inputs / "big.npz"


def _small_table_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 MB stands in for the 2 GiB default.
    monkeypatch.setattr(tables_module, "MAX_TABLE_BYTES", 1_000_000)


def _decimal_comma(inputs: Path) -> Path:
    rows = "\n".join(f"{i},{i % 7};{i * i % 11};{'abc'[i % 3]}" for i in range(40))
    (inputs / "excel.csv").write_text("temp;count;site\n" + rows + "\n")
    return inputs / "excel.csv"


def _decimal_comma_check(dataset: Dataset) -> None:
    assert dataset.table["temp"].dtype == np.float64 and dataset.table["temp"][3] == pytest.approx(3.3)
    assert dataset.table["count"].dtype.kind == "i" and dataset.table["site"].tolist()[:3] == ["a", "b", "c"]


def _bom_label_first(inputs: Path) -> Path:
    table = write_digits_table(inputs / "plain.csv", n_normal=30, n_anomalous=3)
    frame = pd.read_csv(table)
    table.unlink()
    frame[["label", *[c for c in frame.columns if c != "label"]]].to_csv(
        inputs / "bom.csv", index=False, sep=";", encoding="utf-8-sig")
    return inputs / "bom.csv"


def _bom_check(dataset: Dataset) -> None:
    assert dataset.labels is not None and int(dataset.labels.sum()) == 3
    assert "label" not in dataset.table.columns and dataset.table.shape == (33, 64)


def _shape_check(rows: int, columns: int) -> Callable[[Dataset], None]:
    def check(dataset: Dataset) -> None:
        assert dataset.table.shape == (rows, columns)

    return check


def _utf16(inputs: Path) -> Path:
    (inputs / "u16.csv").write_text("a\tb\n1\t2\n", encoding="utf-16")  # Excel's "Unicode text"
    return inputs / "u16.csv"


def _finite_scores(scores: pd.DataFrame) -> None:
    assert np.isfinite(scores["anomaly_score"]).all()


def _sentinel(rng: np.random.Generator) -> pd.DataFrame:
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    frame.loc[7, "b"] = 1e308  # a "missing" sentinel: finite in float64, beyond float32
    return frame


def _sentinel_fitted(scores: pd.DataFrame) -> None:
    _finite_scores(scores)
    assert scores["anomaly_score"].idxmax() == 7 and scores.loc[7, "is_anomaly"] == 1


def _identifiers_only(rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({"record": [f"REC-{i:06d}" for i in rng.permutation(60)]})


def _identifiers_beside_features(rng: np.random.Generator) -> pd.DataFrame:
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    frame.loc[7, "a"] = 9.0
    frame.insert(0, "record", [f"REC-{i:06d}" for i in rng.permutation(60)])  # 60 distinct texts: not categories
    frame.insert(0, "row", np.arange(60))  # the index DataFrame.to_csv writes by default
    return frame


def _identified_by_record(dataset: Dataset) -> None:
    assert dataset.table.shape == (60, 3), "the id and the row counter are not features"
    assert dataset.ids[:2] == ["REC-000053", "REC-000003"], "rows are named by their record column"
    assert [(c.name, c.role) for c in dataset.columns] == [("row", "ignore"), ("record", "id"), ("a", "feature"),
                                                          ("b", "feature"), ("c", "feature")]


def _planted_row_7_on_top(scores: pd.DataFrame) -> None:
    _finite_scores(scores)
    assert scores["anomaly_score"].idxmax() == 7 and scores["anomaly_score"].nunique() == 60
    assert scores.loc[7, "id"].startswith("REC-"), "scores.csv keys rows by the table's own ids"


def _pickle_unused(inputs: Path) -> Path:
    return hostile.pickle_npz(inputs / "extra.npz", inputs / MARKER, member="notes", numeric_x=True)


TABLE_CASES = [
    Case("table-column-without-finite-value", _csv("dead.csv", _no_finite_column), stage="fit",
         message="column 'dead' has no finite value; drop it or fill it in"),
    Case("table-text-in-a-numeric-column", _csv("typo.csv", _text_in_numbers), stage="fit",
         message="column 'pressure' holds text with 80 distinct values (more than 50); it cannot be encoded"),
    Case("table-only-an-identifier", _csv("ids.csv", _identifiers_only),
         message="the table has no feature column: record is the id; add the measured columns or change a role"),
    Case("table-identifiers-beside-features", _csv("records.csv", _identifiers_beside_features),
         check=_identified_by_record, fitted=_planted_row_7_on_top),
    Case("table-one-row-npz", _npz("one.npz", X=np.ones((1, 4))), message="1 rows is too few: this fit needs at least"),
    Case("table-one-column", _csv("one.csv", lambda rng: pd.DataFrame({"x": rng.normal(size=60)})),
         check=_shape_check(60, 1), fitted=_finite_scores),
    Case("table-10k-columns", _csv("wide.csv", lambda rng: pd.DataFrame(rng.normal(size=(20, 10_000)).round(2))),
         check=_shape_check(20, 10_000), fitted=_finite_scores),
    Case("table-sentinel-1e308", _csv("sentinel.csv", _sentinel), check=_shape_check(60, 3), fitted=_sentinel_fitted),
    Case("table-repeated-column-beyond-64kb", _wide_with_repeat,
         message="duplicate column names ['feature_00001']; rename them so each is unique"),
    Case("table-bom-semicolon-label-first", _bom_label_first, check=_bom_check, label_column="label"),
    Case("table-semicolon-decimal-comma", _decimal_comma, check=_decimal_comma_check),
    Case("table-utf16", _utf16, message="is not UTF-8 text; save the file as UTF-8"),
    Case("table-npz-without-x", _npz("nox.npz", features=np.zeros((30, 3))),
         message="has no array 'X' (found ['features']); save features as X and optional labels as y"),
    Case("table-mat-without-x", _mat_without_x,
         message="has no variable 'X' (found ['data', 'y']); save features as X"),
    Case("table-npz-pickled-object", lambda inputs: hostile.pickle_npz(inputs / "evil.npz", inputs / MARKER),
         message="holds object arrays; pickled objects are refused, save X and y as numeric arrays"),
    Case("table-npz-pickle-in-unused-member", _pickle_unused, check=_shape_check(12, 3)),
    Case("table-npz-header-claims-8-tb", lambda inputs: hostile.npz_claiming_shape(inputs / "huge.npz", (10**6, 10**6)),
         message="huge.npz is too large to load into memory; use a smaller table"),
    Case("table-npz-header-claims-more-than-it-holds",
         lambda inputs: hostile.npz_claiming_shape(inputs / "short.npz", (20_000, 20_000)),
         message="cannot read short.npz as NumPy .npz archive (EOF", advice="; check the file is a valid NumPy .npz"),
    Case("table-npz-over-size-limit", _over_size_limit, patch=_small_table_limit,
         message="big.npz expands to 2400", advice="over the limit of 1000000; use a smaller table"),
    Case("table-named-pipe", _fifo_table, message="is neither a folder nor a regular file; pass a folder of images"),
]

CASES = IMAGE_CASES + ZIP_CASES + TABLE_CASES
BY_ID = {case.id: case for case in CASES}
REFUSED = [pytest.param(case, id=case.id) for case in CASES if case.message]
HANDLED = [pytest.param(case, id=case.id) for case in CASES if not case.message]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Refinery home inside ``tmp_path``; ``inputs/`` for the hostile files, ``outside/`` as a target."""
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    (tmp_path / "inputs").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "home"


def registry_statuses(home: Path) -> list[str]:
    return [run.status for run in Registry(home / "registry.sqlite").runs()]


def workspace_entries(home: Path) -> list[str]:
    workspace = home / "workspace"
    return sorted(p.name for p in workspace.iterdir()) if workspace.is_dir() else []


def assert_never_unpickled(tmp_path: Path) -> None:
    assert not (tmp_path / "inputs" / MARKER).exists(), "a pickle payload was executed"


# ------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("case", REFUSED)
def test_refinery_fit_refuses_hostile_input_cleanly(case: Case, tmp_path, home, capsys, monkeypatch):
    data = case.build(tmp_path / "inputs")
    if case.patch:
        case.patch(monkeypatch)
    before = tree(tmp_path, skip=home)
    line = within(CALL_LIMIT_S, fails_cleanly, capsys, ["fit", str(data), "--out", str(tmp_path / "run")], case.message)
    assert case.advice in line
    assert tree(tmp_path, skip=home) == before  # no run folder, no partial folder, nothing outside the home
    assert workspace_entries(home) == []  # a refused archive leaves no extraction folder
    assert registry_statuses(home) == (["failed"] if case.stage == "fit" else [])
    assert_never_unpickled(tmp_path)


@pytest.mark.parametrize("case", HANDLED)
def test_hostile_input_is_handled_as_documented(case: Case, tmp_path, home, capsys):
    data = case.build(tmp_path / "inputs")
    before = tree(tmp_path, skip=home)
    dataset = within(CALL_LIMIT_S, lambda: engine.load_data(data, label_column=case.label_column))
    case.check(dataset)
    assert tree(tmp_path, skip=home) == before
    assert len(workspace_entries(home)) == (1 if data.suffix == ".zip" else 0)  # one extraction folder per zip
    assert_never_unpickled(tmp_path)
    if case.fitted:
        run = tmp_path / "run"
        assert within(CALL_LIMIT_S, main, ["fit", str(data), "--out", str(run)]) == 0
        assert "run saved" in capsys.readouterr().out
        assert (run / "run.json").is_file() and registry_statuses(home) == ["done"]
        assert {k: v for k, v in tree(tmp_path, skip=home).items() if k.split("/")[0] != "run"} == before
        case.fitted(pd.read_csv(run / "scores.csv"))


SKIPPING = ["image-random-bytes", "image-truncated-png", "image-truncated-jpeg", "image-zero-bytes",
            "image-text-named-png", "image-decompression-bomb-header", "image-text-chunk-bomb", "image-named-pipe"]
CONVERTING = ["image-16-bit", "image-cmyk-jpeg", "image-cmyk-tiff", "image-palette-with-transparency", "image-alpha",
              "image-mixed-sizes"]


def test_a_fit_on_every_tolerated_hostile_image_at_once(tmp_path, home, capsys):
    """One folder of real images plus every hostile image a folder may hold: the unusable ones are
    named on stderr and left out, the others are fitted, and the run is complete."""
    folder = write_digits_images(tmp_path / "inputs" / "digits", labelled_folders=False, n_normal=12, n_anomalous=2)
    added: dict[str, set[str]] = {"skipped": set(), "converted": set()}
    for outcome, case_ids in (("skipped", SKIPPING), ("converted", CONVERTING)):
        for case_id in case_ids:
            built = BY_ID[case_id].build(tmp_path / "scratch" / case_id)
            for path in built.iterdir():
                if not path.name.startswith("good"):
                    shutil.move(path, folder / "all" / f"{case_id}-{path.name}")
                    added[outcome].add(f"all/{case_id}-{path.name}")
    shutil.rmtree(tmp_path / "scratch")
    run = tmp_path / "run"
    argv = ["fit", str(folder), "--out", str(run), "--image-size", "32", "--ensemble", "3", "--localization", "none"]
    assert within(CALL_LIMIT_S, main, argv) == 0
    err = capsys.readouterr().err
    assert f"skipped {len(added['skipped'])} unreadable file(s)" in err
    assert all(name in err for name in sorted(added["skipped"])[:5])  # the CLI names the first five
    scores = pd.read_csv(run / "scores.csv")
    assert added["converted"] <= set(scores["id"]) and not added["skipped"] & set(scores["id"])
    assert np.isfinite(scores["anomaly_score"]).all()
    assert registry_statuses(home) == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "inputs", "outside", "run"]  # no partial folder


# ----------------------------------------------------------------------------------- pickles


def test_pickled_npz_is_never_unpickled(tmp_path):
    """The payload works (it creates its marker when unpickled on purpose); the loader never runs it."""
    control_marker = tmp_path / "control-marker"
    control = hostile.pickle_npz(tmp_path / "control.npz", control_marker)
    with np.load(control, allow_pickle=True) as arrays:
        for handle in arrays["X"]:
            handle.close()
    assert control_marker.exists(), "the payload must create its marker when unpickled"

    marker = tmp_path / "marker"
    for name, kwargs in {"x.npz": {}, "y.npz": {"member": "y", "numeric_x": True}}.items():
        path = hostile.pickle_npz(tmp_path / name, marker, **kwargs)
        with pytest.raises(DataError, match="pickled objects are refused"):
            load_table(path)
        assert not marker.exists()


# ----------------------------------------------------------------------------- 100 megapixels

_PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from core.data.decode import read_rgb
from core.data.images import load_image_folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = load_image_folder(Path(sys.argv[2]))
pixels = read_rgb(data.paths[0], 64)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (peak - before) / 1024, "pixel": pixels[0, 0].tolist(), "kept": len(data)}))
"""


@pytest.mark.parametrize("kind, rgb", [("16-bit", [156, 156, 156]), ("rgba", [4, 78, 12])])
def test_a_100_megapixel_image_is_read_in_bounded_memory(tmp_path, kind, rgb):
    """A 10,000 x 10,000 image (the pixel limit) is decoded and downsized with at most two full-size
    copies of 4 bytes a pixel (800 MB) on top of the process; the modes that cost most are shown
    (before box-averaging first, 16-bit took 2.5 GB and RGBA 1.9 GB)."""
    (tmp_path / "big").mkdir()
    hostile.constant_png(tmp_path / "big" / "huge.png", 10_000, 10_000, kind)
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(ROOT), str(tmp_path / "big")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kept"] == 1 and np.abs(np.subtract(result["pixel"], rgb)).max() <= 1
    assert result["extra_mib"] < 2 * 4 * 100_000_000 / 1024**2 + 50, result


# ------------------------------------------------------------------------------ tampered runs


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> tuple[Path, Path]:
    """A fitted digits-table run and its table, fitted once for the module."""
    folder = tmp_path_factory.mktemp("table-run")
    table = write_digits_table(folder / "digits.csv", with_labels=False, n_normal=40, n_anomalous=4)
    dataset = engine.load_data(table, workspace=folder / "workspace")
    engine.fit(dataset, FitConfig(), folder / "run", registry=Registry(folder / "registry.sqlite"))
    return folder / "run", table


def _safetensors_entry(path: Path, name: str) -> tuple[bytearray, int]:
    """The file's bytes and the offset where array ``name`` starts."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start = json.loads(data[8:8 + header_size])[name]["data_offsets"][0]
    return data, 8 + header_size + start


def _change_training_embeddings(run: Path) -> None:
    data, start = _safetensors_entry(run / "embeddings.safetensors", "train")
    data[start + 3] ^= 0x40  # one float32's exponent bit: a large, silent change of one value
    (run / "embeddings.safetensors").write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _change_encoder_state(run: Path) -> None:
    state = json.loads((run / "table_encoder.json").read_text())
    state["medians"] = [median + 5.0 for median in state["medians"]]
    (run / "table_encoder.json").write_text(json.dumps(state))


TAMPERED = [
    pytest.param(_change_training_embeddings, "embeddings.safetensors changed after the fit: the run is damaged or was tampered",
                 id="run-embeddings-values-changed"),
    pytest.param(lambda run: _truncate(run / "embeddings.safetensors"),
                 "embeddings.safetensors changed after the fit", id="run-embeddings-truncated"),
    pytest.param(lambda run: (run / "embeddings.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}"),
                 "embeddings.safetensors changed after the fit", id="run-embeddings-header-claims-4-eib"),
    pytest.param(lambda run: (run / "embeddings.safetensors").unlink(), "is missing: the run is incomplete",
                 id="run-embeddings-missing"),
    pytest.param(lambda run: (run / "run.json").write_text("{not json"), "run.json is damaged", id="run-json-not-json"),
    pytest.param(_change_encoder_state, "table_encoder.json changed after the fit", id="run-encoder-state-changed"),
]


@pytest.mark.parametrize("tamper, message", TAMPERED)
def test_a_tampered_run_is_refused_on_opening(table_run, tamper, message, tmp_path, home, capsys):
    source, table = table_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    tamper(run)
    with pytest.raises(RunError, match=message):
        engine.open_run(run)
    scores = tmp_path / "scores.csv"
    fails_cleanly(capsys, ["score", str(run), str(table), "--out", str(scores)], message)
    assert not scores.exists()


# -------------------------------------------------------------------------------------- studio


@pytest.fixture
def fresh_caches():
    clear_streamlit_caches()
    yield
    clear_streamlit_caches()


@pytest.mark.parametrize("case_id", ["images-all-unreadable", "zip-parent-traversal", "zip-bomb-ratio",
                                     "table-npz-pickled-object"])
def test_the_data_page_shows_the_refusal_of_a_server_path(case_id, tmp_path, home, fresh_caches):
    case = BY_ID[case_id]
    data = case.build(tmp_path / "inputs")
    before = tree(tmp_path, skip=home)
    at = studio()
    at.text_input(key="server_path").set_value(str(data)).run()
    at.button(key="use_server").click().run()
    assert not at.exception, at.exception
    errors = [error.value for error in at.error]
    assert len(errors) == 1 and case.message in errors[0] and case.advice in errors[0], errors
    assert "Something went wrong" not in errors[0]  # the user's message, not a crash summary
    assert tree(tmp_path, skip=home) == before
    assert workspace_entries(home) == []
    assert_never_unpickled(tmp_path)


# ----------------------------------------------------------------------------- fuzzing: tables

_CELLS = {
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "int": st.integers(-(2**63), 2**63 - 1),
    "bool": st.booleans(),
    "text": st.text(max_size=6),  # delimiters, quotes, newlines, any unicode
    "mixed": st.one_of(st.none(), st.floats(), st.text(max_size=4), st.integers(-5, 5)),
}


@st.composite
def frames(draw) -> pd.DataFrame:
    """1-5 columns of random kinds (names may repeat or be empty), 0-8 rows."""
    n_rows = draw(st.integers(0, 8))
    kinds = draw(st.lists(st.sampled_from(sorted(_CELLS)), min_size=1, max_size=5))
    columns = [draw(st.lists(_CELLS[kind], min_size=n_rows, max_size=n_rows)) for kind in kinds]
    frame = pd.DataFrame({position: values for position, values in enumerate(columns)})
    frame.columns = draw(st.lists(st.text(max_size=4), min_size=len(kinds), max_size=len(kinds)))
    return frame


_FINITE = st.floats(-1e9, 1e9)
_NOT_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def valid_frames(draw) -> pd.DataFrame:
    """A table every format must load and the encoder turn into finite numbers: 1-8 rows, an
    integer column (never missing: a csv row of one missing value is a blank line, which readers
    skip), then 0-4 float columns whose first value is finite and whose others may be NaN or
    +-inf (imputed by the encoder)."""
    n_rows = draw(st.integers(1, 8))
    columns = {"count": draw(st.lists(_CELLS["int"], min_size=n_rows, max_size=n_rows))}
    for position in range(draw(st.integers(0, 4))):
        rest = st.lists(st.one_of(_FINITE, _NOT_FINITE), min_size=n_rows - 1, max_size=n_rows - 1)
        columns[f"reading {position}"] = [draw(_FINITE), *draw(rest)]
    return pd.DataFrame(columns)


def _write_table(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":  # pyarrow needs unique names and one type per column
        frame = frame.set_axis([f"{name}#{position}" for position, name in enumerate(frame.columns)], axis=1)
        frame.astype({column: str for column, dtype in frame.dtypes.items() if dtype == object}).to_parquet(path)
    elif path.suffix == ".npz":
        np.savez(path, X=frame.to_numpy())  # object dtype when any column is text: pickled by numpy
    else:
        scipy.io.savemat(path, {"X": frame.select_dtypes(include=["number", "bool"]).to_numpy(np.float64)})
    return path


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzzed=st.one_of(st.tuples(valid_frames(), st.just(True)), st.tuples(frames(), st.just(False))),
       suffix=st.sampled_from([".csv", ".parquet", ".npz", ".mat"]))
def test_any_frame_in_any_format_loads_and_encodes_or_raises_data_error(tmp_path, fuzzed, suffix):
    """Random frames (NaN, inf, huge ints, text, mixed) in each format: a Dataset the table encoder
    turns into finite numbers, or a DataError, never another exception; a valid frame (about half of
    the examples) always loads whole and encodes. Random csv bytes:
    tests/test_data_tables.py::test_well_formed_csvs_load_and_any_csv_bytes_load_or_raise_data_error."""
    frame, valid = fuzzed
    path = _write_table(frame, Path(tempfile.mkdtemp(dir=tmp_path)) / f"t{suffix}")
    try:
        data = load_table(path)
    except DataError:
        assert not valid, "a valid frame must load"
        return
    assert len(data) == data.table.shape[0] > 0 and data.table.shape[1] > 0
    assert data.ids == [str(i) for i in range(len(data))]
    try:
        encoded = TableEncoder().fit(data).embed(data)
    except DataError:
        assert not valid, "a valid frame must encode"
        return
    assert encoded.shape[0] == len(data) and np.isfinite(encoded).all()
    if valid:
        assert data.table.shape == encoded.shape == frame.shape


# --------------------------------------------------------------------------- fuzzing: archives

_SEGMENTS = st.one_of(
    st.sampled_from(["..", ".", "", "a", "b", "C:", "c:x", "\u00fc", "\u56fe\u50cf", "..\\..", " ", ".hidden",
                     "a" * 300]),
    st.text(min_size=1, max_size=6),
)
_NAMES = st.builds(lambda prefix, parts, separator: prefix + separator.join(parts),
                   st.sampled_from(["", "", "/", "\\", "C:/", "//", "./"]),
                   st.lists(_SEGMENTS, min_size=1, max_size=4), st.sampled_from(["/", "\\"]),
                   ).filter(lambda name: not name.startswith("\x00") and name)
"""Entry names; zipfile cuts them at a NUL and cannot write an empty one (case zip-entry-name-starting-with-nul)."""
_CONTENT = st.one_of(st.binary(max_size=64), st.integers(0, 3 * 1024**2).map(bytes))  # zeros: ratio bombs from 1 MiB
_DEPTH = [f"d{level}" for level in range(10)]
"""Folders above the workspace: up to 8 '..' stay inside the example's folder, where they are seen."""


def _entry_parts(name: str) -> tuple[str, ...]:
    return tuple(part for part in name.replace("\\", "/").split("/") if part not in ("", "."))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzzed=st.one_of(st.tuples(safe_entries(), st.just(True)),
                        st.tuples(st.lists(st.tuples(_NAMES, _CONTENT), min_size=1, max_size=5), st.just(False))))
def test_any_entry_names_extract_inside_the_destination_or_raise_data_error(tmp_path, fuzzed):
    """Entry names with '..', drive letters, backslashes, odd unicode, very long segments and zip
    bombs extract inside the destination or raise a DataError; safe names (about half of the
    examples) always extract."""
    entries, safe = fuzzed
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    workspace = root.joinpath(*_DEPTH, "ws")
    workspace.mkdir(parents=True)
    archive = root / "fuzz.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # repeated names are written on purpose
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for name, content in entries:
                out.writestr(name, content)
    before = tree(root, skip=workspace)
    try:
        dest = extract_zip(archive, workspace)
    except DataError:
        assert not safe, "an archive of safe names and small files must extract"
        assert list(workspace.iterdir()) == []
    else:
        assert dest.parent == workspace.resolve()
        for path in dest.rglob("*"):
            assert not path.is_symlink() and path.resolve().is_relative_to(dest)
        with zipfile.ZipFile(archive) as written:
            for info in written.infolist():
                if not info.is_dir():
                    assert dest.joinpath(*_entry_parts(info.filename)).read_bytes() == written.read(info)
    assert tree(root, skip=workspace) == before
