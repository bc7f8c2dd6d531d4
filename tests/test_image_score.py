"""Image scores from maps (core.image_score): each choice through the CLI, out-of-fold training scores,
`refinery score` computing new images' scores the same way, tables resolving to pooled, the auto rule."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.cli import main
from core.config import FitConfig
from core.errors import ConfigError
from core.explain import image_scores_from_maps
from core.image_score import (
    MAP_REDUCTION, MAP_TOP_SHARE, TEXTURE_CUTOFF, ImageScoreChoice, choose_image_score, location_share,
)
from core.metrics import detection_metrics
from core.run_dir import read_embeddings
from sample_data import write_digits_table

SIDE = 64
FIT = ["--image-size", str(SIDE), "--ensemble", "3", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Small convolutions on a shared CPU: one torch thread (see conftest)."""


def stripes(rng: np.random.Generator) -> np.ndarray:
    """A normal texture: stripes at a random angle and phase, plus noise; (SIDE, SIDE) uint8."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    value = 0.5 + 0.25 * np.sin(0.6 * (x * np.cos(angle) + y * np.sin(angle)) + phase) + rng.normal(0, 0.05, (SIDE, SIDE))
    return np.clip(value * 255, 0, 255).astype(np.uint8)


def with_defect(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bright checkered square of side 14 at a random place: a local defect."""
    top, left = rng.integers(4, SIDE - 18, 2)
    yy, xx = np.mgrid[0:14, 0:14]
    image = image.copy()
    image[top:top + 14, left:left + 14] = np.where((yy // 4 + xx // 4) % 2, 255, 200)
    return image


def write_texture_set(folder, n_normal: int, n_defect: int, seed: int):
    """``good/`` striped images and ``defect/`` ones with a planted square (folder names are the labels)."""
    rng = np.random.default_rng(seed)
    for index in range(n_normal + n_defect):
        image = stripes(rng)
        sub = "good" if index < n_normal else "defect"
        if sub == "defect":
            image = with_defect(image, rng)
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / sub / f"{index:03d}.png")
    return folder


def write_object_set(folder, n: int, seed: int):
    """An aligned object: a bright disc of slightly varying size in the middle of a dark frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n):
        radius = rng.uniform(16, 20)
        disc = ((y - SIDE / 2) ** 2 + (x - SIDE / 2) ** 2 < radius ** 2) * 200 + rng.normal(0, 5, (SIDE, SIDE))
        Image.fromarray(np.clip(disc + 20, 0, 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def texture_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_score")
    return write_texture_set(root / "train", 30, 4, seed=0), write_texture_set(root / "new", 12, 4, seed=1)


@pytest.fixture(scope="module")
def runs(texture_data, tmp_path_factory):
    """One run per image score choice on the training set; the CLI's output of each."""
    train, _ = texture_data
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for choice in ("pooled", "map", "auto"):
        run = root / choice
        code = main(["fit", str(train), "--out", str(run), *FIT, "--image-score", choice])
        assert code == 0
        made[choice] = run
    return made


def saved_choice(run) -> ImageScoreChoice:
    return ImageScoreChoice.from_dict(json.loads((run / "run.json").read_text())["image_score"])


def test_each_choice_is_saved_and_the_scores_are_that_choice(runs):
    pooled, mapped = pd.read_csv(runs["pooled"] / "scores.csv"), pd.read_csv(runs["map"] / "scores.csv")
    assert saved_choice(runs["pooled"]).used == "pooled" and saved_choice(runs["map"]).used == "map"
    detector = read_embeddings(runs["map"])["train_anomaly_score"]
    np.testing.assert_allclose(pooled["anomaly_score"], read_embeddings(runs["pooled"])["train_anomaly_score"])
    assert not np.allclose(mapped["anomaly_score"], detector), "the map run's scores are not the detector's"
    info = json.loads((runs["map"] / "run.json").read_text())
    assert mapped["is_anomaly"].tolist() == (mapped["anomaly_score"] > info["threshold"]).astype(int).tolist()
    labels = mapped["id"].str.startswith("defect/").to_numpy().astype(int)
    metrics = detection_metrics(labels, mapped["anomaly_score"].to_numpy(), mapped["is_anomaly"].to_numpy())
    assert metrics.auroc > 0.95, "the planted squares score highest on the map score"


def test_auto_picks_the_map_for_a_texture_and_the_cli_says_why(texture_data, tmp_path, capsys):
    train, _ = texture_data
    assert main(["fit", str(train), "--out", str(tmp_path / "run"), *FIT]) == 0
    out = capsys.readouterr().out
    choice = saved_choice(tmp_path / "run")
    assert choice.requested == "auto" and choice.used == "map" and choice.location_share < TEXTURE_CUTOFF
    assert f"image score: {choice.describe()}" in out and "texture-like" in out


def test_training_map_scores_are_out_of_fold(runs, texture_data, tmp_path):
    """A kept normal training image is not scored lower than a new normal image of the same kind (it would
    be, in-sample: its own patches are in the final localizer's memory)."""
    _, new = texture_data
    frame = pd.read_csv(runs["map"] / "scores.csv")
    normal_kept = frame["id"].str.startswith("good/") & (frame["kept"] == 1)
    assert main(["score", str(runs["map"]), str(new), "--out", str(tmp_path / "new.csv")]) == 0
    fresh = pd.read_csv(tmp_path / "new.csv")
    fresh_normal = fresh.loc[fresh["id"].str.startswith("good/"), "anomaly_score"].to_numpy()
    training = frame.loc[normal_kept, "anomaly_score"].to_numpy()
    # P(training score > new score) over pairs: 0.5 when exchangeable, near 0 when in-sample.
    above = np.mean(training[:, None] > fresh_normal[None, :])
    assert above >= 0.3, f"training images score systematically lower than new ones ({above:.2f})"
    in_sample = pd.read_csv(_rescore(runs["map"], frame, tmp_path))
    in_sample_normal = in_sample.set_index("id").loc[frame.loc[normal_kept, "id"], "anomaly_score"].to_numpy()
    assert np.median(in_sample_normal) < np.median(training), "the final localizer's own training images score lower"


def _rescore(run, frame, tmp_path):
    """The final localizer's (in-sample) scores of the run's training images."""
    source = json.loads((run / "run.json").read_text())["data_source"]
    out = tmp_path / "in_sample.csv"
    assert main(["score", str(run), source, "--out", str(out)]) == 0
    return out


def test_refinery_score_computes_new_scores_from_the_maps(runs, texture_data, tmp_path):
    _, new = texture_data
    scores_csv, maps = tmp_path / "s.csv", tmp_path / "maps"
    assert main(["score", str(runs["map"]), str(new), "--out", str(scores_csv), "--maps", str(maps)]) == 0
    scores = pd.read_csv(scores_csv)
    from_maps = image_scores_from_maps([np.load(maps / f"{i[:-4]}.npy") for i in scores["id"]],
                                       MAP_REDUCTION, MAP_TOP_SHARE)
    np.testing.assert_allclose(scores["anomaly_score"], from_maps, rtol=1e-6)
    threshold = json.loads((runs["map"] / "run.json").read_text())["threshold"]
    assert scores["is_anomaly"].tolist() == (scores["anomaly_score"] > threshold).astype(int).tolist()
    again = tmp_path / "again.csv"
    assert main(["score", str(runs["map"]), str(new), "--out", str(again)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(again), scores)
    pooled = tmp_path / "pooled.csv"
    assert main(["score", str(runs["pooled"]), str(new), "--out", str(pooled)]) == 0
    assert not np.allclose(pd.read_csv(pooled)["anomaly_score"], scores["anomaly_score"])


def test_tables_resolve_to_pooled_and_refuse_the_map(tmp_path, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    assert main(["fit", str(table), "--out", str(tmp_path / "run")]) == 0
    assert saved_choice(tmp_path / "run").used == "pooled"
    assert "image score pooled" in capsys.readouterr().out
    assert main(["fit", str(table), "--out", str(tmp_path / "map"), "--image-score", "map"]) == 1
    assert "image_score 'map'" in capsys.readouterr().err
    assert FitConfig(image_score="auto", localization="none").for_data("images").image_score == "pooled"
    with pytest.raises(ConfigError, match="localization is 'none'"):
        FitConfig(image_score="map", localization="none").validate()


def test_auto_rule_on_constructed_cases(texture_data, tmp_path):
    train, _ = texture_data
    config = FitConfig(image_size=SIDE, device="cpu")
    texture = location_share(sorted((train / "good").glob("*.png")), config)
    aligned = location_share(sorted(write_object_set(tmp_path / "discs", 24, seed=0).glob("*.png")), config)
    assert texture < TEXTURE_CUTOFF <= aligned
    assert choose_image_score("auto", texture).used == "map"
    assert choose_image_score("auto", aligned).used == "pooled"
    assert choose_image_score("pooled", texture).used == "pooled" and choose_image_score("map", aligned).used == "map"
