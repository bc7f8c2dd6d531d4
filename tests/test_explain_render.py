"""Rendering helpers: colour scale, heatmap, colour bar, overlay, ground-truth contour, thresholded regions."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.explain.render import (
    JET,
    MIN_SPAN,
    ColourScale,
    colorize,
    colour_bar,
    heatmap,
    hot_pixels,
    image_scale,
    mask_contour,
    normal_floor,
    overlay,
    run_scale,
    scale_images,
    threshold_map,
    with_colour_bar,
)


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)


def test_overlay_keeps_shape_and_dtype(image):
    amap = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    out = overlay(image, amap, alpha=0.4, vmax=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_overlay_alpha_ends_are_the_image_and_the_colours(image):
    amap = np.random.default_rng(1).random((40, 60))
    assert np.array_equal(overlay(image, amap, alpha=0.0, vmax=1.0), image)
    assert np.array_equal(overlay(image, amap, alpha=1.0, vmax=1.0), colorize(amap, 0.0, 1.0))


def test_a_value_has_one_colour_across_maps_at_a_fixed_scale():
    low_map = np.full((4, 4), 0.5)
    high_map = np.full((4, 4), 0.5)
    high_map[0, 0] = 3.0
    assert np.array_equal(colorize(low_map, 0, 4.0)[1:, 1:], colorize(high_map, 0, 4.0)[1:, 1:])
    # Without a scale each map is spread over its own range, so 0.5 is coloured differently.
    assert not np.array_equal(colorize(low_map)[1, 1], colorize(high_map)[1, 1])


def test_colorize_clips_to_the_table_ends_and_maps_nan_low():
    amap = np.array([[-5.0, 0.0, 1.0, 9.0, np.nan]])
    colours = colorize(amap, 0.0, 1.0)
    assert np.array_equal(colours[0, [0, 1, 4]], np.repeat(JET[:1], 3, axis=0))
    assert np.array_equal(colours[0, [2, 3]], np.repeat(JET[-1:], 2, axis=0))
    assert JET[0, 2] > JET[0, 0] and JET[-1, 0] > JET[-1, 2]  # low end blue, high end red


def test_overlay_rejects_a_map_of_another_size(image):
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((20, 30)))


def test_overlay_accepts_grayscale():
    gray = np.full((5, 6), 100, np.uint8)
    out = overlay(gray, np.zeros((5, 6)), alpha=0.0)
    assert out.shape == (5, 6, 3) and np.all(out == 100)


def _boundary(mask):
    """Mask pixels with a 4-neighbour outside the mask or outside the image (computed directly)."""
    padded = np.pad(mask, 1, constant_values=False)
    outside_neighbour = ~padded[:-2, 1:-1] | ~padded[2:, 1:-1] | ~padded[1:-1, :-2] | ~padded[1:-1, 2:]
    return mask & outside_neighbour


def test_mask_contour_draws_exactly_the_mask_boundary(image):
    mask = np.zeros((40, 60), bool)
    mask[10:25, 5:20] = True
    mask[30:40, 40:60] = True  # touches the image border
    mask[12, 30] = True  # a single pixel is all boundary
    color = (1, 2, 3)
    out = mask_contour(image, mask, color)
    changed = np.any(out != image, axis=2)
    drawn = np.all(out == color, axis=2)
    boundary = _boundary(mask)
    assert not np.any(changed & ~boundary)
    assert np.all(drawn[boundary])
    assert out.dtype == np.uint8 and np.array_equal(image[~boundary], out[~boundary])


def test_mask_contour_thickness_widens_inwards_only(image):
    mask = np.zeros((40, 60), bool)
    mask[10:30, 10:40] = True
    out = mask_contour(image, mask, (0, 0, 0), thickness=3)
    drawn = np.any(out != image, axis=2)
    assert not np.any(drawn & ~mask)
    assert drawn[10:13, 10:40].all() and not drawn[13:27, 13:37].any()


def test_threshold_boxes_enclose_their_components_and_drop_tiny_ones():
    amap = np.zeros((50, 70), np.float32)
    amap[5:15, 10:30] = 2.0  # 200 px
    amap[30:45, 50:52] = 3.0  # 30 px
    amap[32, 10] = 5.0  # 1 px: dropped
    amap[20, 40] = amap[21, 41] = 4.0  # 2 px diagonal: one component, dropped
    mask, boxes = threshold_map(amap, threshold=1.0, min_area=16)

    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    assert count == len(boxes) == 2
    assert boxes == [(10, 5, 30, 15), (50, 30, 52, 45)]
    for index, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        ys, xs = np.nonzero(labels == index)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    assert not mask[32, 10] and not mask[20, 40]
    assert np.array_equal(mask, (amap > 1.0) & (amap < 4.0))


def test_threshold_is_strict_and_diagonals_connect():
    amap = np.zeros((10, 10))
    amap[np.arange(6), np.arange(6)] = 1.0
    mask, boxes = threshold_map(amap, 1.0, min_area=1)
    assert not mask.any() and boxes == []
    mask, boxes = threshold_map(amap, 0.5, min_area=6)
    assert boxes == [(0, 0, 6, 6)] and mask.sum() == 6


# ------------------------------------------------------------------------ colour scale and heatmap


def test_normal_floor_is_the_quantile_of_the_pooled_normal_values():
    maps = [np.arange(100, dtype=np.float32).reshape(10, 10), np.arange(100, 200, dtype=np.float32).reshape(10, 10)]
    assert normal_floor(maps, 0.99) == pytest.approx(np.quantile(np.arange(200), 0.99))
    assert normal_floor(maps, 0.5) == pytest.approx(99.5)


def test_run_scale_tops_at_the_worst_maps_quantile_and_keeps_a_minimum_span():
    hot = np.zeros((10, 10))
    hot[:5] = 40.0
    scale = run_scale(10.0, [hot], "feature distance", quantile=0.9)
    assert (scale.floor, scale.top, scale.units) == (10.0, 40.0, "feature distance")
    # a clean run: its worst maps barely pass the floor, so the top is held MIN_SPAN above it
    assert run_scale(10.0, [np.full((4, 4), 10.1)]).top == pytest.approx(10.0 * (1 + MIN_SPAN))
    assert run_scale(0.0, [np.zeros((4, 4))]).top == 1.0


def test_image_scale_keeps_the_floor_and_tops_at_the_images_peak():
    run = ColourScale(10.0, 40.0, "u")
    amap = np.full((6, 6), 5.0)
    amap[2, 3] = 25.0
    assert image_scale(run, amap) == ColourScale(10.0, 25.0, "u")
    assert image_scale(run, np.full((6, 6), 3.0)).top == pytest.approx(10.0 * (1 + MIN_SPAN))


def test_a_scale_needs_a_top_above_its_floor():
    with pytest.raises(ValueError, match="floor < top"):
        ColourScale(3.0, 3.0)
    with pytest.raises(ValueError, match="floor < top"):
        ColourScale(float("nan"), 3.0)


def test_heatmap_is_transparent_at_and_below_the_floor_and_coloured_above(image):
    scale = ColourScale(10.0, 20.0)
    amap = np.full((40, 60), 9.0)
    amap[0, :] = 10.0        # exactly the floor: transparent
    amap[:, 0] = np.nan      # no value: transparent
    amap[10:20, 10:20] = 15.0
    amap[30:35, 40:50] = 50.0
    out = heatmap(image, amap, scale, alpha=0.5)
    above = amap > 10.0
    assert np.array_equal(out[~above], image[~above])
    assert np.array_equal(hot_pixels(amap, scale), above)
    assert np.array_equal(out[above], overlay(image, amap, 0.5, 10.0, 20.0)[above])
    assert np.all(np.any(out[above] != image[above], axis=1))


def test_heatmap_colours_run_from_the_floor_to_the_top(image):
    scale = ColourScale(10.0, 20.0)
    amap = np.full((40, 60), 10.001)
    amap[:, 30:] = 20.0
    amap[:, 50:] = 99.0
    out = heatmap(image, amap, scale, alpha=1.0)
    assert np.all(out[:, :30] == JET[0]) and np.all(out[:, 30:] == JET[-1])
    assert np.array_equal(hot_pixels(amap, scale, level=1.0), amap > 20.0)


def test_per_run_colours_mean_one_value_on_every_image_per_image_do_not(image):
    run = ColourScale(10.0, 40.0)
    faint, strong = np.full((40, 60), 5.0), np.full((40, 60), 5.0)
    faint[5, 5] = strong[5, 5] = 20.0
    strong[30, 30] = 40.0
    assert np.array_equal(heatmap(image, faint, run)[5, 5], heatmap(image, strong, run)[5, 5])
    assert not np.array_equal(heatmap(image, faint, image_scale(run, faint))[5, 5],
                              heatmap(image, strong, image_scale(run, strong))[5, 5])


def test_scale_images_are_kept_samples_and_the_most_anomalous():
    score = np.array([0.1, 5.0, 0.3, 9.0, 0.2, 7.0, 0.0])
    kept = np.array([1, 0, 1, 0, 1, 0, 1])
    normal, top = scale_images(score, kept, n=3, seed=0)
    assert top.tolist() == [3, 5, 1]
    assert len(normal) == 3 and set(normal) <= {0, 2, 4, 6} and normal.tolist() == sorted(normal)
    assert np.array_equal(scale_images(score, kept, n=3, seed=0)[0], normal)
    assert scale_images(score, kept, n=10)[0].tolist() == [0, 2, 4, 6]


def _bar_colour_rows(bar):
    """Rows of the bar's left column that are a colour of the table (not the white or black of the text)."""
    column = bar[:, 0].astype(int)
    return [row for row in range(len(column)) if any((JET.astype(int) == column[row]).all(axis=1))]


def test_colour_bar_runs_from_the_top_colour_down_to_the_floor_colour():
    bar = colour_bar(ColourScale(12.0, 36.0, "feature distance"), height=240)
    assert bar.shape[0] == 240 and bar.dtype == np.uint8 and bar.shape[2] == 3
    rows = _bar_colour_rows(bar)
    assert len(rows) > 150
    assert np.array_equal(bar[rows[0], 0], JET[-1]) and np.array_equal(bar[rows[-1], 0], JET[0])
    indices = [int(np.flatnonzero((JET == bar[row, 0]).all(axis=1))[0]) for row in rows]
    assert indices == sorted(indices, reverse=True)


def test_colour_bar_writes_its_values_and_units():
    """The labels are pixels; compare bars whose only difference is a value or the units."""
    base = colour_bar(ColourScale(12.0, 36.0, "feature distance"), height=240)
    other_top = colour_bar(ColourScale(12.0, 48.0, "feature distance"), height=240)
    other_units = colour_bar(ColourScale(12.0, 36.0, "score"), height=240)
    text = np.any(base[:, 20:] < 128, axis=2)
    assert text[:40].any() and text[-40:].any()        # units / top value above, floor value below
    assert base.shape != other_top.shape or not np.array_equal(base[:30], other_top[:30])
    assert base.shape != other_units.shape or not np.array_equal(base[:20], other_units[:20])


def test_with_colour_bar_keeps_the_heatmap_and_adds_the_bar_to_its_right(image):
    scale = ColourScale(0.0, 1.0, "u")
    shown = heatmap(image, np.zeros((40, 60)), scale)
    out = with_colour_bar(shown, scale)
    assert out.shape[0] == 40 and out.shape[1] > 60 and np.array_equal(out[:, :60], shown)
    assert np.array_equal(out[:, 66:], colour_bar(scale, 40))
