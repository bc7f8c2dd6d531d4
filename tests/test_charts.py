"""The studio's figures show all the data: the score histogram's axis spans every score, a heavy tail
gets a log axis named in the title, threshold labels never overlap, and the round view's votes put
no removed sample on the kept side."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.results import score_axis
from pages.components import charts

AXIS_PX = 50
"""Room the x axis's ticks and title take below the plot area, at the most."""


def heavy_tailed(seed: int = 0) -> np.ndarray:
    """Scores like the demo's: nearly all under 2,000, a few up to 29,000."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.lognormal(6.0, 0.6, 290), rng.uniform(3_000, 29_000, 9), [29_000.0]])


def axis_range_in_scores(figure, scores) -> tuple[float, float]:
    """The x axis's range in anomaly_score units, through the axis drawn for ``scores`` (which its title names)."""
    axis = score_axis(scores)
    assert f"{axis.scale} scale" in figure.layout.xaxis.title.text
    return tuple(float(v) for v in axis.inverse(np.array(figure.layout.xaxis.range)))


@pytest.mark.parametrize("scores", [
    heavy_tailed(),
    np.random.default_rng(1).normal(size=500),
    np.concatenate([np.random.default_rng(2).normal(size=300), [80.0, -40.0]]),  # heavy tails of both signs
], ids=["heavy positive", "gaussian", "heavy both signs"])
def test_the_histogram_axis_spans_every_score_and_every_bar_is_drawn(scores):
    figure = charts.score_histogram(scores, threshold=float(np.median(scores)), threshold_name="threshold")
    low, high = axis_range_in_scores(figure, scores)
    assert low <= scores.min() and high >= scores.max()
    assert sum(int(np.sum(bar.y)) for bar in figure.data) == len(scores)  # no sample left out of a bar
    for bar in figure.data:
        first, last = bar.customdata[0][0], bar.customdata[-1][1]  # bins in anomaly_score units
        assert first == pytest.approx(scores.min()) and last == pytest.approx(scores.max())
    counts = sum(np.asarray(bar.y) for bar in figure.data)
    assert counts.max() <= figure.layout.yaxis.range[1]  # no bar cut at the top either


def test_heavy_tailed_scores_get_a_log_axis_that_says_so():
    scores = heavy_tailed()
    title = charts.score_histogram(scores, threshold=1_500, threshold_name="threshold").layout.xaxis.title.text
    assert "log scale" in title
    counts = np.histogram(np.log10(scores), bins=charts.BINS)[0]
    assert counts.max() < len(scores) / 4  # the bulk spreads over many bars instead of one
    assert score_axis(np.random.default_rng(0).normal(size=100_000)).scale == "linear"
    assert score_axis(np.random.default_rng(0).exponential(size=10_000)).scale == "linear"
    both_signs = np.concatenate([np.random.default_rng(3).normal(size=300), [500.0]])
    assert "symmetric log scale" in charts.score_histogram(both_signs, threshold=0.0, threshold_name="t").layout.xaxis.title.text


def test_log_axis_ticks_are_round_scores_in_order():
    figure = charts.score_histogram(heavy_tailed(), threshold=1_500, threshold_name="threshold")
    shown = [float(text.replace(",", "")) for text in figure.layout.xaxis.ticktext]
    assert len(shown) >= 3 and shown == sorted(shown)
    assert np.allclose(np.log10(shown), figure.layout.xaxis.tickvals)
    low, high = figure.layout.xaxis.range
    assert all(low <= tick <= high for tick in figure.layout.xaxis.tickvals)


@pytest.mark.parametrize("lines", [(1_500.0, 1_500.0), (1_500.0, 1_501.0), (400.0, 28_000.0)],
                         ids=["same value", "a hair apart", "far apart"])
def test_threshold_labels_never_overlap(lines):
    figure = charts.score_histogram(heavy_tailed(), threshold=lines[0], threshold_name="threshold",
                                    other_lines={"run's threshold": lines[1]})
    labels = [note for note in figure.layout.annotations if "threshold" in note.text]
    assert len(labels) == 2
    for first, second in itertools.combinations(labels, 2):
        plot_px = figure.layout.height - figure.layout.margin.t - figure.layout.margin.b - AXIS_PX
        apart_px = abs(first.y - second.y) * plot_px
        assert apart_px >= 1.2 * first.font.size, (first.text, second.text)
    # and the bars stay below the labels
    top_label = min(note.y for note in labels) - charts.LABEL_ROW
    counts = sum(np.asarray(bar.y) for bar in figure.data)
    assert counts.max() <= top_label * figure.layout.yaxis.range[1]


def test_a_threshold_outside_the_scores_stays_on_the_axis():
    scores = heavy_tailed()
    figure = charts.score_histogram(scores, threshold=50_000.0, threshold_name="threshold")
    low, high = axis_range_in_scores(figure, scores)
    assert high >= 50_000.0 and low <= scores.min()


def test_vote_bars_put_removed_samples_only_on_the_flagged_side():
    votes = np.array([0, 0, 0, 1, 2, 3, 1, -1, 0, 2])
    kept = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 0], bool)
    removed = np.array([0, 0, 0, 1, 1, 0, 0, 1, 0, 0], bool)
    outcomes = {"kept": kept & (votes <= 0), "removed in this round": removed,
                "still out (removed earlier)": ~kept & ~removed, "flagged, kept": kept & (votes > 0)}
    figure = charts.vote_bars(votes, 3, outcomes)
    bars = {bar.name: dict(zip(bar.x, bar.y)) for bar in figure.data}
    assert sum(sum(counts.values()) for counts in bars.values()) == len(votes)
    for name in ("removed in this round", "still out (removed earlier)"):
        assert bars[name].get(0, 0) == 0
    assert bars["removed in this round"][-1] == 1  # the expert's confirmed anomaly, a bar of its own
    assert list(figure.layout.xaxis.ticktext) == ["expert: anomaly", "0 of 3", "1 of 3", "2 of 3", "3 of 3"]
    (rule,) = [shape for shape in figure.layout.shapes if shape.type == "line"]
    assert rule.x0 == rule.x1 == 0.5  # the line between kept (no vote) and flagged
