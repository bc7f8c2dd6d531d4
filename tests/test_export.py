"""The refined data set taken away: every sample's outcome (refined.csv) and the kept samples as a folder or zip."""
import json
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pytest

from core import engine
from core.arrays import read_arrays
from core.config import FitConfig
from core.errors import Cancelled, DataError, RunError
from core.export import REFINED_CSV, STAGE, export_kept, export_table, refined_table, safe_member
from core.progress import CancelToken, Monitor
from core.registry import Registry
from sample_data import fraud_table, write_digits_images

COLUMNS = ["id", "anomaly_score", "is_anomaly", "label", "kept", "round_removed", "votes", "verdict", "verdict_note"]


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """A private Refinery home (and so a private registry): nothing here writes to the user's."""
    home = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFINERY_HOME", str(home / "refinery-home"))
        yield home


@pytest.fixture(scope="module")
def table_run(home):
    """The payments table (id column ``record``, a text column, label ``is_fraud``), one row confirmed
    anomalous before the fit (removed by the verdict, judged by no detector), two verdicts recorded."""
    path = home / "payments.csv"
    fraud_table().to_csv(path, index=False)
    dataset = engine.load_data(path, workspace=home)
    result = engine.fit(dataset, FitConfig(), home / "table-run", verdicts={"REC-000110": "anomaly"})
    registry = Registry()
    registry.set_verdict(dataset.fingerprint, "REC-000110", "anomaly", "a duplicate payment", run_id=result.run_id)
    registry.set_verdict(dataset.fingerprint, "REC-000111", "normal", "", run_id=result.run_id)
    return result.run_dir, path


@pytest.fixture(scope="module")
def image_run(home):
    """66 digit images in class folders ``good/`` and ``defect/``, 64 px, an ensemble of 3."""
    folder = write_digits_images(home / "digits", n_normal=60, n_anomalous=6)
    dataset = engine.load_data(folder, workspace=home)
    config = engine.suggested_config(dataset).with_changes(ensemble=3, localization="none")
    return engine.fit(dataset, config, home / "image-run").run_dir, folder


def moved_copy(run_dir: Path, tmp_path: Path, source: Path) -> Path:
    """A copy of ``run_dir`` whose data source reads ``source`` (a moved or edited data folder)."""
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    info = json.loads((copy / "run.json").read_text())
    info["data_source"] = str(source)
    (copy / "run.json").write_text(json.dumps(info))
    return copy


# ---------------------------------------------------------------------------- refined.csv


def test_every_column_says_what_refinement_did(table_run):
    run_dir, _ = table_run
    table = refined_table(run_dir)
    assert list(table.columns) == COLUMNS
    scores = pd.read_csv(run_dir / "scores.csv", dtype={"id": str})
    for column in ("id", "anomaly_score", "is_anomaly", "label", "kept", "round_removed"):
        np.testing.assert_array_equal(table[column].to_numpy(), scores[column].to_numpy())
    # round_removed: the last round whose record removed the sample (0 = kept at the end).
    rounds = json.loads((run_dir / "refinement.json").read_text())
    arrays = read_arrays(run_dir / "refinement.safetensors")
    assert len(rounds) >= 1 and (table["kept"] == 0).any()
    last_removal = {}
    for record in rounds:
        last_removal.update({i: record["round"] for i in record["removed_ids"]})
        for i in record["returned_ids"]:
            last_removal.pop(i)
    expected = table["id"].map(lambda i: last_removal.get(i, 0)).to_numpy()
    np.testing.assert_array_equal(table["round_removed"].to_numpy(), expected)
    assert ((table["kept"] == 1) == (table["round_removed"] == 0)).all()
    # votes: of the round that removed the sample, or of the last round for kept ones.
    last = rounds[-1]["round"]
    for index, row in table.iterrows():
        deciding = row["round_removed"] or last
        assert row["votes"] == arrays[f"votes_{deciding}"][index]
    removed_by_vote = table[(table["kept"] == 0) & (table["id"] != "REC-000110")]
    assert (removed_by_vote["votes"] > 0).all(), "no detector vote, no removal"
    confirmed = table.set_index("id").loc["REC-000110"]
    assert (confirmed["kept"], confirmed["round_removed"], confirmed["votes"]) == (0, 1, -1)
    # verdicts: the registry's, with their notes; empty elsewhere.
    judged = table.set_index("id").loc[["REC-000110", "REC-000111"], ["verdict", "verdict_note"]]
    assert judged.values.tolist() == [["anomaly", "a duplicate payment"], ["normal", ""]]
    assert (table.drop(index=table.index[table["id"].isin(judged.index)])["verdict"] == "").all()
    assert refined_table(run_dir, {"REC-000120": ("unsure", "ask")}).set_index("id").loc["REC-000120", "verdict"] == "unsure"


def test_the_table_export_writes_refined_csv(table_run, tmp_path):
    run_dir, _ = table_run
    written = export_table(run_dir, tmp_path / "refined.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "refined.csv", dtype={"id": str}, keep_default_na=False),
                                  written, check_dtype=False)


def test_image_ids_are_the_paths_in_the_data_folder(image_run):
    run_dir, folder = image_run
    table = refined_table(run_dir, {})
    assert all((folder / i).is_file() for i in table["id"])
    assert set(table["votes"]) <= set(range(-1, 4)), "an ensemble of 3 detectors"


# ---------------------------------------------------------------------------- the kept samples


def kept_ids(run_dir: Path) -> list[str]:
    scores = pd.read_csv(run_dir / "scores.csv", dtype={"id": str})
    return scores["id"][scores["kept"] == 1].tolist()


def test_kept_images_as_a_folder_are_exactly_the_kept_files(image_run, tmp_path):
    run_dir, folder = image_run
    events = []
    exported = export_kept(run_dir, tmp_path / "kept", monitor=Monitor(events.append))
    written = sorted(p.relative_to(tmp_path / "kept").as_posix() for p in (tmp_path / "kept").rglob("*") if p.is_file())
    kept = kept_ids(run_dir)
    assert 0 < len(kept) < len(refined_table(run_dir))
    assert written == sorted(kept + [REFINED_CSV])
    assert all(PurePosixPath(i).parts[0] in ("good", "defect") for i in kept), "class folders kept"
    for sample_id in kept:
        assert (tmp_path / "kept" / sample_id).read_bytes() == (folder / sample_id).read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "kept" / REFINED_CSV, dtype={"id": str}, keep_default_na=False),
                                  refined_table(run_dir), check_dtype=False)
    assert (exported.n_kept, exported.kind) == (len(kept), "images")
    assert {e.stage for e in events} == {STAGE} and events[-1].done == events[-1].total == len(kept) + 1


def test_kept_images_as_a_zip_are_exactly_the_kept_files(image_run, tmp_path):
    run_dir, folder = image_run
    exported = export_kept(run_dir, tmp_path / "kept.zip")
    with zipfile.ZipFile(tmp_path / "kept.zip") as archive:
        names = archive.namelist()
        assert sorted(names) == sorted(kept_ids(run_dir) + [REFINED_CSV])
        for name in names:
            assert not PurePosixPath(name).is_absolute() and ".." not in PurePosixPath(name).parts and "\\" not in name
        for sample_id in kept_ids(run_dir):
            assert archive.read(sample_id) == (folder / sample_id).read_bytes()
        assert len(pd.read_csv(archive.open(REFINED_CSV))) == len(refined_table(run_dir))
    assert exported.n_bytes == (tmp_path / "kept.zip").stat().st_size


def test_kept_rows_keep_every_column_of_the_table(table_run, tmp_path):
    run_dir, path = table_run
    original = pd.read_csv(path)
    kept = kept_ids(run_dir)
    export_kept(run_dir, tmp_path / "kept")
    rows = pd.read_csv(tmp_path / "kept" / "payments-kept.csv")
    assert list(rows.columns) == list(original.columns), "id, text and label columns too, in their order"
    pd.testing.assert_frame_equal(rows, original[original["record"].isin(kept)].reset_index(drop=True))
    export_kept(run_dir, tmp_path / "kept.zip")
    with zipfile.ZipFile(tmp_path / "kept.zip") as archive:
        assert sorted(archive.namelist()) == ["payments-kept.csv", REFINED_CSV]
        pd.testing.assert_frame_equal(pd.read_csv(archive.open("payments-kept.csv")), rows)


def test_kept_rows_of_an_npz_table(home, tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(150, 4))
    features[:8] += 12  # eight planted anomalies
    labels = (np.arange(150) < 8).astype(int)
    np.savez(tmp_path / "sensors.npz", X=features, y=labels)
    result = engine.fit(engine.load_data(tmp_path / "sensors.npz", workspace=home), FitConfig(), tmp_path / "run")
    export_kept(result.run_dir, tmp_path / "kept")
    rows = pd.read_csv(tmp_path / "kept" / "sensors-kept.csv")
    assert list(rows.columns) == ["x0", "x1", "x2", "x3", "y"]
    kept = result.kept
    np.testing.assert_allclose(rows[["x0", "x1", "x2", "x3"]].to_numpy(), features[kept])
    np.testing.assert_array_equal(rows["y"].to_numpy(), labels[kept])


# ---------------------------------------------------------------------------- refusals


def test_a_destination_that_exists_is_refused_and_left_alone(table_run, image_run, tmp_path):
    run_dir, _ = table_run
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty"):
        export_kept(run_dir, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["mine.txt"]
    (tmp_path / "old.zip").write_bytes(b"mine")
    with pytest.raises(RunError, match="already exists"):
        export_kept(run_dir, tmp_path / "old.zip")
    assert (tmp_path / "old.zip").read_bytes() == b"mine"
    (tmp_path / "empty").mkdir()
    assert export_kept(run_dir, tmp_path / "empty").n_kept > 0, "an empty folder is fine, as for fit --out"
    image_dir, folder = image_run
    with pytest.raises(RunError, match="data folder or inside it"):
        export_kept(image_dir, folder / "kept")
    assert not (folder / "kept").exists()
    _, table_path = table_run
    original = table_path.read_bytes()
    with pytest.raises(RunError, match="data file or inside it"):
        export_table(run_dir, table_path)
    assert table_path.read_bytes() == original


def test_a_moved_data_folder_or_table_is_a_clear_error(table_run, image_run, tmp_path):
    image_dir, folder = image_run
    with pytest.raises(RunError, match="moved or deleted"):
        export_kept(moved_copy(image_dir, tmp_path, tmp_path / "gone"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "run-copy")
    table_dir, _ = table_run
    with pytest.raises(RunError, match="moved or deleted"):
        export_kept(moved_copy(table_dir, tmp_path, tmp_path / "gone.csv"), tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_a_missing_image_stops_the_export_before_anything_is_written(image_run, tmp_path):
    image_dir, folder = image_run
    shutil.copytree(folder, tmp_path / "data")
    (tmp_path / "data" / kept_ids(image_dir)[-1]).unlink()
    with pytest.raises(DataError, match="is gone"):
        export_kept(moved_copy(image_dir, tmp_path, tmp_path / "data"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ids_that_would_leave_the_data_folder_are_refused(image_run, tmp_path):
    for bad in ("../secret.png", "good/../../secret.png", "/etc/passwd", "C:/x.png", "..\\x.png", ""):
        with pytest.raises(DataError):
            safe_member(bad)
    assert safe_member("good/0001.png") == "good/0001.png"
    image_dir, folder = image_run
    copy = moved_copy(image_dir, tmp_path, folder)
    scores = pd.read_csv(copy / "scores.csv", dtype={"id": str})
    scores.loc[scores.index[scores["kept"] == 1][0], "id"] = "../outside.png"
    (tmp_path / "outside.png").write_bytes(b"not yours")
    scores.to_csv(copy / "scores.csv", index=False)
    with pytest.raises(DataError, match="outside.png"):
        export_kept(copy, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_a_cancelled_export_leaves_nothing_behind(image_run, tmp_path):
    image_dir, _ = image_run

    def cancel_after_three(event):
        if event.done >= 3:
            token.cancel()

    for out in (tmp_path / "kept", tmp_path / "kept.zip"):
        token = CancelToken()
        with pytest.raises(Cancelled):
            export_kept(image_dir, out, monitor=Monitor(cancel_after_three, token))
        assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary file left either"


# ---------------------------------------------------------------------------- the Results page


def test_the_results_page_offers_the_outcomes_and_builds_the_kept_zip(table_run):
    from app_fixtures import clear_streamlit_caches, session_id, studio
    from pages.components.navigation import RESULTS

    run_dir, _ = table_run
    clear_streamlit_caches()
    try:
        at = studio(RESULTS, run=run_dir)
        assert not at.exception and not at.error, (at.exception, at.error)
        buttons = {button.key: button for button in at.get("download_button")}
        assert "download_refined" in buttons and "download_kept" not in buttons
        n_kept = len(kept_ids(run_dir))
        assert any(f"{n_kept} of 200 rows kept" in text.value for text in at.markdown)
        at.button(key="build_kept").click().run()
        assert not at.exception and not at.error, (at.exception, at.error)
        assert "download_kept" in {button.key for button in at.get("download_button")}
        [built] = (Path(os.environ["REFINERY_HOME"]) / "workspace" / "exports" / session_id(at)).glob("*.zip")
        with zipfile.ZipFile(built) as archive:
            assert sorted(archive.namelist()) == ["payments-kept.csv", REFINED_CSV]
            assert len(pd.read_csv(archive.open("payments-kept.csv"))) == n_kept
    finally:
        clear_streamlit_caches()
