"""Rendering helpers: overlay, ground-truth contour, thresholded regions."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.explain.render import JET, colorize, mask_contour, overlay, threshold_map


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
