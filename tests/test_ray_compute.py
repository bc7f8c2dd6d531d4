"""RayCompute on a local Ray instance gives what the single-process path gives, from the API to the CLI."""
import logging
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import engine
from core.cli import main
from core.compute import CHUNK_ROWS, LocalCompute
from core.config import FitConfig
from core.data.builtin import DEMO_DIR
from core.data.dataset import Dataset
from core.detectors import make_detector
from core.errors import Cancelled, ConfigError, DataError
from core.models.image_encoder import ImageEncoder, embedding_memmap
from core.models.ssl_encoder import SelfSupervisedEncoder
from core.models.tabular import TableEncoder
from core.progress import CancelToken, Monitor
from core.registry import Registry
from core.results import RunResults
from sample_data import write_digits_table
from test_memory_scale import resident_kib

ray = pytest.importorskip("ray")
from core.distributed.ray_compute import RayCompute  # noqa: E402  (needs ray)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = dict(rtol=1e-6, atol=1e-8)
"""Float64 sums and products taken in another order: last-digit differences."""
EMBEDDING_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
"""Images embedded by actors with one torch thread each: float32 convolutions summed in another order."""


@pytest.fixture(scope="module")
def compute():
    """A local Ray instance for the module (RayCompute joins it and leaves it running)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    with RayCompute() as ray_compute:
        yield ray_compute
    ray.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def memmapped_features(tmp_path_factory):
    """``(N, 12) float32`` on disk, N spanning several object-store blocks, with a shifted cluster."""
    rng = np.random.default_rng(0)
    n = 2 * CHUNK_ROWS + 1000
    features = embedding_memmap(tmp_path_factory.mktemp("features") / "features.npy", n, 12)
    features[:] = rng.normal(size=(n, 12)) @ rng.normal(size=(12, 12))
    features[: n // 20] += 4.0
    return features


def disjoint_subsets(n, k, seed=0, *, shuffled=False):
    parts = np.array_split(np.random.default_rng(seed).permutation(n), k)
    return parts if shuffled else [np.sort(part) for part in parts]


# ------------------------------------------------------------------ a Ray instance of its own

# First in the module: it runs before the module's shared Ray instance starts, so two instances never
# compete for the two cores.
def test_cli_starts_and_stops_its_own_ray_instance(tmp_path, home):
    table = write_digits_table(tmp_path / "digits.csv", n_normal=60, n_anomalous=6)
    done = subprocess.run(
        [sys.executable, "-m", "core.cli", "fit", str(table), "--out", str(tmp_path / "run"), "--engine", "ray",
         "--label-column", "label"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "run saved to" in done.stdout
    assert "execution finished" not in done.stderr and "Progress bars" not in done.stderr, done.stderr
    assert engine.open_run(tmp_path / "run").threshold > 0


# ------------------------------------------------------------------ detector fits and scoring as tasks


def test_gde_ensemble_from_partition_sums_equals_the_local_fit(compute, memmapped_features):
    features = memmapped_features
    subsets = disjoint_subsets(len(features), 4)
    factory = partial(make_detector, "gde")
    local = LocalCompute().fit_detectors(factory, features, subsets)
    # Three partitions: the tree of additions has an odd one out.
    with RayCompute(workers=3) as three_partitions:
        distributed = three_partitions.fit_detectors(factory, features, subsets)
    for ours, theirs in zip(distributed, local):
        np.testing.assert_allclose(ours.location_, theirs.location_, **TOLERANCE)
        np.testing.assert_allclose(ours.precision_, theirs.precision_, **TOLERANCE)
        assert ours.shrinkage_ == pytest.approx(theirs.shrinkage_, rel=1e-9)
        assert ours.offset_ == pytest.approx(theirs.offset_, rel=1e-9)
    np.testing.assert_allclose(compute.score(distributed, features), LocalCompute().score(local, features), **TOLERANCE)


@pytest.mark.parametrize("name", ["knn", "iforest"])
def test_other_detectors_fit_as_one_task_per_subset_like_the_local_fit(compute, memmapped_features, name):
    # Subsets in no particular order: an isolation forest samples rows by position, so the rows
    # must reach it in the subset's order for the same trees.
    features = memmapped_features[:3000]
    subsets = disjoint_subsets(len(features), 3, shuffled=True)
    factory = partial(make_detector, name, random_state=0)
    local = LocalCompute().fit_detectors(factory, features, subsets)
    distributed = compute.fit_detectors(factory, features, subsets)
    np.testing.assert_allclose([d.offset_ for d in distributed], [d.offset_ for d in local], **TOLERANCE)
    np.testing.assert_allclose(compute.score(distributed, features), LocalCompute().score(local, features), **TOLERANCE)


def test_score_equals_local_for_any_rows_and_transductive_detectors(compute, memmapped_features):
    features = memmapped_features
    training = np.asarray(features[:2000])
    detectors = [make_detector(name).fit(training) for name in ("gde", "knn", "ecod")]
    assert detectors[2].transductive
    rows = np.random.default_rng(1).permutation(len(features))[: len(features) // 2]
    for selection in (rows, None):
        np.testing.assert_allclose(compute.score(detectors, features, selection),
                                   LocalCompute().score(detectors, features, selection), **TOLERANCE)
    # ECOD ranks a row against the others scored with it: one batch, whatever the blocks.
    alone = compute.score(detectors[2:], features, rows)
    in_chunks = np.concatenate([detectors[2].score_samples(np.asarray(features[part]))
                                for part in np.array_split(rows, 3)])
    assert not np.allclose(alone[0], in_chunks)
    assert compute.score(detectors, features, np.array([], dtype=np.int64)).shape == (3, 0)


# ------------------------------------------------------------------ embedding actors


def test_embedding_errors_and_cancellation_reach_the_caller_as_refinery_errors(compute, tmp_path):
    images = engine.load_data(DEMO_DIR).subset(np.arange(8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    images.paths[5] = broken
    with pytest.raises(DataError, match="broken.png"):
        compute.embed(ImageEncoder(FitConfig(image_size=32).for_data("images")), images)

    table = pd.DataFrame({"a": np.arange(3 * CHUNK_ROWS, dtype=float), "b": ["x", "y", "z"] * CHUNK_ROWS})
    rows = Dataset("table", [str(i) for i in range(len(table))], tmp_path / "t.csv", "t", table=table)
    encoder = TableEncoder().fit(rows)
    cancel = CancelToken()
    events = []

    def cancel_after_the_first_batch(event):
        events.append(event)
        cancel.cancel()

    with pytest.raises(Cancelled):
        compute.embed(encoder, rows, monitor=Monitor(cancel_after_the_first_batch, cancel))
    assert [(e.stage, e.total) for e in events] == [("embed", len(table))]

    ssl = SelfSupervisedEncoder(FitConfig(objective="rotation").for_data("images"), "images")
    with pytest.raises(ConfigError, match="frozen encoders only"):
        compute.embed(ssl, images)


def test_engine_fit_of_a_table_on_ray_is_the_local_fit_and_opens_in_the_app(compute, tmp_path, home):
    dataset = engine.load_data(write_digits_table(tmp_path / "digits.csv"), label_column="label")
    config = FitConfig(label_column="label")
    registry = Registry(tmp_path / "registry.sqlite")
    local = engine.fit(dataset, config, tmp_path / "local", registry=registry)
    events = []
    distributed = engine.fit(dataset, config, tmp_path / "ray", registry=registry, compute=compute,
                             monitor=Monitor(events.append))
    assert len(local.rounds) >= 1 and [r.round for r in distributed.rounds] == [r.round for r in local.rounds]
    np.testing.assert_array_equal(distributed.kept, local.kept)
    for ours, theirs in zip(distributed.rounds, local.rounds):
        np.testing.assert_array_equal(ours.removed, theirs.removed)
        np.testing.assert_array_equal(ours.votes, theirs.votes)
        np.testing.assert_allclose(ours.thresholds, theirs.thresholds, **TOLERANCE)
        assert ours.gamma == pytest.approx(theirs.gamma)
    np.testing.assert_allclose(distributed.scores.anomaly_score, local.scores.anomaly_score, **TOLERANCE)
    assert distributed.contamination == pytest.approx(local.contamination)
    assert ("embed", len(dataset), len(dataset)) in [(e.stage, e.done, e.total) for e in events]

    # The app's loaders read the run the Ray path saved, and it scores like the fit, on Ray or not.
    saved = RunResults(tmp_path / "ray")
    assert len(saved.samples) == len(dataset) and len(saved.rounds) == len(local.rounds)
    run = engine.open_run(tmp_path / "ray")
    for where in (compute, None):
        again = run.score(dataset, compute=where)
        np.testing.assert_allclose(again.anomaly_score, local.scores.anomaly_score, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the command line


def test_cli_fit_and_score_images_on_ray_give_the_local_scores(compute, tmp_path, home, capsys):
    images = tmp_path / "images"  # 100 of the demo's images: enough for K = 5 and quicker for the actors
    for kind, count in (("good", 80), ("other", 20)):
        (images / kind).mkdir(parents=True)
        for path in sorted((DEMO_DIR / kind).glob("*.png"))[:count]:
            shutil.copyfile(path, images / kind / path.name)
    fit = ["fit", str(images), "--image-size", "32", "--localization", "none"]
    assert main([*fit, "--out", str(tmp_path / "local")]) == 0
    assert main([*fit, "--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    trained = {name: pd.read_csv(tmp_path / name / "scores.csv") for name in ("local", "ray")}
    np.testing.assert_array_equal(trained["ray"]["kept"], trained["local"]["kept"])
    np.testing.assert_allclose(trained["ray"]["anomaly_score"], trained["local"]["anomaly_score"],
                               **EMBEDDING_TOLERANCE)

    # Scoring the training images locally gives the run's saved training scores (opening a run checks
    # that), so the local run's scores.csv stands for a local `refinery score`.
    assert main(["score", str(tmp_path / "ray"), str(images), "--out", str(tmp_path / "ray.csv"),
                 "--engine", "ray"]) == 0
    local, distributed = trained["local"].drop(columns=["kept", "round_removed"]), pd.read_csv(tmp_path / "ray.csv")
    assert list(distributed.columns) == list(local.columns) and distributed["id"].tolist() == local["id"].tolist()
    np.testing.assert_allclose(distributed["anomaly_score"], local["anomaly_score"], **EMBEDDING_TOLERANCE)
    threshold = engine.open_run(tmp_path / "ray").threshold
    clear = np.abs(local["anomaly_score"] - threshold) > 1e-3 * np.abs(threshold)
    np.testing.assert_array_equal(distributed["is_anomaly"][clear], local["is_anomaly"][clear])
    assert "Dataset" not in capsys.readouterr().err, "Ray Data's progress stays quiet"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are only handed back on Linux")
def test_embedding_into_a_memmap_matches_local_and_leaves_no_pages_resident(compute, tmp_path, home):
    dataset = engine.load_data(DEMO_DIR)
    encoder = ImageEncoder(FitConfig(image_size=32, batch_size=16).validate())
    path = tmp_path / "embeddings.npy"
    rows = embedding_memmap(path, len(dataset), encoder.embedding_dim)
    assert compute.embed(encoder, dataset, out=rows) is rows
    assert resident_kib(path) <= 8  # batches arrive in any order; all of them written, all pages handed back
    np.testing.assert_allclose(rows, LocalCompute().embed(encoder, dataset), **EMBEDDING_TOLERANCE)


def test_cli_refuses_a_bad_ray_address_in_one_line(compute, tmp_path, home, capsys):
    table = write_digits_table(tmp_path / "digits.csv")
    cases = {("--engine", "ray", "--address", "127.0.0.1:1"): "cannot reach a Ray cluster at 127.0.0.1:1",
             ("--engine", "ray", "--address", "head-node"): "Ray address must be auto, HOST:PORT or ray://HOST:PORT",
             ("--address", "auto"): "--address is the Ray cluster of --engine ray"}
    for options, message in cases.items():
        assert main(["fit", str(table), "--out", str(tmp_path / "run"), *options]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("refinery: error:") and message in err[-1], err
    assert not (tmp_path / "run").exists()


def test_without_ray_the_ray_engine_says_how_to_install_it(tmp_path, home, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    table = write_digits_table(tmp_path / "digits.csv")
    assert main(["fit", str(table), "--out", str(tmp_path / "run"), "--engine", "ray"]) == 1
    assert "the Ray engine needs Ray: pip install 'refinery[distributed]'" in capsys.readouterr().err
