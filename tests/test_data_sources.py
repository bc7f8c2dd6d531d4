"""Built-in data sets, browser uploads and typed server paths (core.data.builtin, .uploads, .server_paths)."""
from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.data import idx, load_dataset
from core.data.builtin import DEMO_DIR, builtin_sources, prepare_builtin
from core.data.server_paths import resolve_server_folder
from core.data.uploads import MAX_NAME_CHARS, earlier_uploads, save_uploads
from core.errors import Cancelled, ConfigError, DataError
from core.progress import CancelToken, Monitor

KEYS = ["demo", "granite", "fashion-mnist", "elpv", "digits"]
WRITTEN = ["granite", "fashion-mnist", "elpv", "digits"]  # the demo is read in place


def _source(key: str):
    source = next(s for s in builtin_sources() if s.key == key)
    if not source.available:
        pytest.skip(f"built-in {key!r} is not available here: {source.unavailable_reason}")
    return source


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``prepared(key)`` -> (source, path, workspace); each set is prepared once per module."""
    workspace = tmp_path_factory.mktemp("workspace")
    cache: dict[str, tuple] = {}

    def get(key: str):
        source = _source(key)
        if key not in cache:
            cache[key] = (source, prepare_builtin(key, workspace), workspace)
        return cache[key]

    return get


def _png_bytes(seed: int = 0, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _files_under(folder: Path) -> dict[Path, int]:
    """Every path under ``folder`` (hidden ones included) with its modification time in ns."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------- built-ins

def test_builtin_listing():
    sources = builtin_sources()
    assert [s.key for s in sources] == KEYS
    for source in sources:
        assert source.kind in ("images", "table") and source.title and "10%" in source.description
        assert source.available == (source.unavailable_reason == "")
        assert (source.label_column is not None) == (source.kind == "table")
    by_key = {s.key: s for s in sources}
    assert by_key["demo"].available and by_key["digits"].available
    assert by_key["digits"].label_column == "label"
    assert "CC BY-NC-SA 4.0" in by_key["elpv"].description


@pytest.mark.parametrize("key", KEYS)
def test_builtin_prepares_and_loads_with_ten_percent_anomalies(prepared, key):
    source, path, workspace = prepared(key)
    data = load_dataset(path, workspace=workspace, label_column=source.label_column)
    assert data.kind == source.kind and data.labels is not None
    assert set(np.unique(data.labels)) == {0, 1}
    assert data.labels.mean() == pytest.approx(0.1, abs=0.005)
    assert not data.skipped
    if key == "demo":
        assert path == DEMO_DIR
    else:
        assert path.is_relative_to(workspace / "builtin" / f"{key}-0")
    if source.kind == "images":
        normal = {i.split("/")[0] for i, label in zip(data.ids, data.labels) if label == 0}
        anomalous = {i.split("/")[0] for i, label in zip(data.ids, data.labels) if label == 1}
        assert normal == {"good"} and anomalous == {"other"}


def test_fashion_mnist_anomalies_are_other_classes(prepared):
    _, path, _ = prepared("fashion-mnist")
    assert len(list((path / "good").iterdir())) == 900
    other = sorted(p.name for p in (path / "other").iterdir())
    assert len(other) == 100 and not any(name.startswith("sneaker") for name in other)


def test_elpv_cells_are_copied_unchanged(prepared):
    _, path, _ = prepared("elpv")
    import elpv_dataset.utils

    sample = sorted((path / "other").iterdir())[0]
    original = Path(elpv_dataset.utils.__file__).parent / "data" / "images" / sample.name.split("-", 1)[1]
    assert sample.read_bytes() == original.read_bytes()
    assert Image.open(sample).size == (300, 300)


@pytest.mark.parametrize("key", WRITTEN)
def test_second_prepare_reuses_the_folder(prepared, key):
    _, path, workspace = prepared(key)
    assert sorted(p.name for p in (workspace / "builtin").iterdir() if p.name.startswith(".")) == []
    before = _files_under(workspace / "builtin")
    events = []
    assert prepare_builtin(key, workspace, monitor=Monitor(events.append)) == path
    assert events == []  # nothing was built
    assert _files_under(workspace / "builtin") == before  # nothing rewritten, no scratch folder left


def test_same_seed_same_set_other_seed_other_set(tmp_path):
    first = prepare_builtin("digits", tmp_path / "a", seed=3)
    again = prepare_builtin("digits", tmp_path / "b", seed=3)
    other = prepare_builtin("digits", tmp_path / "c", seed=4)
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert first.parent.name == "digits-3"
    table = pd.read_csv(first)
    assert table.shape == (200, 65) and int(table["label"].sum()) == 20


def test_cancel_leaves_nothing_behind(tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        prepare_builtin("digits", tmp_path, monitor=Monitor(cancel=token))
    assert list((tmp_path / "builtin").iterdir()) == []
    events = []
    assert prepare_builtin("digits", tmp_path, monitor=Monitor(events.append)).is_file()
    assert events and events[-1].done == events[-1].total


def test_a_copy_finished_concurrently_is_kept(tmp_path):
    final = tmp_path / "builtin" / "digits-0"

    def other_process_finishes_first(event):
        (final / "digits.csv").parent.mkdir()
        (final / "digits.csv").write_text("theirs")

    path = prepare_builtin("digits", tmp_path, monitor=Monitor(other_process_finishes_first))
    assert path == final / "digits.csv" and path.read_text() == "theirs"
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == ["digits-0"]


def test_unknown_key_and_bad_seed_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="digits"):
        prepare_builtin("mnist", tmp_path)
    for seed in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="seed"):
            prepare_builtin("digits", tmp_path, seed=seed)


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tmp_path / "absent")
    source = next(s for s in builtin_sources() if s.key == "fashion-mnist")
    assert not source.available and "apt-get install" in source.unavailable_reason
    with pytest.raises(DataError, match="apt-get install"):
        prepare_builtin("fashion-mnist", tmp_path)
    assert not (tmp_path / "builtin").exists()


def test_missing_elpv_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    source = next(s for s in builtin_sources() if s.key == "elpv")
    assert not source.available and "pip install elpv-dataset" in source.unavailable_reason
    with pytest.raises(DataError, match="pip install elpv-dataset"):
        prepare_builtin("elpv", tmp_path)


# --------------------------------------------------------------------------------------- uploads

def test_several_images_become_a_folder(tmp_path):
    workspace = tmp_path / "ws"
    path = save_uploads([("a.png", _png_bytes(0)), ("b.PNG", _png_bytes(1)), ("c.jpg", _jpeg_bytes())], workspace)
    assert path.is_dir() and path.parent == (workspace / "uploads").resolve()
    data = load_dataset(path, workspace=workspace)
    assert data.ids == ["a.png", "b.PNG", "c.jpg"] and not data.skipped


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_one_zip_is_stored_as_uploaded(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("set/good/a.png", _png_bytes(0))
        archive.writestr("set/bad/b.png", _png_bytes(1))
    path = save_uploads([("My Parts.zip", buffer.getvalue())], tmp_path)
    assert path.name == "My_Parts.zip" and path.read_bytes() == buffer.getvalue()
    data = load_dataset(path, workspace=tmp_path)
    assert data.ids == ["set/bad/b.png", "set/good/a.png"] and data.labels.tolist() == [1, 0]


def test_one_csv_loads_as_a_table(tmp_path):
    content = b"x,y,label\n1.0,2.0,0\n3.0,4.0,1\n"
    path = save_uploads([("sensors.csv", content)], tmp_path)
    data = load_dataset(path, workspace=tmp_path, label_column="label")
    assert data.kind == "table" and data.table.shape == (2, 2) and data.labels.tolist() == [0, 1]


def test_hostile_names_stay_inside_the_upload_folder(tmp_path):
    workspace = tmp_path / "ws"
    names = ["../../x.png", "/etc/passwd.png", "..\\a.png", ".hidden.png", "C:\\evil\\b.png",
             "a/../../c.png", "\x00d\n.png", "café.png", "z" * 300 + ".png"]
    path = save_uploads([(name, _png_bytes(i)) for i, name in enumerate(names)], workspace)
    stored = sorted(p.name for p in path.iterdir())
    assert stored == sorted(["x.png", "passwd.png", "a.png", "hidden.png", "b.png", "c.png", "_d_.png",
                             "cafe.png", "z" * (MAX_NAME_CHARS - 4) + ".png"])
    assert all(p.parent == path for p in workspace.rglob("*") if p.is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_unsupported_name_after_cleaning_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"'\.\.'"):
        save_uploads([("..", b"x")], tmp_path)


def test_duplicate_names_are_deduplicated(tmp_path):
    names = ["a.png", "dir/a.png", "A.PNG", "a-1.png"]
    contents = [_png_bytes(i) for i in range(len(names))]
    path = save_uploads(list(zip(names, contents)), tmp_path)
    stored = {name: (path / name).read_bytes() for name in ["a.png", "a-1.png", "A-2.PNG", "a-1-1.png"]}
    assert list(stored.values()) == contents
    assert len(list(path.iterdir())) == 4


@pytest.mark.parametrize("files, message", [
    ([], "nothing was uploaded"),
    ([("t.csv", b"a\n1\n"), ("a.png", b"x")], "'t.csv' was uploaded together with 1 other"),
    ([("a.zip", b"x"), ("b.parquet", b"x")], "2 zip or table files"),
    ([("a.png", b"x"), ("notes.txt", b"x"), ("setup.exe", b"x")], "unsupported file type: 'notes.txt', 'setup.exe'"),
    ([("a.png", b"x" * 6), ("b.png", b"x" * 5)], "over the limit of 10"),
])
def test_refusals(tmp_path, files, message):
    with pytest.raises(DataError, match=message):
        save_uploads(files, tmp_path, max_total_bytes=10)
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_too_many_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="over the limit of 2"):
        save_uploads([(f"{i}.png", b"x") for i in range(3)], tmp_path, max_files=2)


def test_each_upload_gets_a_new_folder(tmp_path):
    first = save_uploads([("a.png", _png_bytes())], tmp_path)
    second = save_uploads([("a.png", _png_bytes())], tmp_path)
    assert first != second and first.parent == second.parent


ALICE, BOB = "a1" * 16, "b2" * 16  # studio session ids: hashes of the sessions' keys


def test_a_sessions_uploads_go_into_its_own_folder_and_only_it_lists_them(tmp_path):
    assert earlier_uploads(tmp_path, ALICE) == []
    images = save_uploads([("a.png", _png_bytes(0)), ("b.png", _png_bytes(1))], tmp_path, session=ALICE)
    os.utime(images, ns=(1, 1))  # uploaded long before the table
    table = save_uploads([("sensors.csv", b"x,y\n1,2\n")], tmp_path, session=ALICE)
    archive = save_uploads([("set.zip", b"PK")], tmp_path, session=BOB)
    assert images.parent == table.parent.parent == (tmp_path / "uploads" / ALICE).resolve()
    assert archive.parent.parent == (tmp_path / "uploads" / BOB).resolve()
    assert earlier_uploads(tmp_path, ALICE) == [table, images]  # newest first, each as save_uploads returned it
    assert earlier_uploads(tmp_path, BOB) == [archive]
    assert earlier_uploads(tmp_path, "c3" * 16) == []


@pytest.mark.parametrize("session", ["", "..", "../" + ALICE, ALICE.upper(), "a1b2", ALICE + "/x"])
def test_a_malformed_session_id_is_refused_before_anything_is_written(tmp_path, session):
    with pytest.raises(ConfigError, match="session must be a studio session id"):
        save_uploads([("a.png", _png_bytes())], tmp_path, session=session)
    with pytest.raises(ConfigError, match="session must be a studio session id"):
        earlier_uploads(tmp_path, session)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ typed paths

def test_resolve_server_folder_normalises_the_path(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "t.csv").write_text("a\n1\n")
    assert resolve_server_folder(f'  "{folder}"  ') == folder.resolve()
    assert resolve_server_folder(folder / "t.csv") == (folder / "t.csv").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_server_folder("~/data") == folder.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_server_folder("data/../data") == folder.resolve()


@pytest.mark.parametrize("text, message", [("   ", "no path given"), ("''", "no path given"),
                                           ("a\x00b", "NUL")])
def test_resolve_server_folder_refuses_empty_input(text, message):
    with pytest.raises(DataError, match=message):
        resolve_server_folder(text)


def test_resolve_server_folder_refuses_a_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist on the server"):
        resolve_server_folder(tmp_path / "nowhere")


def test_resolve_server_folder_refuses_an_unreadable_folder(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError, match="cannot be read .*Permission denied.*read permission"):
        resolve_server_folder(tmp_path)


@pytest.mark.parametrize("typed", ["home/workspace/uploads/x", "home/workspace", "home", ".", "link"])
def test_resolve_server_folder_refuses_a_private_folder_and_any_folder_holding_it(tmp_path, typed):
    (tmp_path / "home" / "workspace" / "uploads" / "x").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "home" / "workspace")
    with pytest.raises(DataError, match="Refinery keeps every session's uploads and runs in .*lies in it or holds it"):
        resolve_server_folder(tmp_path / typed, private=[tmp_path / "home"])


def test_resolve_server_folder_accepts_a_folder_beside_a_private_one(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "homework").mkdir()  # a name that starts like the private folder's is not inside it
    beside = resolve_server_folder(tmp_path / "homework", private=[tmp_path / "home"])
    assert beside == (tmp_path / "homework").resolve()


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null (a device file)")
def test_resolve_server_folder_refuses_a_device():
    with pytest.raises(DataError, match="neither a folder nor a regular file"):
        resolve_server_folder("/dev/null")

