"""`refinery fit` / `score` end to end on real data from ../shared/data (marked realdata)."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from core.cli import main

pytestmark = pytest.mark.realdata


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))


def test_bottle_images_fit_on_train_score_test_with_maps(tmp_path, shared_data):
    bottle = shared_data("mvtec_ad_bottle_256", "bottle")
    run, scores_csv, maps = tmp_path / "run", tmp_path / "scores.csv", tmp_path / "maps"
    assert main(["fit", str(bottle / "train"), "--out", str(run), "--image-size", "128"]) == 0
    assert main(["score", str(run), str(bottle / "test"), "--out", str(scores_csv), "--maps", str(maps)]) == 0
    scores = pd.read_csv(scores_csv)
    assert len(scores) == 83 and set(scores["label"]) == {0, 1}
    assert roc_auc_score(scores["label"], scores["anomaly_score"]) >= 0.97
    first = scores["id"].iloc[0]
    anomaly_map = np.load(maps / first.replace(".png", ".npy"), allow_pickle=False)
    assert anomaly_map.shape == (256, 256) and anomaly_map.dtype == np.float32


def test_adbench_table_fit_and_score(tmp_path, shared_data):
    table = shared_data("adbench_classical", "4_breastw.npz")
    run, scores_csv = tmp_path / "run", tmp_path / "scores.csv"
    assert main(["fit", str(table), "--out", str(run)]) == 0
    assert main(["score", str(run), str(table), "--out", str(scores_csv)]) == 0
    scores = pd.read_csv(scores_csv)
    assert len(scores) == 683 and roc_auc_score(scores["label"], scores["anomaly_score"]) >= 0.95
