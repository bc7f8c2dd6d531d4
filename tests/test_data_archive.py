"""Safe zip extraction: traversal, links, bombs, lying sizes, garbage."""
from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.data import archive as archive_module
from core.data.archive import extract_zip
from core.errors import Cancelled, DataError
from core.progress import CancelToken, Monitor


def make_zip(path: Path, entries: dict, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Write ``entries`` (name or ZipInfo -> bytes) into a zip at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are written on purpose
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, data in entries:
                if isinstance(name, zipfile.ZipInfo):
                    name.compress_type = compression
                archive.writestr(name, data)
    return path


def assert_clean(workspace: Path, outside: Path) -> None:
    assert list(workspace.iterdir()) == [], "the partial extraction folder must be removed"
    assert not (outside / "evil.txt").exists()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "ws" / "inner"
    folder.mkdir(parents=True)
    return folder


def test_extracts_files_into_a_new_folder_inside_the_workspace(tmp_path, workspace):
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as inner:
        inner.writestr("hidden.png", b"x")
    archive = make_zip(tmp_path / "ok.zip", [("a/one.txt", b"1"), ("a/b/", b""), ("a/b/two.txt", b"22"),
                                             ("inner.zip", nested.getvalue())])
    events = []
    dest = extract_zip(archive, workspace, monitor=Monitor(events.append))
    assert dest.parent == workspace.resolve()
    assert (dest / "a" / "one.txt").read_bytes() == b"1"
    assert (dest / "a" / "b" / "two.txt").read_bytes() == b"22"
    assert (dest / "inner.zip").is_file() and not (dest / "hidden.png").exists()  # nested zip not extracted
    assert events[-1].done == events[-1].total == 3
    second = extract_zip(archive, workspace)
    assert second != dest  # every call gets its own folder


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "..\\evil.txt", "/evil.txt",
                                  "\\evil.txt", "C:/evil.txt", "c:evil.txt", "a/C:/evil.txt"])
def test_refuses_names_that_escape(tmp_path, workspace, name):
    archive = make_zip(tmp_path / "evil.zip", [("fine.txt", b"ok"), (name, b"pwned")])
    with pytest.raises(DataError, match="evil.zip: unsafe entry"):
        extract_zip(archive, workspace)
    assert_clean(workspace, workspace.parent)


def test_refuses_symlink_entries(tmp_path, workspace):
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp_path / "link.zip", [("fine.txt", b"ok"), (link, b"/etc/passwd")])
    with pytest.raises(DataError, match="symbolic links"):
        extract_zip(archive, workspace)
    assert_clean(workspace, workspace.parent)


def test_refuses_duplicate_entries(tmp_path, workspace):
    archive = make_zip(tmp_path / "dup.zip", [("a.txt", b"1"), ("a.txt", b"2")])
    with pytest.raises(DataError, match="twice"):
        extract_zip(archive, workspace)


def test_refuses_highly_compressible_entry_as_a_bomb(tmp_path, workspace):
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(4 * 1024**2))])
    with pytest.raises(DataError, match="zip bomb"):
        extract_zip(archive, workspace)
    assert_clean(workspace, workspace.parent)
    # the same archive passes when the ratio limit allows it
    assert (extract_zip(archive, workspace, max_ratio=1e6) / "zeros.bin").stat().st_size == 4 * 1024**2


def test_small_compressible_files_are_not_bombs(tmp_path, workspace):
    archive = make_zip(tmp_path / "blank.zip", [("blank.txt", bytes(100_000))])
    assert (extract_zip(archive, workspace) / "blank.txt").stat().st_size == 100_000


def test_refuses_total_size_over_the_limit(tmp_path, workspace):
    archive = make_zip(tmp_path / "big.zip", [("a.bin", os.urandom(600)), ("b.bin", os.urandom(600))])
    with pytest.raises(DataError, match="over the limit of 1000 bytes"):
        extract_zip(archive, workspace, max_total_bytes=1000)
    assert_clean(workspace, workspace.parent)


def test_refuses_too_many_files(tmp_path, workspace):
    archive = make_zip(tmp_path / "many.zip", [(f"d/{i}.txt", b"x") for i in range(4)] + [("d/", b"")])
    with pytest.raises(DataError, match="more than 3 files"):
        extract_zip(archive, workspace, max_files=3)
    assert extract_zip(archive, workspace, max_files=4).is_dir()


def _patch_sizes(data: bytes, declared: int) -> bytes:
    """Set the declared uncompressed size of the single entry (local and central headers)."""
    data = bytearray(data)
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, declared)
    struct.pack_into("<I", data, central + 24, declared)
    return bytes(data)


def test_declared_sizes_that_lie_do_not_get_through(tmp_path, workspace):
    payload = os.urandom(5000)
    archive = make_zip(tmp_path / "liar.zip", [("data.bin", payload)], compression=zipfile.ZIP_STORED)
    archive.write_bytes(_patch_sizes(archive.read_bytes(), 10))
    with zipfile.ZipFile(archive) as check:
        assert check.getinfo("data.bin").file_size == 10  # the declared size passes the first check
    with pytest.raises(DataError):
        extract_zip(archive, workspace, max_total_bytes=1000)
    assert_clean(workspace, workspace.parent)


def test_refuses_encrypted_entries(tmp_path, workspace):
    archive = make_zip(tmp_path / "locked.zip", [("a.txt", b"secret")], compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.index(signature) + offset
        struct.pack_into("<H", data, position, struct.unpack_from("<H", data, position)[0] | 0x1)
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a readable zip archive"):
        extract_zip(archive, workspace)
    assert_clean(workspace, workspace.parent)


def test_garbage_file_is_a_data_error(tmp_path, workspace):
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match="garbage.zip is not a readable zip archive"):
        extract_zip(garbage, workspace)
    assert_clean(workspace, workspace.parent)


def test_cancel_removes_the_partial_folder(tmp_path, workspace):
    archive = make_zip(tmp_path / "ok.zip", [("a.txt", b"1"), ("b.txt", b"2")])
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        extract_zip(archive, workspace, monitor=Monitor(cancel=token))
    assert list(workspace.iterdir()) == []


_SAFE_SEGMENTS = st.text(alphabet="abcXYZ019_- ", min_size=1, max_size=8)
"""Folder and file names with no separator, dot, colon or NUL: nothing an extractor may refuse."""


@st.composite
def safe_entries(draw) -> list[tuple[str, bytes]]:
    """1-5 files an extractor must accept: distinct relative names (0-3 folders, then ``<name>.bin``,
    so a file never shares a folder's name) and contents of random bytes or of zeros below the size
    where the compression-ratio guard starts (:data:`core.data.archive.RATIO_MIN_BYTES`)."""
    names = draw(st.lists(
        st.builds(lambda folders, leaf: "/".join([*folders, f"{leaf}.bin"]),
                  st.lists(_SAFE_SEGMENTS, max_size=3), _SAFE_SEGMENTS),
        min_size=1, max_size=5, unique=True,
    ))
    contents = st.one_of(st.binary(max_size=64), st.integers(0, archive_module.RATIO_MIN_BYTES - 1).map(bytes))
    return [(name, draw(contents)) for name in names]


@st.composite
def fuzzed_zips(draw) -> tuple[bytes, list[tuple[str, bytes]] | None]:
    """``(archive bytes, entries)``: a safe archive and its entries, or a copy of one with a few bytes
    overwritten, or plain random bytes (``entries`` None for the last two: they may be refused)."""
    entries = draw(safe_entries())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries:
            archive.writestr(name, content)
    damage = draw(st.sampled_from(["none", "bytes overwritten", "random bytes"]))
    if damage == "random bytes":
        return draw(st.binary(max_size=600)), None
    data = bytearray(buffer.getvalue())
    if damage == "none":
        return bytes(data), entries
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data), None


def extracted_files(dest: Path) -> dict[str, bytes]:
    """Every file under ``dest``: its path relative to ``dest`` (``/``-separated) -> its bytes."""
    return {path.relative_to(dest).as_posix(): path.read_bytes() for path in dest.rglob("*") if path.is_file()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzzed=fuzzed_zips())
def test_safe_archives_extract_intact_and_any_bytes_extract_inside_or_raise_data_error(tmp_path, fuzzed):
    data, entries = fuzzed
    archive = tmp_path / "fuzz.zip"
    archive.write_bytes(data)
    workspace = tmp_path / "fuzz-ws"
    try:
        dest = extract_zip(archive, workspace)
    except DataError:
        assert entries is None, "a safe archive must extract"
        assert list(workspace.iterdir()) == []
        return
    assert dest.resolve().is_relative_to(workspace.resolve())
    for path in dest.rglob("*"):
        assert path.resolve().is_relative_to(dest.resolve()) and not path.is_symlink()
    if entries is not None:
        assert extracted_files(dest) == dict(entries)
    shutil.rmtree(dest)
