"""STOC self-training through the engine: a self-supervised encoder trained on all data, retrained on
the kept data after every refinement round, saved per round, reopened for scoring."""
from __future__ import annotations

import numpy as np
import pytest

from core import engine
from core.arrays import read_arrays
from core.config import FitConfig
from core.data.builtin import DEMO_DIR, prepare_builtin
from core.errors import ConfigError, RunError
from core.registry import Registry
from core.results import RunResults

TINY = dict(image_size=32, epochs=2, retrain_epochs=1, rounds=2, localization="none", batch_size=64)


@pytest.fixture(scope="module")
def demo():
    return engine.load_data(DEMO_DIR)


@pytest.fixture(scope="module")
def contrastive_run(demo, tmp_path_factory):
    home = tmp_path_factory.mktemp("selftrain")
    result = engine.fit(demo, FitConfig(objective="contrastive", **TINY), home / "run",
                        registry=Registry(home / "registry.sqlite"))
    return result


def test_self_training_removes_planted_anomalies(contrastive_run, demo):
    removed = ~contrastive_run.kept
    base_rate = float(np.mean(demo.labels == 1))
    assert len(contrastive_run.rounds) == 2
    assert removed.any()
    assert np.mean(demo.labels[removed] == 1) > 3 * base_rate  # far above the 10% base rate
    assert contrastive_run.metrics.auroc > 0.8


def test_each_round_keeps_its_encoder_and_embeddings(contrastive_run):
    run_dir = contrastive_run.run_dir
    arrays = read_arrays(run_dir / "embeddings.safetensors")
    assert {"round_1", "round_2", "train"} <= set(arrays)
    assert not np.allclose(arrays["round_1"], arrays["round_2"])  # the representation was retrained
    assert not np.allclose(arrays["round_2"], arrays["train"])
    for round_number in (1, 2):  # after round 1 (before round 2) and after round 2 (the final one)
        assert (run_dir / f"ssl_encoder_round_{round_number}.safetensors").is_file()
    assert (run_dir / "ssl_encoder.safetensors").is_file()


def test_reopened_run_reproduces_the_training_scores(contrastive_run, demo):
    run = engine.open_run(contrastive_run.run_dir)  # refits the detector and checks the saved scores
    rescored = run.score(demo)
    np.testing.assert_allclose(rescored.anomaly_score, contrastive_run.scores.anomaly_score, rtol=1e-3, atol=1e-3)
    saved = RunResults(contrastive_run.run_dir)
    assert [r.round for r in saved.rounds] == [1, 2]


def test_contrastive_embeddings_are_unit_length(contrastive_run):
    train = read_arrays(contrastive_run.run_dir / "embeddings.safetensors")["train"]
    np.testing.assert_allclose(np.linalg.norm(train, axis=1), 1.0, rtol=1e-5)


def test_labels_do_not_change_a_self_supervised_fit(demo, tmp_path):
    config = FitConfig(objective="rotation", **{**TINY, "rounds": 1})
    registry = Registry(tmp_path / "registry.sqlite")
    data = demo.subset(np.arange(0, len(demo), 3))  # 100 images: the claim does not need more
    with_labels = engine.fit(data, config, tmp_path / "a", registry=registry)
    without = engine.fit(data.without_labels(), config, tmp_path / "b", registry=registry)
    np.testing.assert_array_equal(with_labels.scores.anomaly_score, without.scores.anomaly_score)


def test_table_self_training_with_imix(tmp_path):
    path = prepare_builtin("digits", tmp_path)
    table = engine.load_data(path, label_column="label")
    config = FitConfig(objective="contrastive-imix", epochs=3, retrain_epochs=1, rounds=2, label_column="label")
    result = engine.fit(table, config, tmp_path / "run", registry=Registry(tmp_path / "registry.sqlite"))
    assert result.config.encoder == "mlp"
    assert result.metrics.auroc > 0.7
    run = engine.open_run(tmp_path / "run")
    with pytest.raises(RunError, match="objective 'none'"):
        run.explain_rows(table)


def test_image_objectives_are_refused_for_tables(tmp_path):
    with pytest.raises(ConfigError, match="tables allow"):
        FitConfig(objective="rotation").validate().for_data("table")
    with pytest.raises(ConfigError, match="does not fit"):
        FitConfig(objective="contrastive", encoder="resnet18").validate().for_data("table")


def test_table_embeddings_keep_outliers_apart(tmp_path):
    """Far-out rows must stay far out in the learned table representation (no L2 normalisation)."""
    import pandas as pd

    from core.data.tables import table_dataset

    rng = np.random.default_rng(0)
    normal = rng.normal(size=(380, 8))
    outliers = rng.normal(size=(20, 8)) * 6.0
    labels = np.r_[np.zeros(380), np.ones(20)].astype(np.int8)
    table = table_dataset(pd.DataFrame(np.vstack([normal, outliers]).astype(np.float32)), tmp_path / "t.csv", labels)
    config = FitConfig(objective="contrastive", epochs=10, retrain_epochs=2, rounds=1)
    result = engine.fit(table, config, tmp_path / "run", registry=Registry(tmp_path / "registry.sqlite"))
    assert result.metrics.auroc > 0.9
