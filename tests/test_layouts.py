"""UMAP layouts: shapes, seeds, preserved clusters, alignment across rounds, the per-run cache."""
import shutil

import numpy as np
import pytest

from core import engine, layouts
from core.arrays import read_arrays, write_arrays
from core.config import FitConfig
from core.errors import Cancelled, ConfigError, DataError, RunError
from core.layouts import RunLayouts, round_layouts, run_layouts
from core.progress import CancelToken, Monitor
from core.registry import Registry
from sample_data import write_digits_table

RUN_SEED = 3


def two_blobs(n=120, dim=10, seed=0):
    """``(n, dim) float32`` points in two well separated Gaussian blobs, and each point's blob."""
    rng = np.random.default_rng(seed)
    blob = np.arange(n) % 2
    points = rng.normal(size=(n, dim)) + 8.0 * blob[:, None]
    return points.astype(np.float32), blob


def one_nn_accuracy(layout, blob):
    """Leave-one-out 1-NN accuracy of blob membership in the 2-D layout."""
    distances = np.linalg.norm(layout[:, None] - layout[None, :], axis=-1)
    np.fill_diagonal(distances, np.inf)
    return float(np.mean(blob[distances.argmin(axis=1)] == blob))


def test_one_embedding_gives_one_layout_that_keeps_the_blobs_apart():
    points, blob = two_blobs()
    layouts = round_layouts([points])
    assert layouts.shape == (1, len(points), 2) and layouts.dtype == np.float32
    assert np.all(np.isfinite(layouts))
    assert one_nn_accuracy(layouts[0], blob) > 0.95


def test_same_seed_same_layout_other_seed_other_layout():
    points, _ = two_blobs()
    np.testing.assert_array_equal(round_layouts([points], seed=1), round_layouts([points], seed=1))
    assert not np.allclose(round_layouts([points], seed=1), round_layouts([points], seed=2))


def test_identical_embeddings_share_one_layout():
    points, _ = two_blobs()
    layouts = round_layouts([points, points.copy(), points])
    assert layouts.shape == (1, len(points), 2)
    np.testing.assert_array_equal(layouts, round_layouts([points]))


def test_slightly_changed_embeddings_get_aligned_layouts():
    points, blob = two_blobs()
    changed = points + np.random.default_rng(1).normal(scale=0.05, size=points.shape).astype(np.float32)
    layouts = round_layouts([points, changed])
    assert layouts.shape == (2, len(points), 2) and layouts.dtype == np.float32
    again = round_layouts([points, changed])
    np.testing.assert_array_equal(layouts, again)
    spread = np.median(np.linalg.norm(layouts[0] - layouts[0].mean(axis=0), axis=1))
    displacement = np.median(np.linalg.norm(layouts[1] - layouts[0], axis=1))
    assert displacement < 0.1 * spread, "a sample should stay where it was when its embedding barely moved"
    assert all(one_nn_accuracy(layout, blob) > 0.95 for layout in layouts)


@pytest.mark.parametrize("n_states", [1, 2])
def test_large_data_is_fitted_on_a_subsample_and_the_rest_transformed(n_states):
    points, blob = two_blobs(n=160)
    states = [points + 0.05 * k for k in range(n_states)]
    layouts = round_layouts(states, max_fit_points=80)
    assert layouts.shape == (n_states, len(points), 2) and np.all(np.isfinite(layouts))
    assert all(one_nn_accuracy(layout, blob) > 0.95 for layout in layouts)
    np.testing.assert_array_equal(layouts, round_layouts(states, max_fit_points=80))


def test_small_data_clamps_the_neighbourhood_and_tiny_data_is_refused():
    points, _ = two_blobs(n=8)
    assert round_layouts([points]).shape == (1, 8, 2)
    with pytest.raises(DataError, match="at least 5 samples"):
        round_layouts([points[:4]])


def test_bad_embeddings_are_refused():
    points, _ = two_blobs(n=20)
    broken = points.copy()
    broken[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        round_layouts([points, broken])
    with pytest.raises(DataError, match="samples"):
        round_layouts([points, points[:10]])
    with pytest.raises(DataError, match="expected"):
        round_layouts([points[:, 0]])


def test_progress_is_reported_and_cancel_stops_before_the_fit():
    points, _ = two_blobs(n=40)
    events = []
    round_layouts([points], monitor=Monitor(events.append))
    assert [(e.stage, e.done, e.total) for e in events] == [("project", 0, 1), ("project", 1, 1)]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        round_layouts([points], monitor=Monitor(cancel=token))


def test_for_round_clamps_to_the_last_state():
    layouts = RunLayouts(np.arange(3 * 5 * 2, dtype=np.float32).reshape(3, 5, 2))
    np.testing.assert_array_equal(layouts.for_round(1), layouts.layouts[1])
    np.testing.assert_array_equal(layouts.for_round(7), layouts.layouts[2])
    single = RunLayouts(layouts.layouts[:1])
    for r in range(4):
        np.testing.assert_array_equal(single.for_round(r), single.layouts[0])
    with pytest.raises(ConfigError, match="round"):
        layouts.for_round(-1)


# ----------------------------------------------------------------------------- saved runs


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A refined run on a small digits table, made by the engine (do not modify: copy it)."""
    folder = tmp_path_factory.mktemp("project_run")
    dataset = engine.load_data(write_digits_table(folder / "t.csv"))
    result = engine.fit(dataset, FitConfig(seed=RUN_SEED), folder / "run", registry=Registry(folder / "reg.sqlite"))
    assert result.rounds, "the fixture needs a run with refinement rounds"
    return folder / "run"


@pytest.fixture
def run_dir(saved_run, tmp_path):
    return shutil.copytree(saved_run, tmp_path / "run")


def test_run_layouts_are_cached_and_read_back(run_dir, monkeypatch):
    computed = run_layouts(run_dir)
    train = read_arrays(run_dir / "embeddings.safetensors")["train"]
    assert computed.layouts.shape == (1, len(train), 2), "one embedding for every round: one layout"
    cache = read_arrays(run_dir / "layouts.safetensors")
    np.testing.assert_array_equal(cache["layouts"], computed.layouts)
    assert int(cache["seed"][0]) == RUN_SEED, "the seed defaults to the run's config seed"
    np.testing.assert_array_equal(computed.layouts, round_layouts([train], seed=RUN_SEED))

    def fail(*args, **kwargs):
        raise AssertionError("the cached layouts should have been read")

    monkeypatch.setattr(layouts, "round_layouts", fail)
    np.testing.assert_array_equal(run_layouts(run_dir).layouts, computed.layouts)


def test_stale_cache_is_recomputed(run_dir):
    n = len(read_arrays(run_dir / "embeddings.safetensors")["train"])
    write_arrays(run_dir / "layouts.safetensors", {
        "layouts": np.zeros((1, n - 1, 2), np.float32), "seed": np.array([RUN_SEED], np.int64),
    })
    assert run_layouts(run_dir).layouts.shape == (1, n, 2)
    (run_dir / "layouts.safetensors").write_bytes(b"garbage")
    fresh = run_layouts(run_dir)
    assert fresh.layouts.shape == (1, n, 2) and np.any(fresh.layouts != 0)
    other_seed = run_layouts(run_dir, seed=RUN_SEED + 1)
    assert not np.allclose(other_seed.layouts, fresh.layouts), "another seed is laid out anew"


def test_per_round_embeddings_give_one_aligned_layout_per_state(run_dir):
    path = run_dir / "embeddings.safetensors"
    arrays = read_arrays(path)
    n_rounds = len(read_arrays(run_dir / "refinement.safetensors")) // 3  # kept_, votes_, anomaly_score_
    rng = np.random.default_rng(0)
    for r in range(1, n_rounds + 1):
        arrays[f"round_{r}"] = arrays["train"] + rng.normal(scale=0.01, size=arrays["train"].shape).astype(np.float32)
    write_arrays(path, arrays)
    layouts = run_layouts(run_dir)
    assert layouts.layouts.shape == (n_rounds + 1, len(arrays["train"]), 2)
    np.testing.assert_array_equal(layouts.for_round(n_rounds + 5), layouts.layouts[-1])


def test_not_a_run_folder(tmp_path):
    with pytest.raises(RunError, match="not a Refinery run"):
        run_layouts(tmp_path)
