"""The engine facade: labels never train, runs round-trip, damaged runs are refused, registry state."""
import ast
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import decision, engine
from core.config import FitConfig
from core.data import table_dataset
from core.data.builtin import DEMO_DIR, prepare_builtin
from core.data.protocol import contaminate
from core.detectors import make_detector
from core.errors import DataError, RunError
from core.jobs import JobContext, JobRunner
from core.registry import Registry
from core.run_dir import LAYOUTS
from sample_data import write_digits_images, write_digits_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry.sqlite")


def test_labels_do_not_change_an_unsupervised_table_fit(tmp_path, registry):
    table = write_digits_table(tmp_path / "t.csv")
    labelled = engine.load_data(table, label_column="label")
    assert labelled.has_labels and "label" not in labelled.table.columns
    a = engine.fit(labelled, FitConfig(), tmp_path / "a", registry=registry)
    b = engine.fit(labelled.without_labels(), FitConfig(), tmp_path / "b", registry=registry)
    assert a.metrics is not None and b.metrics is None
    np.testing.assert_array_equal(a.scores.anomaly_score, b.scores.anomaly_score)
    np.testing.assert_array_equal(a.kept, b.kept)
    assert labelled.fingerprint == labelled.without_labels().fingerprint


def test_labels_do_not_change_an_unsupervised_image_fit(tmp_path, registry):
    labelled = engine.load_data(write_digits_images(tmp_path / "lab", n_normal=40, n_anomalous=4))
    assert labelled.has_labels
    config = FitConfig(image_size=32, ensemble=3)
    a = engine.fit(labelled, config, tmp_path / "a", registry=registry)
    b = engine.fit(labelled.without_labels(), config, tmp_path / "b", registry=registry)
    np.testing.assert_array_equal(a.scores.anomaly_score, b.scores.anomaly_score)


def test_saved_run_scores_like_the_fit(tmp_path, registry):
    dataset = engine.load_data(write_digits_table(tmp_path / "t.csv"), label_column="label")
    result = engine.fit(dataset, FitConfig(), tmp_path / "run", registry=registry)
    run = engine.open_run(tmp_path / "run")
    again = run.score(dataset)
    np.testing.assert_allclose(again.anomaly_score, result.scores.anomaly_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again.is_anomaly, result.scores.is_anomaly)
    assert FitConfig.load(tmp_path / "run" / "config.json") == FitConfig(detector="knn", refine_detector="knn", image_score="pooled"), "auto resolved for tables"
    history = json.loads((tmp_path / "run" / "refinement.json").read_text())
    assert [r["round"] for r in history] == [r.round for r in result.rounds]
    [record] = registry.runs()
    assert record.status == "done" and len(registry.rounds(record.run_id)) == len(result.rounds)


@pytest.mark.parametrize("dimension", [16, 128])
@pytest.mark.parametrize("detector", ["knn", "gde"])
def test_new_normal_data_is_flagged_at_the_stated_false_alarm_rate(tmp_path, registry, dimension, detector):
    """The threshold comes from out-of-sample scores: in-sample ones (kNN counting a row as its own
    neighbour) made new normal data look anomalous, more so the higher the dimension."""
    rng = np.random.default_rng(dimension)
    train, fresh = rng.normal(size=(600, dimension)), rng.normal(size=(4000, dimension))
    dataset = table_dataset(pd.DataFrame(train), "train.csv")
    config = FitConfig(detector=detector, refine=False, false_alarm_rate=0.05)
    result = engine.fit(dataset, config, tmp_path / "run", registry=registry)
    flagged = engine.open_run(tmp_path / "run").score(table_dataset(pd.DataFrame(fresh), "new.csv")).is_anomaly
    assert abs(flagged.mean() - 0.05) <= 0.03, flagged.mean()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["false_alarm_rate"] == 0.05 and "flags about 5% of normal data" in info["threshold_meaning"]
    assert info["threshold"] == pytest.approx(result.scores.threshold)


def test_a_given_gamma_is_the_stated_contamination(tmp_path, registry):
    dataset = engine.load_data(write_digits_table(tmp_path / "t.csv"), label_column="label")
    result = engine.fit(dataset, FitConfig(gamma=0.2), tmp_path / "run", registry=registry)
    assert result.contamination == 0.2 and result.contamination_interval is None
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["contamination"], info["contamination_interval"], info["contamination_source"]) == (0.2, None, "given (gamma)")


def test_tampered_run_is_refused(tmp_path, registry):
    dataset = engine.load_data(write_digits_table(tmp_path / "t.csv"))
    engine.fit(dataset, FitConfig(), tmp_path / "run", registry=registry)
    weights = tmp_path / "run" / "embeddings.safetensors"
    data = bytearray(weights.read_bytes())
    data[-40:-20] = bytes(20)  # overwrite some embedding values
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError, match="tampered"):
        engine.open_run(tmp_path / "run")
    weights.write_bytes(b"garbage")
    with pytest.raises(RunError, match="damaged"):
        engine.open_run(tmp_path / "run")


def test_not_a_run_folder(tmp_path):
    with pytest.raises(RunError, match="not a Refinery run"):
        engine.open_run(tmp_path)


def test_failure_mid_fit_leaves_no_run_and_marks_failed(tmp_path, registry, monkeypatch):
    dataset = engine.load_data(write_digits_table(tmp_path / "t.csv"))

    def broken(*args, **kwargs):
        raise DataError("simulated failure inside refinement")

    monkeypatch.setattr(decision, "iter_refine", broken)
    with pytest.raises(DataError, match="simulated"):
        engine.fit(dataset, FitConfig(), tmp_path / "run", registry=registry)
    assert not (tmp_path / "run").exists()
    assert not any(p.name.startswith(".run.partial") for p in tmp_path.iterdir())
    [record] = registry.runs()
    assert record.status == "failed" and "simulated" in record.message


def test_cancel_stops_the_fit(tmp_path, registry):
    from core.errors import Cancelled
    from core.progress import CancelToken, Monitor

    token = CancelToken()
    token.cancel()
    dataset = engine.load_data(write_digits_images(tmp_path / "d", n_normal=20, n_anomalous=2))
    with pytest.raises(Cancelled):
        engine.fit(dataset, FitConfig(image_size=32, ensemble=3), tmp_path / "run", registry=registry, monitor=Monitor(cancel=token))
    assert registry.runs()[0].status == "cancelled" and not (tmp_path / "run").exists()


def test_core_imports_no_ui_package():
    offenders = []
    for path in (ROOT / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in {"streamlit", "plotly"}]
    assert not offenders, offenders


# ---------------------------------------------------------------------------- verdicts, jobs, run data, helpers


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The built-in digits table (180 ones, 20 other digits), loaded with its labels."""
    workspace = tmp_path_factory.mktemp("digits")
    path = prepare_builtin("digits", workspace)
    return engine.load_data(path, label_column="label", workspace=workspace)


# The CLI records the label column in the config; run_dataset needs it to keep labels out of the features.
DIGITS_CONFIG = FitConfig(label_column="label")


def planted_embeddings(seed=0):
    rng = np.random.default_rng(seed)
    features = np.vstack([rng.normal(size=(180, 6)), rng.normal(loc=5.0, size=(20, 6))])
    return features, np.r_[np.zeros(180, int), np.ones(20, int)]


def test_pinned_from_verdicts():
    ids = ["a", "b", "c", "d"]
    pins = engine.pinned_from_verdicts(ids, {"a": "anomaly", "c": "normal", "d": "unsure", "zz": "anomaly"})
    assert pins.dtype == np.int8 and list(pins) == [1, -1, 0, -1], "ids not in the data are ignored"
    assert list(engine.pinned_from_verdicts(ids, None)) == [-1] * 4
    assert list(engine.pinned_from_verdicts(ids, {})) == [-1] * 4
    with pytest.raises(DataError, match="unknown verdict 'maybe'.*normal"):
        engine.pinned_from_verdicts(ids, {"a": "maybe"})


@pytest.mark.parametrize("refine", [True, False])
def test_refine_and_fit_honours_pins(refine):
    features, labels = planted_embeddings()
    config = FitConfig(detector="gde", refine_detector="gde", gamma=0.1, refine=refine)
    outlier, normal = 185, int(np.argmin(np.linalg.norm(features[:180], axis=1)))
    pinned = np.full(len(features), -1)
    pinned[[outlier, normal]] = [0, 1]
    model = engine.refine_and_fit(features, config, labels=labels, pinned=pinned)
    assert model.kept[outlier] and not model.kept[normal]
    if refine:
        assert not engine.refine_and_fit(features, config).kept[outlier], "the pin changed the outcome"
        assert model.rounds and model.rounds[0].removed[0] == normal
    else:
        assert not model.rounds and model.kept.sum() == len(features) - 1
    # the final detector is fitted on exactly the kept samples
    refit = -make_detector("gde", random_state=0).fit(features[model.kept]).score_samples(features)
    np.testing.assert_allclose(refit, model.train_score, rtol=1e-6)


def test_fit_with_verdicts_keeps_confirmed_normals_and_removes_confirmed_anomalies(tmp_path, digits, registry):
    plain = engine.fit(digits, DIGITS_CONFIG, tmp_path / "plain", registry=registry)
    removed_anomalies = [i for i, k, y in zip(digits.ids, plain.kept, digits.labels) if not k and y == 1][:2]
    assert len(removed_anomalies) == 2, "refinement removes labelled anomalies when left alone"
    score = plain.scores.anomaly_score
    typical = [digits.ids[i] for i in np.argsort(score) if plain.kept[i]][:2]
    verdicts = {**{i: "normal" for i in removed_anomalies}, **{i: "anomaly" for i in typical},
                digits.ids[5]: "unsure", "not-a-sample": "anomaly"}
    guided = engine.fit(digits, DIGITS_CONFIG, tmp_path / "guided", verdicts=verdicts, registry=registry)
    frame = pd.read_csv(tmp_path / "guided" / "scores.csv", dtype={"id": str}).set_index("id")
    assert (frame.loc[removed_anomalies, "kept"] == 1).all() and (frame.loc[removed_anomalies, "round_removed"] == 0).all()
    assert (frame.loc[typical, "kept"] == 0).all() and (frame.loc[typical, "round_removed"] == 1).all()
    assert sorted(guided.rounds[0].removed[:2]) == sorted(digits.ids.index(i) for i in typical)
    assert (frame["kept"].to_numpy() == guided.kept).all()


def test_fit_reports_every_round(tmp_path, digits, registry):
    seen = []
    result = engine.fit(digits, DIGITS_CONFIG.with_changes(rounds=3), tmp_path / "run", registry=registry,
                        on_round=seen.append)
    assert len(result.rounds) >= 2
    assert [r.round for r in seen] == list(range(1, len(result.rounds) + 1))
    assert all(a is b for a, b in zip(seen, result.rounds))
    assert len(registry.rounds(result.run_id)) == len(seen)


def test_fit_work_publishes_dataset_rounds_and_run_dir(tmp_path, digits, registry, monkeypatch):
    published = []
    original = JobContext.publish

    def spy(context, name, value):
        published.append((name, value))
        original(context, name, value)

    monkeypatch.setattr(JobContext, "publish", spy)
    runner = JobRunner()
    work = engine.fit_work(digits, DIGITS_CONFIG, tmp_path / "run", registry=registry)
    status = runner.wait(runner.submit("fit digits", work), timeout=60)
    assert status.state == "done", status.message
    result = status.result
    assert isinstance(result, engine.FitResult) and result.run_dir == tmp_path / "run"
    assert (tmp_path / "run" / "run.json").is_file()
    names = [name for name, _ in published]
    assert names[0] == "dataset" and names[-1] == "run_dir" and set(names) == {"dataset", "rounds", "run_dir"}
    growing = [value for name, value in published if name == "rounds"]
    assert [len(value) for value in growing] == list(range(1, len(result.rounds) + 1))
    assert status.outputs["dataset"] is digits and status.outputs["run_dir"] == result.run_dir
    assert list(status.outputs["rounds"]) == result.rounds
    assert status.stage == "project" and status.eta_s is None, "the map layout is the last stage of a fit job"
    assert (tmp_path / "run" / LAYOUTS).is_file(), "the map layout is cached in the run"


def test_fit_work_failure_marks_the_job_failed(tmp_path, digits, registry):
    runner = JobRunner()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    status = runner.wait(runner.submit("fit", engine.fit_work(digits, DIGITS_CONFIG, tmp_path / "taken",
                                                               registry=registry)), timeout=60)
    assert status.state == "failed" and "not empty" in status.message


def test_run_dataset_returns_the_whole_run_in_order(tmp_path, digits, registry):
    engine.fit(digits, DIGITS_CONFIG, tmp_path / "run", registry=registry)
    back = engine.run_dataset(tmp_path / "run", workspace=tmp_path)
    assert back.ids == digits.ids
    np.testing.assert_array_equal(back.labels, digits.labels)
    pd.testing.assert_frame_equal(back.table, digits.table)
    assert back.fingerprint == digits.fingerprint, "the same data set: a re-run stays comparable"


def test_run_dataset_of_a_protocol_subset(tmp_path, digits, registry):
    split = contaminate(digits, 0.1, seed=3)
    engine.fit(split.train, DIGITS_CONFIG, tmp_path / "run", registry=registry)
    back = engine.run_dataset(tmp_path / "run", workspace=tmp_path)
    assert back.ids == split.train.ids and len(back) < len(digits)
    np.testing.assert_array_equal(back.labels, split.train.labels)
    pd.testing.assert_frame_equal(back.table, split.train.table)
    assert back.fingerprint == split.train.fingerprint


def test_run_dataset_of_images_and_a_deleted_file(tmp_path, registry):
    dataset = engine.load_data(write_digits_images(tmp_path / "images", n_normal=20, n_anomalous=3),
                               workspace=tmp_path)
    engine.fit(dataset, FitConfig(image_size=32, ensemble=3, localization="none"), tmp_path / "run",
               registry=registry)
    back = engine.run_dataset(tmp_path / "run", workspace=tmp_path)
    assert back.ids == dataset.ids and back.paths == dataset.paths
    np.testing.assert_array_equal(back.labels, dataset.labels)
    dataset.paths[4].unlink()
    with pytest.raises(RunError, match=f"1 of the run's samples.*{dataset.ids[4]}.*moved or changed"):
        engine.run_dataset(tmp_path / "run", workspace=tmp_path)


def test_contaminate(digits):
    split = contaminate(digits, 0.1, seed=0)
    assert abs(split.train.labels.mean() - 0.1) <= 1 / len(split.train)
    assert not set(split.train.ids) & set(split.test.ids)
    assert sorted(split.train.ids + split.test.ids, key=int) == digits.ids
    assert (split.test.labels == 1).any() and (split.test.labels == 0).any()
    assert contaminate(digits, 0.1, seed=0).train.ids == split.train.ids, "seeded"
    assert contaminate(digits, 0.1, seed=1).train.ids != split.train.ids
    assert abs(contaminate(digits, 0.05, seed=0).train.labels.mean() - 0.05) <= 1 / len(split.train)
    with pytest.raises(DataError, match="labelled"):
        contaminate(digits.without_labels(), 0.1)
    partly = digits.labels.copy()
    partly[0] = -1
    with pytest.raises(DataError, match="unlabelled"):
        contaminate(replace(digits, labels=partly), 0.1)


def test_suggested_config_for_small_and_large_images_and_tables(tmp_path, digits):
    demo = engine.load_data(DEMO_DIR, workspace=tmp_path)
    suggested = engine.suggested_config(demo)
    assert suggested.image_size == 64 and suggested.detector == "gde"
    assert suggested == FitConfig(detector="gde", refine_detector="mcd", image_size=64), "nothing else changes"
    base = FitConfig(detector="kde", refine_detector="gde", ensemble=4)
    assert engine.suggested_config(demo, base) == base.with_changes(image_size=64)
    assert engine.suggested_config(demo, base.with_changes(image_size=128)).image_size == 128, "a size given is kept"

    for index in range(5):
        pixels = np.random.default_rng(index).integers(0, 255, size=(100, 100, 3), dtype=np.uint8)
        (tmp_path / "large" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "large" / "good" / f"{index}.png")
    large = engine.load_data(tmp_path / "large", workspace=tmp_path)
    assert engine.suggested_config(large) == FitConfig(detector="gde", refine_detector="mcd", image_size=224)
    assert engine.suggested_config(digits) == FitConfig(detector="knn", refine_detector="knn", image_score="pooled")


def test_new_run_dir_gives_fresh_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    made = []
    for _ in range(3):
        path = engine.new_run_dir("my data/set?")
        assert not path.exists() and path not in made
        assert path.parent == tmp_path / "home" / "runs"
        assert "my-data-set" in path.name and "/" not in path.name and "?" not in path.name
        path.mkdir(parents=True)
        made.append(path)
    assert "-run-" in engine.new_run_dir("", root=tmp_path / "elsewhere").name
    # not yet created, as while a job waits in the queue: another request in the same second differs
    assert engine.new_run_dir("same", root=tmp_path) != engine.new_run_dir("same", root=tmp_path)
    assert engine.new_run_dir("x" * 100, root=tmp_path).name.count("x") == 40
