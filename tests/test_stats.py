"""core.stats against plain references: numpy, scikit-learn's covariance estimators, scipy's distance."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import OAS, LedoitWolf

from core.errors import Cancelled
from core.progress import CancelToken, Monitor
from core.stats import (
    CellMoments,
    GaussianMoments,
    greedy_coreset,
    ledoit_wolf_amount,
    mahalanobis,
    mahalanobis_terms,
    nearest_distance,
    oas_amount,
    sample_mean,
    shrink_covariance,
    squared_mahalanobis,
)


def correlated(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def empirical_covariance(X: np.ndarray) -> np.ndarray:
    centred = X - X.mean(axis=0)
    return centred.T @ centred / len(X)


# ----------------------------------------------------------------------------- moments

def test_gaussian_moments_summed_over_chunks_equal_the_moments_at_once():
    X = correlated(np.random.default_rng(0), 300, 5)
    chunks = np.array_split(X, [40, 41, 200])
    mean = sample_mean((len(chunk), chunk.sum(axis=0)) for chunk in chunks)
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=1e-12)
    summed = sum((GaussianMoments.of(chunk, mean) for chunk in chunks[1:]), GaussianMoments.of(chunks[0], mean))
    whole = GaussianMoments.of(X, mean)
    assert summed.count == whole.count == 300
    np.testing.assert_allclose(summed.scatter, whole.scatter, rtol=1e-12)
    assert summed.fourth == pytest.approx(whole.fourth, rel=1e-12)
    np.testing.assert_allclose(whole.scatter / 300, empirical_covariance(X), rtol=1e-10)
    squared_norms = ((X - mean) ** 2).sum(axis=1)
    assert whole.fourth == pytest.approx((squared_norms ** 2).sum(), rel=1e-12)


def test_gaussian_moments_about_different_centres_do_not_add():
    X = np.ones((4, 2))
    with pytest.raises(ValueError, match="different centres"):
        GaussianMoments.of(X, np.zeros(2)) + GaussianMoments.of(X, np.ones(2))


def test_cell_moments_in_batches_equal_numpy_per_cell():
    rng = np.random.default_rng(1)
    features = np.stack([correlated(rng, 50, 4) for _ in range(3)], axis=1).astype(np.float32)  # (50, 3, 4)
    moments = CellMoments(3, 4)
    for batch in np.array_split(features, [7, 8, 30]):
        moments.update(torch.from_numpy(batch))
    at_once = CellMoments(3, 4)
    at_once.update(torch.from_numpy(features))
    mean, covariance = moments.mean_and_covariance()
    mean_once, covariance_once = at_once.mean_and_covariance()
    assert moments.n == 50 and mean.dtype == covariance.dtype == torch.float64
    torch.testing.assert_close(mean, mean_once, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(covariance, covariance_once, rtol=1e-10, atol=1e-10)
    for cell in range(3):
        rows = features[:, cell].astype(np.float64)
        np.testing.assert_allclose(mean[cell].numpy(), rows.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(covariance[cell].numpy(), empirical_covariance(rows), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- shrinkage

@pytest.mark.parametrize("n,d", [(12, 6), (200, 5), (5, 30)])
def test_oas_matches_scikit_learn_in_numpy_and_in_a_torch_batch(n, d):
    rng = np.random.default_rng(n + d)
    samples = [correlated(rng, n, d) for _ in range(3)]
    covariances = np.stack([empirical_covariance(X) for X in samples])
    batch_amount = oas_amount(torch.from_numpy(covariances), n)
    batch_shrunk = shrink_covariance(torch.from_numpy(covariances), batch_amount)
    for index, X in enumerate(samples):
        reference = OAS().fit(X)
        amount = oas_amount(covariances[index], n)
        assert float(amount) == pytest.approx(reference.shrinkage_, rel=1e-10)
        np.testing.assert_allclose(shrink_covariance(covariances[index], amount), reference.covariance_, rtol=1e-9)
        assert float(batch_amount[index]) == pytest.approx(reference.shrinkage_, rel=1e-10)
        np.testing.assert_allclose(batch_shrunk[index].numpy(), reference.covariance_, rtol=1e-9)


def test_oas_edge_cases_one_feature_and_constant_data():
    one_feature = np.random.default_rng(0).normal(size=(20, 1))
    assert float(oas_amount(empirical_covariance(one_feature), 20)) == 0.0 == OAS().fit(one_feature).shrinkage_
    constant = np.zeros((2, 3, 3))
    assert np.array_equal(oas_amount(constant, 10), [1.0, 1.0])
    assert torch.equal(oas_amount(torch.zeros(2, 3, 3, dtype=torch.float64), 10), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("n,d", [(12, 6), (200, 5), (5, 30)])
def test_ledoit_wolf_from_sums_matches_scikit_learn(n, d):
    X = correlated(np.random.default_rng(n * d), n, d)
    moments = GaussianMoments.of(X, X.mean(axis=0))
    covariance = moments.scatter / n
    reference = LedoitWolf().fit(X)
    amount = ledoit_wolf_amount(covariance, moments.fourth, n)
    assert amount == pytest.approx(reference.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(shrink_covariance(covariance, amount), reference.covariance_, rtol=1e-9)


def test_shrinkage_ends_keep_the_covariance_or_only_its_mean_variance():
    covariance = empirical_covariance(correlated(np.random.default_rng(2), 40, 4))
    np.testing.assert_array_equal(shrink_covariance(covariance, 0.0), covariance)
    np.testing.assert_allclose(shrink_covariance(covariance, 1.0), np.trace(covariance) / 4 * np.eye(4), rtol=1e-12)


# ----------------------------------------------------------------------------- Mahalanobis

def test_mahalanobis_matches_scipy_in_numpy_and_torch():
    rng = np.random.default_rng(3)
    covariance = empirical_covariance(correlated(rng, 100, 5))
    precision, mean = np.linalg.inv(covariance), rng.normal(size=5)
    queries = rng.normal(size=(20, 5))
    expected = np.array([scipy_mahalanobis(q, mean, precision) for q in queries])
    np.testing.assert_allclose(np.sqrt(squared_mahalanobis(queries, mean, precision)), expected, rtol=1e-10)
    got = mahalanobis(torch.from_numpy(queries), torch.from_numpy(mean), torch.from_numpy(precision))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    terms = mahalanobis_terms(queries, mean, precision)
    np.testing.assert_allclose(terms.sum(axis=1), expected ** 2, rtol=1e-10)
    # float32 rows against a float64 Gaussian are measured in float64
    single = mahalanobis(torch.from_numpy(queries).float(), torch.from_numpy(mean), torch.from_numpy(precision))
    assert single.dtype == torch.float64
    np.testing.assert_allclose(single.numpy(), expected, rtol=1e-6)


def test_mahalanobis_with_one_gaussian_per_cell_matches_each_cell_alone():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 3, 5, generator=generator)
    mean = torch.randn(3, 5, generator=generator)
    factors = torch.randn(3, 5, 5, generator=generator)
    precision = factors @ factors.transpose(1, 2) + torch.eye(5)
    got = mahalanobis(features, mean, precision)
    assert got.shape == (4, 3)
    for cell in range(3):
        torch.testing.assert_close(got[:, cell], mahalanobis(features[:, cell], mean[cell], precision[cell]))


# ----------------------------------------------------------------------------- nearest distance

@pytest.mark.parametrize("support_images,clustered", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_nearest_distance_from_the_m_th_distinct_image_matches_brute_force(support_images, clustered):
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(9000, 4, generator=generator)          # more rows than one memory chunk
    owners = torch.randint(0, 40, (9000,), generator=generator)
    queries = torch.randn(50, 4, generator=generator)
    if clustered:   # each image owns a region, so the 16 nearest rows often share one image (exact path)
        owners = (memory[:, 0] > 0).long() + 2 * (memory[:, 1] > 0).long()
    got = nearest_distance(queries, memory, owners, support_images)
    distances = torch.cdist(queries.double(), memory.double())
    for row, query_distances in enumerate(distances):
        seen = set()
        for index in torch.argsort(query_distances).tolist():
            seen.add(int(owners[index]))
            if len(seen) == support_images:
                assert float(got[row]) == pytest.approx(float(query_distances[index]), abs=1e-4)
                break


def test_nearest_distance_needs_owners_beyond_one_image():
    with pytest.raises(ValueError, match="owner"):
        nearest_distance(torch.zeros(2, 3), torch.zeros(4, 3), None, 2)


# ----------------------------------------------------------------------------- coreset

def test_greedy_coreset_matches_a_brute_force_k_center():
    points = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    selected = greedy_coreset(points, 20, projection_dim=64, seed=3)     # 8 dims: no projection
    assert len(set(selected.tolist())) == 20
    chosen = [int(selected[0])]
    for _ in range(19):
        distance = torch.cdist(points, points[chosen]).min(dim=1).values
        chosen.append(int(torch.argmax(distance)))
    assert selected.tolist() == chosen
    assert greedy_coreset(points, 500).tolist() == list(range(200))


def test_greedy_coreset_covers_every_point_within_the_gap_between_selected_points():
    """k-center's guarantee: the covering radius is at most the smallest distance between two
    selected points (so at most twice the best possible radius)."""
    points = torch.randn(500, 6, generator=torch.Generator().manual_seed(1)).double()
    selected = greedy_coreset(points, 30, seed=0)
    radius = torch.cdist(points, points[selected]).min(dim=1).values.max()
    between = torch.cdist(points[selected], points[selected]) + torch.eye(30, dtype=torch.float64) * 1e9
    assert float(radius) <= float(between.min()) + 1e-5


def test_greedy_coreset_in_rounds_selects_what_one_point_at_a_time_greedy_selects():
    """Many picks per round (one pass over the points each), yet greedy's choices in greedy's order."""
    points = torch.randn(3000, 12, generator=torch.Generator().manual_seed(4)).double()
    events = []
    selected = greedy_coreset(points, 400, seed=1, monitor=Monitor(events.append))
    chosen, distance = [int(selected[0])], torch.full((3000,), float("inf"), dtype=torch.float64)
    for _ in range(399):
        distance = torch.minimum(distance, ((points - points[chosen[-1]]) ** 2).sum(dim=1))
        chosen.append(int(torch.argmax(distance)))
    assert selected.tolist() == chosen
    assert len(events) < 400 / 4, "each round (one report) should select several points"


def test_greedy_coreset_reports_progress_and_stops_when_cancelled():
    points = torch.randn(2000, 4, generator=torch.Generator().manual_seed(2))
    events = []
    greedy_coreset(points, 1100, monitor=Monitor(events.append))
    done = [e.done for e in events]
    assert {(e.stage, e.total) for e in events} == {("coreset", 1100)}
    assert done == sorted(set(done)) and done[0] == 0 and done[-1] == 1100
    assert done[1] > 1, "the first report after the start covers a whole round, not the random first point"
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        greedy_coreset(points, 1100, monitor=Monitor(cancel=token))
