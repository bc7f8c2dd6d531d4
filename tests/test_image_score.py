"""Image scores from maps (core.image_score): each choice through the CLI, out-of-fold training scores,
both scores standardized and combined the same way at fit and at `refinery score`, each map computed once
(with or without saving maps), tables resolving to pooled, the auto rule."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import engine
from core.batches import load_batch_data, score_batch
from core.cli import main
from core.config import FitConfig
from core.errors import ConfigError
from core.explain import image_scores_from_maps
from core.detectors import make_detector
from core.image_score import MAP_REDUCTION, MAP_TOP_SHARE, ImageScoreChoice, choose_image_score, score_scale
from core.metrics import detection_metrics
from core.refine import cross_fitted_anomaly_scores
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
    for choice in ("pooled", "map", "both"):
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


def test_both_is_the_mean_of_the_standardized_out_of_sample_scores_at_fit_and_at_score(runs, texture_data, tmp_path):
    """The `both` run's training scores combine the pooled detector's cross-fitted scores with the map run's
    out-of-fold map scores on the saved scales (kept images' median and IQR); a new image is scored by the
    same formula from its pooled and map scores, so training and new scores share one scale."""
    both, mapped = saved_choice(runs["both"]), pd.read_csv(runs["map"] / "scores.csv")
    frame, arrays = pd.read_csv(runs["both"] / "scores.csv"), read_embeddings(runs["both"])
    kept = frame["kept"].to_numpy().astype(bool)
    pooled = cross_fitted_anomaly_scores(arrays["train"], np.arange(len(frame)), kept,
                                         lambda: make_detector("gde", random_state=0), folds=3, seed=0)
    assert both.scales == {"pooled": score_scale(pooled[kept]), "map": score_scale(mapped["anomaly_score"][kept])}
    np.testing.assert_allclose(frame["anomaly_score"], both.combine(pooled, mapped["anomaly_score"].to_numpy()), rtol=1e-6)
    labels = frame["id"].str.startswith("defect/").to_numpy().astype(int)
    assert detection_metrics(labels, frame["anomaly_score"].to_numpy(), frame["is_anomaly"].to_numpy()).auroc > 0.95
    _, new = texture_data
    scored = {}
    for choice in ("pooled", "map", "both"):
        assert main(["score", str(runs[choice]), str(new), "--out", str(tmp_path / f"{choice}.csv")]) == 0
        scored[choice] = pd.read_csv(tmp_path / f"{choice}.csv")["anomaly_score"].to_numpy()
    np.testing.assert_allclose(scored["both"], both.combine(scored["pooled"], scored["map"]), rtol=1e-6)


def test_auto_takes_the_map_and_the_cli_says_why(runs, texture_data, tmp_path, capsys):
    train, _ = texture_data
    assert main(["fit", str(train), "--out", str(tmp_path / "run"), *FIT]) == 0
    choice = saved_choice(tmp_path / "run")
    assert choice.requested == "auto" and choice.used == "map"
    assert f"image score: {choice.describe()}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "scores.csv"), pd.read_csv(runs["map"] / "scores.csv"))


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
    weights = engine.open_run(runs["map"]).localizer.score_weights()     # the images are at the working size
    from_maps = image_scores_from_maps([np.load(maps / f"{i[:-4]}.npy") * weights for i in scores["id"]],
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


def test_scoring_with_maps_computes_each_map_once_and_keeps_the_scores(runs, texture_data, tmp_path, monkeypatch):
    """`refinery score --maps` and a Score page batch of a map run compute each image's map once, for its file
    and its score, and score exactly as `refinery score` without maps; also for images whose own size is
    not the localizer's working size."""
    _, new = texture_data
    images = tmp_path / "resized"
    for path in sorted(new.rglob("*.png")):
        (images / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(path).resize((SIDE + 8, SIDE - 8)).save(images / path.parent.name / path.name)
    run = shutil.copytree(runs["map"], tmp_path / "run")
    opened = engine.open_run(run)
    computed = []
    original = type(opened.localizer)._map_batches

    def counted(self, paths, stage, monitor):
        for sizes, maps in original(self, paths, stage, monitor):
            computed.extend(sizes)
            yield sizes, maps

    monkeypatch.setattr(type(opened.localizer), "_map_batches", counted)
    n_images = len(list(images.rglob("*.png")))
    plain, with_maps, maps = tmp_path / "plain.csv", tmp_path / "maps.csv", tmp_path / "maps"
    assert main(["score", str(run), str(images), "--out", str(plain)]) == 0
    assert len(computed) == n_images
    assert main(["score", str(run), str(images), "--out", str(with_maps), "--maps", str(maps)]) == 0
    assert len(computed) == 2 * n_images, "each map is computed once with --maps"
    assert with_maps.read_text() == plain.read_text()
    assert {np.load(path).shape for path in maps.rglob("*.npy")} == {(SIDE - 8, SIDE + 8)}
    batch = score_batch(opened, load_batch_data(images, opened.column_choice()))
    assert len(computed) == 3 * n_images, "each map is computed once on the Score page"
    assert (batch.directory / "scores.csv").read_text() == plain.read_text()


def test_tables_resolve_to_pooled_and_refuse_the_map(tmp_path, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    assert main(["fit", str(table), "--out", str(tmp_path / "run")]) == 0
    assert saved_choice(tmp_path / "run").used == "pooled"
    assert "image score pooled" in capsys.readouterr().out
    for asked in ("map", "both"):
        assert main(["fit", str(table), "--out", str(tmp_path / asked), "--image-score", asked]) == 1
        assert f"image_score '{asked}'" in capsys.readouterr().err
    assert FitConfig(image_score="auto", localization="none").for_data("images").image_score == "pooled"
    with pytest.raises(ConfigError, match="localization is 'none'"):
        FitConfig(image_score="both", localization="none").validate()


def test_choose_image_score_takes_what_is_asked_and_the_map_for_auto():
    assert choose_image_score("auto").used == "map"
    assert [choose_image_score(asked).used for asked in ("pooled", "map", "both")] == ["pooled", "map", "both"]
    assert ImageScoreChoice.from_dict(None).used == "pooled", "runs saved before the choice used the pooled score"
