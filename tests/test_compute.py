"""The local compute streams chunks of rows and gives what the detectors give on whole arrays."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.covariance import empirical_covariance, ledoit_wolf, oas, shrunk_covariance

from core import compute
from core.compute import LocalCompute, check_finite, fit_rows, row_chunks, score_rows
from core.data.dataset import Dataset
from core.detectors import GaussianDensity, make_detector
from core.errors import DataError
from core.models.tabular import TableEncoder
from core.progress import Monitor
from core.stats import GaussianMoments, sample_mean
from test_memory_scale import resident_kib


@pytest.fixture
def embeddings_file(tmp_path):
    """(9000, 12) float32 embeddings on disk, memory-mapped: more rows than one chunk holds."""
    rng = np.random.default_rng(3)
    rows = (rng.normal(size=(9000, 12)) * rng.uniform(0.2, 4.0, size=12) + 3.0).astype(np.float32)
    rows[::97] += 8.0  # a contaminated share
    np.save(tmp_path / "embeddings.npy", rows)
    return np.load(tmp_path / "embeddings.npy", mmap_mode="r")


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", "oas", 0.0, 0.4, 1.0])
@pytest.mark.parametrize("shape", [(60, 4), (12, 30), (200, 1)])
def test_gde_covariance_from_moments_is_sklearns(shrinkage, shape):
    rng = np.random.default_rng(sum(shape))
    X = rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape[1]) + 5.0
    gde = GaussianDensity(shrinkage=shrinkage).fit(X)
    if shrinkage == "ledoit-wolf":
        expected, amount = ledoit_wolf(X)
    elif shrinkage == "oas":
        expected, amount = oas(X)
    else:
        expected, amount = shrunk_covariance(empirical_covariance(X), shrinkage), shrinkage
    ridge = 1e-6 * np.trace(expected) / shape[1]
    np.testing.assert_allclose(gde.covariance_, expected + ridge * np.eye(shape[1]), rtol=1e-12, atol=1e-14)
    assert gde.shrinkage_ == pytest.approx(amount, abs=1e-12)


def test_moments_of_partitions_add_up_to_the_whole():
    X = np.random.default_rng(0).normal(size=(500, 7))
    parts = np.array_split(X, 6)
    mean = sample_mean((len(part), part.sum(axis=0)) for part in parts)
    summed = sum((GaussianMoments.of(part, mean) for part in parts[1:]), GaussianMoments.of(parts[0], mean))
    whole = GaussianMoments.of(X, X.mean(axis=0))
    assert summed.count == 500
    np.testing.assert_allclose(summed.centre, whole.centre, rtol=1e-12)
    np.testing.assert_allclose(summed.scatter, whole.scatter, rtol=1e-10)
    assert summed.fourth == pytest.approx(whole.fourth, rel=1e-10)


def test_moments_about_different_centres_do_not_add():
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match="different centres"):
        GaussianMoments.of(X, np.zeros(2)) + GaussianMoments.of(X, np.ones(2))


def test_fit_moments_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        GaussianDensity().fit_moments(GaussianMoments.of(np.ones((1, 3)), np.ones(3)), lambda fitted: np.zeros(1))


@pytest.mark.parametrize("detector", ["gde", "knn"])
def test_fit_rows_on_a_memmap_subset_is_the_in_memory_fit(embeddings_file, detector):
    rows = np.flatnonzero(np.arange(len(embeddings_file)) % 3 != 0)
    streamed = fit_rows(make_detector(detector), embeddings_file, rows)
    direct = make_detector(detector).fit(np.asarray(embeddings_file[rows]))
    probe = np.asarray(embeddings_file[:300])
    np.testing.assert_allclose(streamed.score_samples(probe), direct.score_samples(probe), rtol=1e-9, atol=1e-9)
    assert streamed.offset_ == pytest.approx(direct.offset_, rel=1e-9)


def test_a_detector_with_max_samples_reads_only_its_sample(embeddings_file):
    """The robust Gaussian fits on a seeded sample; fit_rows draws the same sample before reading rows."""
    rows = np.flatnonzero(np.arange(len(embeddings_file)) % 3 != 0)
    assert len(rows) > 5000
    streamed = fit_rows(make_detector("mcd", max_samples=1000), embeddings_file, rows)
    direct = make_detector("mcd", max_samples=1000).fit(np.asarray(embeddings_file[rows]))
    probe = np.asarray(embeddings_file[:300])
    np.testing.assert_allclose(streamed.score_samples(probe), direct.score_samples(probe), rtol=1e-9, atol=1e-9)
    assert compute.fitted_rows(make_detector("mcd", max_samples=1000), len(embeddings_file), rows).shape == (1000,)


def test_row_chunks_cover_the_rows_in_order(embeddings_file):
    rows = np.array([5, 2, 8000, 4097, 1])
    chunks = list(row_chunks(embeddings_file, rows, chunk_rows=2))
    assert [len(chunk) for chunk in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), embeddings_file[rows])
    assert sum(len(chunk) for chunk in row_chunks(embeddings_file)) == len(embeddings_file)


def test_score_rows_in_chunks_equals_one_batch(embeddings_file):
    assert len(embeddings_file) > compute.CHUNK_ROWS
    detectors = [make_detector("gde").fit(embeddings_file[:2000]), make_detector("knn").fit(embeddings_file[:500])]
    rows = np.arange(1, len(embeddings_file), 2)
    scores = score_rows(detectors, embeddings_file, rows)
    assert scores.shape == (2, len(rows))
    for k, detector in enumerate(detectors):
        np.testing.assert_allclose(scores[k], detector.score_samples(embeddings_file[rows]), rtol=1e-12)


def test_transductive_detectors_are_scored_in_one_batch(embeddings_file):
    pytest.importorskip("pyod", reason="the ECOD detector needs the optional package pyod")
    ecod = make_detector("ecod").fit(embeddings_file[:1000])
    assert ecod.transductive
    whole = ecod.score_samples(np.asarray(embeddings_file))
    np.testing.assert_allclose(score_rows([ecod], embeddings_file)[0], whole, rtol=1e-12)
    # Scored in chunks, the same rows would get other scores: the one batch is what keeps them.
    chunked = np.concatenate([ecod.score_samples(chunk) for chunk in row_chunks(embeddings_file, chunk_rows=1000)])
    assert not np.allclose(chunked, whole)


def test_score_dataset_in_chunks_equals_scoring_all_embeddings():
    rng = np.random.default_rng(1)
    n = compute.CHUNK_ROWS + 1500
    table = pd.DataFrame(rng.normal(size=(n, 5)), columns=list("abcde"))
    dataset = Dataset(kind="table", ids=[str(i) for i in range(n)], source=".", fingerprint="t", table=table)
    encoder = TableEncoder().fit(dataset)
    detector = make_detector("gde").fit(encoder.embed(dataset))
    events = []
    scores = LocalCompute().score_dataset(encoder, detector, dataset, monitor=Monitor(events.append))
    np.testing.assert_allclose(scores, detector.score_samples(encoder.embed(dataset)), rtol=1e-12)
    assert [event.total for event in events] == [n] * len(events)
    assert events[-1].done == n


def test_check_finite_names_the_problem(embeddings_file):
    assert check_finite(embeddings_file) is embeddings_file
    damaged = np.array(embeddings_file)
    damaged[8500, 3] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        check_finite(damaged)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are only handed back on Linux")
def test_a_pass_over_a_memmap_does_not_leave_it_resident(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.random.default_rng(0).normal(size=(20_000, 64)).astype(np.float32))  # 5 MiB
    features = np.load(path, mmap_mode="r")
    rows = np.flatnonzero(np.arange(len(features)) % 4 != 0)
    detector = fit_rows(make_detector("gde"), features, rows)
    score_rows([detector], features)
    assert resident_kib(path) <= 2 * compute.CHUNK_ROWS * 64 * 4 // 1024  # at most about the last chunk
    np.asarray(features).sum()  # a plain pass keeps the pages resident: the check above can fail
    assert resident_kib(path) >= features.nbytes // 1024

