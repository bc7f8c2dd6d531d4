"""Saved runs read back for display: rounds, neighbours, image files, evaluation helpers, comparison, bundle."""
import copy
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import engine
from core.config import FitConfig
from core.data.builtin import DEMO_DIR, prepare_builtin
from core.errors import DataError
from core.registry import Registry
from core.results import (
    RunResults,
    compare_runs,
    confusion_at,
    judged_samples,
    score_curves,
    verdict_agreement,
)
from core.run_dir import bundle

DIGITS_CONFIG = FitConfig(label_column="label")


@pytest.fixture(scope="module", autouse=True)
def home(tmp_path_factory):
    """A private Refinery home: nothing here writes to the user's."""
    home = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFINERY_HOME", str(home / "refinery-home"))
        yield home


@pytest.fixture(scope="module")
def registry(home):
    return Registry(home / "registry.sqlite")


@pytest.fixture(scope="module")
def digits(home):
    return engine.load_data(prepare_builtin("digits", home), label_column="label", workspace=home)


@pytest.fixture(scope="module")
def plain(home, digits, registry):
    """A table run and its saved view."""
    result = engine.fit(digits, DIGITS_CONFIG, home / "plain", registry=registry)
    return result, RunResults(result.run_dir)


@pytest.fixture(scope="module")
def guided(home, digits, registry, plain):
    """The same table refit with verdicts: the removed labelled anomalies confirmed normal, the five
    highest-scoring kept samples confirmed anomalous."""
    result, _ = plain
    verdicts = {i: "normal" for i, k, y in zip(digits.ids, result.kept, digits.labels) if not k and y == 1}
    suspects = [i for i in np.argsort(-result.scores.anomaly_score) if result.kept[i]][:5]
    verdicts.update({digits.ids[i]: "anomaly" for i in suspects})
    again = engine.fit(digits, DIGITS_CONFIG, home / "guided", verdicts=verdicts, registry=registry)
    return again, RunResults(again.run_dir)


@pytest.fixture(scope="module")
def demo(home):
    return engine.load_data(DEMO_DIR, workspace=home)


@pytest.fixture(scope="module")
def image_run(home, demo, registry):
    """The demo images (300 Fashion-MNIST, 28 px) at the suggested 64 px, with a localization model."""
    result = engine.fit(demo, engine.suggested_config(demo), home / "images", registry=registry)
    return result, RunResults(result.run_dir)


def assert_rounds_equal(saved, fitted):
    assert len(saved) == len(fitted) > 0
    for view, record in zip(saved, fitted):
        assert view.round == record.round
        np.testing.assert_array_equal(view.kept, record.kept)
        np.testing.assert_array_equal(view.removed, record.removed)  # same indices, same order
        np.testing.assert_array_equal(view.returned, record.returned)
        np.testing.assert_array_equal(view.anomaly_score, record.anomaly_score)
        assert (view.gamma, view.gamma_interval, view.capped, view.precision, view.recall, view.note) == \
            (record.gamma, record.gamma_interval, record.capped, record.precision, record.recall, record.note)


# ---------------------------------------------------------------------------- RunResults


def test_samples_and_facts_match_the_fit(plain, digits):
    result, run = plain
    samples = run.samples
    assert list(samples["id"]) == digits.ids
    np.testing.assert_allclose(samples["anomaly_score"], result.scores.anomaly_score)
    np.testing.assert_array_equal(samples["is_anomaly"], result.scores.is_anomaly.astype(int))
    np.testing.assert_array_equal(samples["kept"], result.kept.astype(int))
    np.testing.assert_array_equal(run.labels, digits.labels)
    assert sorted(samples["rank"]) == list(range(1, len(digits) + 1))
    assert samples["rank"].iloc[int(np.argmax(result.scores.anomaly_score))] == 1
    by_rank = samples.sort_values("rank")["anomaly_score"].to_numpy()
    assert np.all(np.diff(by_rank) <= 0), "rank 1 is the most anomalous"
    assert (run.run_id, run.kind, run.source) == (result.run_id, "table", digits.source)
    assert run.threshold == pytest.approx(result.scores.threshold)
    assert run.contamination == pytest.approx(result.contamination)
    assert run.metrics == result.metrics
    assert run.embeddings.shape == (len(digits), 64)


def test_rounds_read_back_equal_the_fit(plain, guided, image_run):
    for result, run in (plain, guided, image_run):
        assert_rounds_equal(run.rounds, result.rounds)


def test_round_removed_column_agrees_with_the_rounds(guided):
    result, run = guided
    last_removed = np.zeros(len(result.kept), dtype=int)
    for record in result.rounds:
        last_removed[record.removed] = record.round
        last_removed[record.returned] = 0
    assert (run.samples["round_removed"].to_numpy() == last_removed).all(), "the round that last removed it"
    assert (run.samples["round_removed"].to_numpy()[result.kept] == 0).all()
    assert (run.samples["round_removed"].to_numpy()[~result.kept] > 0).all()


def test_kept_after(plain):
    result, run = plain
    assert run.kept_after(0).all() and len(run.kept_after(0)) == len(run.samples)
    for record in result.rounds:
        np.testing.assert_array_equal(run.kept_after(record.round), record.kept)
    np.testing.assert_array_equal(run.kept_after(len(result.rounds)), result.kept)
    np.testing.assert_array_equal(run.kept_after(99), result.kept)
    assert run.kept_after(0).sum() > run.kept_after(len(result.rounds)).sum()


def test_image_path_of_a_sample(image_run, demo):
    _, run = image_run
    sample = demo.ids[7]
    assert run.image_path(sample) == demo.paths[7].resolve()
    assert run.image_path(sample).is_relative_to(DEMO_DIR.resolve())


def test_image_path_is_refused_for_tables(plain):
    with pytest.raises(DataError, match="table"):
        plain[1].image_path("0")


@pytest.mark.parametrize("tampered_id", ["../../../README.md", "good/../../../pyproject.toml", "/etc/hostname"])
def test_image_path_refuses_ids_that_leave_the_data_folder(image_run, tmp_path, tampered_id):
    result, _ = image_run
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    frame = pd.read_csv(copy / "scores.csv", dtype={"id": str}, keep_default_na=False)
    frame.loc[0, "id"] = tampered_id
    frame.to_csv(copy / "scores.csv", index=False)
    run = RunResults(copy)
    with pytest.raises(DataError, match="outside the run's data folder"):
        run.image_path(tampered_id)
    assert run.image_path(frame.loc[1, "id"]).is_file(), "the other samples still resolve"


def test_image_path_reports_a_moved_folder(tmp_path):
    data = tmp_path / "mine"
    for sub, count in (("good", 20), ("other", 3)):
        (data / sub).mkdir(parents=True)
        for path in sorted((DEMO_DIR / sub).iterdir())[:count]:
            shutil.copy(path, data / sub / path.name)
    dataset = engine.load_data(data, workspace=tmp_path)
    result = engine.fit(dataset, FitConfig(image_size=32, ensemble=3, localization="none"), tmp_path / "run",
                        registry=Registry(tmp_path / "registry.sqlite"))
    run = RunResults(result.run_dir)
    assert run.image_path(dataset.ids[0]).is_file()
    data.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="is gone: the run's data folder was moved or deleted"):
        run.image_path(dataset.ids[0])


@pytest.mark.parametrize("kept", [True, False])
def test_nearest_kept(plain, kept):
    result, run = plain
    index = int(np.flatnonzero(result.kept == kept)[0])
    near = run.nearest_kept(index, k=6)
    assert list(near.columns) == ["index", "id", "distance", "anomaly_score"] and len(near) == 6
    assert index not in set(near["index"]), "a sample is not its own neighbour"
    assert result.kept[near["index"]].all(), "only kept samples"
    assert np.all(np.diff(near["distance"]) >= 0), "nearest first"
    embeddings = run.embeddings
    candidates = np.flatnonzero(result.kept)
    candidates = candidates[candidates != index]
    distance = np.linalg.norm(embeddings[candidates] - embeddings[index], axis=1)
    np.testing.assert_allclose(near["distance"], np.sort(distance)[:6], rtol=1e-6)
    assert list(near["id"]) == [run.samples["id"][i] for i in near["index"]]


def test_export_frame_adds_verdicts(plain):
    _, run = plain
    verdicts = {"3": ("anomaly", "odd stroke"), "10": ("normal", "")}
    frame = run.export_frame(verdicts)
    assert list(frame.columns) == [c for c in run.samples.columns if c != "rank"] + ["verdict", "verdict_note"]
    indexed = frame.set_index("id")
    assert tuple(indexed.loc["3", ["verdict", "verdict_note"]]) == ("anomaly", "odd stroke")
    assert indexed.loc["10", "verdict"] == "normal"
    others = frame[~frame["id"].isin(verdicts)]
    assert (others["verdict"] == "").all() and (others["verdict_note"] == "").all()
    pd.testing.assert_frame_equal(frame.drop(columns=["verdict", "verdict_note"]), run.samples.drop(columns=["rank"]))
    assert "rank" in run.samples, "the run's own table is unchanged"


# ---------------------------------------------------------------------------- evaluation helpers


def test_score_curves():
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    assert score_curves(np.zeros(5, int), score) is None
    assert score_curves(np.array([1, 1, -1, 1, -1]), score) is None, "one known class"
    curves = score_curves(np.array([0, 0, 1, 1, -1]), score)
    assert curves.fpr[0] == 0 and curves.fpr[-1] == 1 and curves.tpr[-1] == 1
    assert curves.recall.max() == 1 and curves.precision.min() > 0
    same = score_curves(np.array([0, 0, 1, 1]), score[:4])  # unknown labels are left out
    np.testing.assert_array_equal(curves.fpr, same.fpr)
    np.testing.assert_array_equal(curves.tpr, same.tpr)


def test_confusion_at_counts_the_labelled_samples(plain):
    result, run = plain
    labels = run.labels.copy()
    labels[:7] = -1
    score = run.samples["anomaly_score"].to_numpy()
    for threshold in (run.threshold, float(np.median(score))):
        table = confusion_at(labels, score, threshold)
        assert table.to_numpy().sum() == np.sum(labels >= 0)
        known = labels >= 0
        called = score[known] > threshold
        truth = labels[known] == 1
        assert table.loc["label anomaly", "called anomaly"] == np.sum(truth & called)
        assert table.loc["label normal", "called anomaly"] == np.sum(~truth & called)
        assert table.loc["label anomaly", "called normal"] == np.sum(truth & ~called)
    at_run = confusion_at(run.labels, score, run.threshold)
    assert at_run["called anomaly"].sum() == result.scores.is_anomaly.sum()


def test_verdict_agreement_counts(plain):
    _, run = plain
    samples = run.samples
    flagged = list(samples["id"][samples["is_anomaly"] == 1][:2])
    normal = list(samples["id"][samples["is_anomaly"] == 0][:3])
    verdicts = {flagged[0]: ("anomaly", ""), flagged[1]: ("normal", "fine"),
                normal[0]: ("normal", ""), normal[1]: ("normal", ""), normal[2]: ("unsure", "?")}
    table = verdict_agreement(samples, verdicts)
    assert list(table.index) == ["normal", "anomaly", "unsure"]
    assert list(table.columns) == ["model normal", "model anomaly"]
    expected = [[2, 1], [0, 1], [1, 0]]
    assert table.to_numpy().tolist() == expected
    assert table.to_numpy().sum() == len(verdicts)


def test_judged_samples_mark_where_the_expert_and_the_model_disagree(plain):
    _, run = plain
    samples = run.samples
    flagged = list(samples["id"][samples["is_anomaly"] == 1][:3])
    normal = list(samples["id"][samples["is_anomaly"] == 0][:3])
    verdicts = {flagged[0]: ("anomaly", ""), flagged[1]: ("normal", "a thick seven"), flagged[2]: ("unsure", ""),
                normal[0]: ("normal", ""), normal[1]: ("anomaly", "smudged"), normal[2]: ("unsure", "")}
    judged = judged_samples(samples, {**verdicts, "not-a-sample": ("anomaly", "")})
    assert list(judged.columns) == ["id", "verdict", "note", "model", "anomaly_score", "rank", "disagrees"]
    assert set(judged["id"]) == set(verdicts)  # a verdict on an id the run lacks is left out
    assert list(judged["rank"]) == sorted(judged["rank"])  # most anomalous first
    assert set(judged.loc[judged["disagrees"], "id"]) == {flagged[1], normal[1]}
    row = judged.set_index("id").loc[normal[1]]
    assert (row["verdict"], row["note"], row["model"]) == ("anomaly", "smudged", "normal")
    assert row["anomaly_score"] == samples.set_index("id").loc[normal[1], "anomaly_score"]


# ---------------------------------------------------------------------------- comparison and bundle


def test_compare_runs_of_the_same_data(plain, guided):
    (_, before), (_, after) = plain, guided
    comparison = compare_runs(before, after)
    assert list(comparison.metrics.columns) == [before.name, after.name]  # the runs' folder names, as the studio calls them
    for run in (before, after):
        column = comparison.metrics[run.name]
        assert column["kept"] == run.samples["kept"].sum()
        assert column["kept"] + column["removed"] == len(run.samples)
        assert column["called anomaly"] == run.samples["is_anomaly"].sum()
        assert column["auroc"] == pytest.approx(run.metrics.auroc)
    differs = before.samples["is_anomaly"].to_numpy() != after.samples["is_anomaly"].to_numpy()
    assert differs.any(), "the verdicts changed some calls"
    changed = comparison.changed
    assert list(changed["id"]) == list(before.samples["id"][differs])
    assert (changed[f"is_anomaly {before.name}"] != changed[f"is_anomaly {after.name}"]).all()
    assert compare_runs(before, before).changed.empty
    unlabelled = [copy.copy(run) for run in (before, after)]
    for run in unlabelled:
        run.samples = run.samples.drop(columns="label")
    assert list(compare_runs(*unlabelled).metrics.index) == ["kept", "removed", "called anomaly", "threshold"], \
        "without labels, no rows of empty metrics"


def test_compare_runs_of_different_data_is_an_error(plain, image_run):
    with pytest.raises(DataError, match="different samples"):
        compare_runs(plain[1], image_run[1])


def test_bundle_holds_the_run_and_opens_and_scores_identically(image_run, demo, tmp_path):
    result, _ = image_run
    run_dir = tmp_path / result.run_dir.name
    shutil.copytree(result.run_dir, run_dir)
    (run_dir / ".notes.json").write_text("{}")
    (run_dir / ".scores.csv.1234.tmp").write_text("partial")
    (run_dir / "scores.csv.partial").write_text("partial")
    (run_dir / ".cache").mkdir()
    (run_dir / ".cache" / "stale.json").write_text("{}")

    with zipfile.ZipFile(io.BytesIO(bundle(run_dir))) as archive:
        names = archive.namelist()
        assert all(name.startswith(f"{run_dir.name}/") for name in names)
        files = {Path(name).relative_to(run_dir.name).as_posix() for name in names}
        assert {"config.json", "run.json", "scores.csv", "embeddings.safetensors", "refinement.json"} <= files
        assert not [f for f in files if any(part.startswith(".") for part in Path(f).parts)], files
        assert not [f for f in files if "partial" in f or f.endswith(".tmp")], files
        expected = {p.relative_to(result.run_dir).as_posix() for p in result.run_dir.rglob("*") if p.is_file()}
        assert files == expected, "everything the run needs, nothing else"
        assert json.loads(archive.read(f"{run_dir.name}/run.json"))["run_id"] == result.run_id
        archive.extractall(tmp_path / "unzipped")

    opened = engine.open_run(tmp_path / "unzipped" / run_dir.name)
    every_tenth = demo.subset(np.arange(0, len(demo), 10))
    again, original = opened.score(every_tenth), engine.open_run(result.run_dir).score(every_tenth)
    np.testing.assert_allclose(again.anomaly_score, original.anomaly_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again.is_anomaly, original.is_anomaly)
    assert opened.localizer is not None, "the localization model travels in the bundle"
