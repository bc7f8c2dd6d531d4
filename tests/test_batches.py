"""Batches of new data scored with a saved run (core.batches), on a real fit of part of the bundled demo.

The demo's images are split: the run is fitted on 220 sneakers + 20 other images; 50 unseen sneakers
and 10 unseen other images are the new batches. A batch must be exactly what ``refinery score
--maps`` writes, survive a restart, keep its own verdicts, and its drift check must tell the
unseen sneakers from the unseen anomalies.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import engine
from core.batches import (
    BatchResults, batch_drift, batch_names, drift_check, load_batch_data, reference_scores, score_batch,
    score_work, test_part_of,
)
from core.cli import main as refinery
from core.config import FitConfig
from core.data.builtin import DEMO_DIR, prepare_builtin
from core.data.parts import has_mvtec_layout, mvtec_part
from core.errors import Cancelled, DataError
from core.jobs import DONE, FAILED, JobRunner
from core.layouts import place_on_layout, run_layouts
from core.progress import CancelToken, Monitor
from core.registry import Registry
from core.run_dir import BATCHES, read_embeddings, read_samples

ROOT = Path(__file__).resolve().parents[1]


def _copy(files, folder: Path) -> Path:
    for path in files:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return folder


FLOAT32_NOISE = dict(rtol=1e-5, atol=1e-5)
"""The same images through the same run in two calls: oneDNN's float32 convolutions may round a batch's last
digits differently from one call to the next (seen on the last, partial batch: 3e-7 of a score)."""


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("batches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFINERY_HOME", str(home / "refinery-home"))
        yield home


@pytest.fixture(scope="module")
def folders(home) -> dict[str, Path]:
    good, other = sorted((DEMO_DIR / "good").glob("*.png")), sorted((DEMO_DIR / "other").glob("*.png"))
    return {"train": _copy(good[:220] + other[:20], home / "train"),
            "unseen good": _copy(good[220:], home / "unseen-good"),
            "unseen other": _copy(other[20:], home / "unseen-other"),
            "copies": _copy(good[:5], home / "copies")}


@pytest.fixture(scope="module")
def run_dir(home, folders) -> Path:
    dataset = engine.load_data(folders["train"], workspace=home / "workspace")
    result = engine.fit(dataset, engine.suggested_config(dataset), home / "run", registry=Registry(home / "registry.sqlite"))
    return result.run_dir


@pytest.fixture(scope="module")
def run(run_dir):
    return engine.open_run(run_dir)


@pytest.fixture(scope="module")
def batches(run, folders, home) -> dict[str, BatchResults]:
    return {name: score_batch(run, load_batch_data(folders[name], run.column_choice(), workspace=home / "workspace"),
                              name=name.replace(" ", "-"))
            for name in ("unseen good", "unseen other", "copies")}


def test_a_batch_is_what_refinery_score_writes(run_dir, folders, batches, tmp_path, capsys):
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    assert refinery(["score", str(run_dir), str(folders["unseen good"]), "--out", str(out), "--maps", str(maps)]) == 0
    batch = batches["unseen good"]
    saved, written_scores = pd.read_csv(batch.directory / "scores.csv"), pd.read_csv(out)
    assert list(saved.columns) == list(written_scores.columns)
    pd.testing.assert_frame_equal(saved, written_scores, check_exact=False, **FLOAT32_NOISE)
    written = sorted(path.relative_to(maps) for path in maps.rglob("*.npy"))
    assert written == sorted(path.relative_to(batch.directory / "maps") for path in (batch.directory / "maps").rglob("*.npy"))
    for relative in written:
        np.testing.assert_allclose(np.load(maps / relative), batch.saved_map(relative.with_suffix(".png").as_posix()),
                                   **FLOAT32_NOISE)


def test_a_table_batch_is_what_refinery_score_writes(home, tmp_path):
    table = prepare_builtin("digits", home / "workspace")
    dataset = engine.load_data(table, label_column="label", workspace=home / "workspace")
    fitted = engine.fit(dataset, engine.suggested_config(dataset, FitConfig(label_column="label")),
                        home / "digits", registry=Registry(home / "registry.sqlite"))
    run = engine.open_run(fitted.run_dir)
    batch = score_batch(run, load_batch_data(table, run.column_choice()))
    out = tmp_path / "scores.csv"
    assert refinery(["score", str(fitted.run_dir), str(table), "--out", str(out)]) == 0
    assert (batch.directory / "scores.csv").read_text() == out.read_text()
    assert not (batch.directory / "maps").exists()
    with pytest.raises(DataError, match="fitted on table but the data is images"):
        score_batch(run, load_batch_data(DEMO_DIR, run.column_choice()))


def test_batches_are_listed_after_a_restart_and_unfinished_ones_are_not(run_dir, batches):
    (run_dir / BATCHES / ".20990101-000000-x-abcdef.partial").mkdir()  # a job killed while writing
    listing = subprocess.run(
        [sys.executable, "-c", "import sys; from core.batches import batches_table; "
         "print(batches_table(sys.argv[1]).to_json(orient='records'))", str(run_dir)],
        cwd=ROOT, capture_output=True, text=True, check=True)
    rows = json.loads(listing.stdout)
    assert {row["batch"] for row in rows} == {batch.name for batch in batches.values()}
    by_name = {row["batch"]: row for row in rows}
    for batch in batches.values():
        assert by_name[batch.name]["samples"] == len(batch.samples)
        assert by_name[batch.name]["flagged"] == int(batch.samples["is_anomaly"].sum())


def test_verdicts_are_kept_per_batch(run_dir, run, batches, folders, home):
    registry = Registry(home / "registry.sqlite")
    good, other = batches["unseen good"], batches["unseen other"]
    assert len({good.fingerprint, other.fingerprint, run.info["fingerprint"]}) == 3
    sample = good.samples["id"].iat[0]
    registry.set_verdict(good.fingerprint, sample, "anomaly", "scratch", run_id=good.run_id)
    assert registry.verdicts(good.fingerprint) == {sample: ("anomaly", "scratch")}
    assert registry.verdicts(other.fingerprint) == {}
    assert sample not in registry.verdicts(run.info["fingerprint"])
    again = score_batch(run, load_batch_data(folders["unseen good"], run.column_choice()), name="again")
    assert again.name != good.name and again.fingerprint == good.fingerprint  # the same data: the same verdicts


def test_the_drift_check_tells_unseen_normal_images_from_anomalies(run_dir, batches):
    reference = reference_scores(run_dir)
    assert len(reference) == int(read_samples(run_dir)["kept"].sum())
    normal, anomalies = batch_drift(batches["unseen good"], reference), batch_drift(batches["unseen other"], reference)
    assert not normal.drifted and normal.verdict.startswith("This batch looks like the training data")
    assert anomalies.drifted and anomalies.verdict.startswith("More of this batch is flagged than the threshold's")
    assert anomalies.share > anomalies.false_alarm_rate > 0
    assert anomalies.interval[0] <= anomalies.share <= anomalies.interval[1]
    assert "only a large change would show" in anomalies.verdict  # 10 samples


def test_the_drift_check_on_synthetic_scores():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=2000)
    threshold = float(np.quantile(reference, 0.95))
    same = drift_check(rng.normal(size=500), reference, threshold, 0.05)
    shifted = drift_check(rng.normal(0.3, 1.0, size=500), reference, threshold, 0.05)
    lower = drift_check(rng.normal(-1.0, 1.0, size=500), reference, threshold, 0.05)
    assert not same.drifted and not lower.drifted
    assert shifted.drifted and shifted.p_flagged < 0.005
    body = rng.normal(size=500)  # the same share above the threshold, the bulk moved up
    body = np.where(body > threshold, body, np.minimum(body + 0.6, threshold))
    creeping = drift_check(body, reference, threshold, 0.05)
    assert creeping.drifted and creeping.verdict.startswith("This batch scores higher overall")


def test_a_copy_of_a_training_image_lands_on_it_on_the_map(run_dir, batches):
    layout = run_layouts(run_dir).layouts[-1]
    ids = list(read_samples(run_dir)["id"])
    copies = batches["copies"]
    span = np.ptp(layout, axis=0).max()
    for sample_id, xy in zip(copies.samples["id"], copies.placement):
        nearest = np.argmin(np.linalg.norm(layout - xy, axis=1))
        assert ids[nearest] == sample_id and np.linalg.norm(layout[nearest] - xy) < 0.01 * span
    train = read_embeddings(run_dir)["train"]
    np.testing.assert_allclose(place_on_layout(run_dir, train[:3]), layout[:3], atol=1e-4)
    with pytest.raises(DataError, match="do not match"):
        place_on_layout(run_dir, np.ones((2, 3)))


def test_nearest_kept_training_samples_of_a_batch_sample(batches):
    copies = batches["copies"]
    near = copies.nearest_kept(0)
    assert near["id"].iat[0] == copies.samples["id"].iat[0] and near["distance"].iat[0] < 1e-3
    assert list(near["distance"]) == sorted(near["distance"])


def test_hostile_inputs_are_refused_clearly(run, run_dir, home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_batch_data(empty, run.column_choice())
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(DataError, match="fitted on images but the data is table"):
        score_batch(run, load_batch_data(tmp_path / "rows.csv", run.column_choice()))
    for name in ("../run", "nope", ""):
        with pytest.raises(DataError, match="has no batch"):
            BatchResults(run_dir, name)
    runner = JobRunner()
    failed = runner.wait(runner.submit("score", score_work(run_dir, empty)), timeout=120)
    assert failed.state == FAILED and "is empty" in failed.message


def test_a_job_reports_progress_and_a_cancel_leaves_nothing(run, run_dir, folders, home):
    runner = JobRunner()
    status = runner.wait(runner.submit("score", score_work(run_dir, folders["copies"], name="job")), timeout=300)
    assert status.state == DONE and status.result.name in batch_names(run_dir)
    assert status.result.run_dir == run_dir and status.overall == pytest.approx(1.0)
    before = set((run_dir / BATCHES).iterdir())
    token = CancelToken()
    monitor = Monitor(lambda event: token.cancel(), token)
    with pytest.raises(Cancelled):
        score_batch(run, load_batch_data(folders["unseen good"], run.column_choice()), monitor=monitor)
    assert set((run_dir / BATCHES).iterdir()) == before


def test_the_parts_of_an_mvtec_folder(tmp_path):
    pictures = sorted((DEMO_DIR / "good").glob("*.png"))
    root = tmp_path / "bottle"
    for index, path in enumerate(pictures[:12]):
        folder = root / ("train/good" if index < 8 else "test/good" if index < 10 else "test/crack")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    (root / "ground_truth/crack").mkdir(parents=True)
    for path in (root / "test/crack").iterdir():
        shutil.copy(path, root / "ground_truth/crack" / f"{path.stem}_mask.png")
    dataset = engine.load_data(root, workspace=tmp_path)
    assert has_mvtec_layout(dataset) and not has_mvtec_layout(engine.load_data(DEMO_DIR))
    train, test = mvtec_part(dataset, "train"), mvtec_part(dataset, "test")
    assert len(train) == 8 and all(i.startswith("train/") for i in train.ids) and set(train.labels) == {0}
    assert len(test) == 4 and list(test.labels) == [1, 1, 0, 0] and len(test.masks) == 2
    assert len({dataset.fingerprint, train.fingerprint, test.fingerprint}) == 3
    with pytest.raises(DataError, match="MVTec layout"):
        mvtec_part(engine.load_data(DEMO_DIR), "test")
    fake_run = tmp_path / "run"  # what test_part_of reads of a run fitted on train/
    fake_run.mkdir()
    (fake_run / "run.json").write_text(json.dumps({"kind": "images", "data_source": str(root)}))
    pd.DataFrame({"id": train.ids}).to_csv(fake_run / "scores.csv", index=False)
    assert test_part_of(fake_run) == root
    pd.DataFrame({"id": dataset.ids}).to_csv(fake_run / "scores.csv", index=False)
    assert test_part_of(fake_run) is None
