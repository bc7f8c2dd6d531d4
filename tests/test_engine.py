"""The engine facade: labels never train, runs round-trip, damaged runs are refused, registry state."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest

from core import engine
from core.config import FitConfig
from core.errors import DataError, RunError
from core.store import Registry
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
    assert FitConfig.load(tmp_path / "run" / "config.json") == FitConfig(detector="knn"), "auto resolved for tables"
    history = json.loads((tmp_path / "run" / "refinement.json").read_text())
    assert [r["round"] for r in history] == [r.round for r in result.rounds]
    [record] = registry.runs()
    assert record.status == "done" and len(registry.rounds(record.run_id)) == len(result.rounds)


def test_threshold_flags_the_estimated_share(tmp_path, registry):
    dataset = engine.load_data(write_digits_table(tmp_path / "t.csv"), label_column="label")
    result = engine.fit(dataset, FitConfig(gamma=0.2), tmp_path / "run", registry=registry)
    assert result.contamination == 0.2
    assert abs(result.scores.is_anomaly.mean() - 0.2) <= 1 / len(dataset) + 1e-9


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

    monkeypatch.setattr(engine, "iter_refine", broken)
    with pytest.raises(DataError, match="simulated"):
        engine.fit(dataset, FitConfig(), tmp_path / "run", registry=registry)
    assert not (tmp_path / "run").exists()
    assert not any(p.name.startswith(".run.partial") for p in tmp_path.iterdir())
    [record] = registry.runs()
    assert record.status == "failed" and "simulated" in record.message


def test_cancel_stops_the_fit(tmp_path, registry):
    from core.errors import Cancelled
    from core.progress import CancelToken

    token = CancelToken()
    token.cancel()
    dataset = engine.load_data(write_digits_images(tmp_path / "d", n_normal=20, n_anomalous=2))
    with pytest.raises(Cancelled):
        engine.fit(dataset, FitConfig(image_size=32, ensemble=3), tmp_path / "run", registry=registry, cancel=token)
    assert registry.runs()[0].status == "failed" and not (tmp_path / "run").exists()


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
