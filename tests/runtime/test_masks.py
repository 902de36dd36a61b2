"""Tests for sigec/runtime/masks.py: mask properties (hypothesis) and the shared blob generator."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sigec.runtime.masks import (
    active_tiles,
    blob_mask,
    difference_mask,
    dilate,
    downsample_mask,
    mask_pyramid,
)


@st.composite
def masks(draw, max_side=24):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    b = draw(st.integers(1, 2))
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, w, generator=g) < density
    if draw(st.booleans()):  # a single pixel somewhere
        m[0, draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    return m


conv_shapes = st.tuples(
    st.sampled_from([1, 3, 5]),  # kernel
    st.sampled_from([1, 2]),  # stride
    st.integers(0, 2),  # padding
    st.tuples(st.integers(1, 7), st.integers(1, 7)),  # output tile
)


def _covered(tiles, shape):
    cov = torch.zeros(shape, dtype=torch.bool)
    bh, bw = tiles.out_tile
    for y, x in tiles.out_corners.tolist():
        cov[y : y + bh, x : x + bw] = True
    return cov


@settings(max_examples=150, deadline=None)
@given(masks(), conv_shapes)
def test_every_masked_pixel_lies_in_an_active_tile(mask, conv):
    kernel, stride, padding, tile = conv
    tiles = active_tiles(mask, kernel, stride, padding, tile)
    assert _covered(tiles, mask.shape[1:])[mask.any(0)].all()


@settings(max_examples=150, deadline=None)
@given(masks(), conv_shapes)
def test_no_tile_is_active_without_a_masked_pixel(mask, conv):
    kernel, stride, padding, tile = conv
    tiles = active_tiles(mask, kernel, stride, padding, tile)
    bh, bw = tiles.out_tile
    union = mask.any(0)
    for y, x in tiles.out_corners.tolist():
        assert union[y : y + bh, x : x + bw].any()
    # input tiles follow the conv geometry
    torch.testing.assert_close(
        tiles.in_corners, tiles.out_corners * stride - padding, atol=0, rtol=0
    )
    assert tiles.in_tile == ((bh - 1) * stride + kernel, (bw - 1) * stride + kernel)


@settings(max_examples=100, deadline=None)
@given(masks(), conv_shapes, st.integers(0, 30))
def test_capacity_lists_match_exact_lists(mask, conv, extra):
    kernel, stride, padding, tile = conv
    exact = active_tiles(mask, kernel, stride, padding, tile)
    m = exact.out_corners.shape[0]
    padded = active_tiles(mask, kernel, stride, padding, tile, capacity=m + extra)
    assert padded.capacity == m + extra
    assert int(padded.num_active) == m
    torch.testing.assert_close(padded.out_corners[:m], exact.out_corners, atol=0, rtol=0)
    torch.testing.assert_close(padded.in_corners[:m], exact.in_corners, atol=0, rtol=0)


@settings(max_examples=100, deadline=None)
@given(masks(), conv_shapes, st.integers(0, 30), st.integers(1, 8))
def test_capacity_lists_keep_raster_order_and_pad_with_the_first_cell(mask, conv, extra, short):
    """Too small a capacity keeps the first tiles in raster order (count = capacity); padding
    rows are grid cell (0, 0)."""
    kernel, stride, padding, tile = conv
    exact = active_tiles(mask, kernel, stride, padding, tile)
    m = exact.out_corners.shape[0]
    cap = max(1, m - short) if m > 1 else 1
    cut = active_tiles(mask, kernel, stride, padding, tile, capacity=cap)
    assert int(cut.num_active) == min(m, cap)
    torch.testing.assert_close(cut.out_corners[: min(m, cap)], exact.out_corners[:cap], atol=0,
                               rtol=0)  # fmt: skip
    padded = active_tiles(mask, kernel, stride, padding, tile, capacity=m + extra)
    assert (padded.out_corners[m:] == 0).all()


@settings(max_examples=150, deadline=None)
@given(masks(max_side=40), st.integers(1, 40), st.integers(1, 40))
def test_pyramid_never_loses_a_nonempty_mask(mask, h, w):
    levels = mask_pyramid(mask, [(h, w), tuple(mask.shape[1:])])
    for level in levels.values():
        assert level.shape == (mask.shape[0], *level.shape[1:])
        torch.testing.assert_close(level.flatten(1).any(1), mask.flatten(1).any(1))


def test_pyramid_keeps_the_input_level_and_downsamples_others():
    m = torch.zeros(1, 32, 32, dtype=torch.bool)
    m[0, 8:16, 8:16] = True
    levels = mask_pyramid(m, [(32, 32), (16, 16), (8, 8)], dilation=0)
    assert levels[(32, 32)] is m
    assert levels[(16, 16)][0, 4:8, 4:8].all() and levels[(16, 16)].sum() == 16
    assert levels[(8, 8)][0, 2:4, 2:4].all() and levels[(8, 8)].sum() == 4


def test_downsample_dilates_by_one_and_upsample_is_nearest():
    m = torch.zeros(16, 16, dtype=torch.bool)
    m[4:8, 4:8] = True
    down = downsample_mask(m, (8, 8), dilation=1)
    assert down.shape == (8, 8) and down[1:5, 1:5].all() and down.sum() == 16
    up = downsample_mask(m, (32, 32), dilation=0)
    torch.testing.assert_close(up, m.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_difference_mask_any_channel_and_eps():
    a = torch.zeros(2, 3, 5, 5)
    b = a.clone()
    b[0, 2, 1, 1] = 0.5
    b[1, 0, 4, 4] = 0.01
    d = difference_mask(a, b, eps=0.1)
    assert d.shape == (2, 5, 5) and d.sum() == 1 and d[0, 1, 1]
    assert difference_mask(a[0], b[0]).shape == (5, 5)
    with pytest.raises(ValueError, match="edited: expected the shape"):
        difference_mask(a, b[:, :2])


def test_dilate_square():
    m = torch.zeros(7, 7, dtype=torch.bool)
    m[3, 3] = True
    assert dilate(m, 2).sum() == 25 and dilate(m, 2)[1:6, 1:6].all()
    assert torch.equal(dilate(m, 0), m)
    m[0, 0] = True  # dilation clips at borders
    assert dilate(m, 1)[0:2, 0:2].all()


@pytest.mark.parametrize("fraction", [0.012, 0.05, 0.15, 0.3])
@pytest.mark.parametrize("size", [(256, 256), (64, 128), (37, 53)])
def test_blob_mask_area_and_determinism(fraction, size):
    h, w = size
    for seed in range(3):
        m = blob_mask(h, w, fraction, seed=seed)
        assert m.dtype == torch.bool and m.shape == size
        area = m.sum().item()
        # a bisection on the radius lands within one ring of pixels of the target
        assert abs(area - fraction * h * w) <= max(0.01 * fraction * h * w, 4 * math.sqrt(h * w))
        assert torch.equal(m, blob_mask(h, w, fraction, seed=seed))


def test_blob_mask_is_compact_blobs():
    m = blob_mask(128, 128, 0.05, seed=3, num_blobs=1)
    ys, xs = m.nonzero(as_tuple=True)
    # one blob: its bounding box is not much bigger than the blob itself
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert box.item() <= 2.0 * m.sum().item()


def test_blob_mask_extremes_and_errors():
    assert blob_mask(8, 8, 1.0).all()
    assert not blob_mask(8, 8, 0.0).any()
    assert blob_mask(64, 64, 1e-6).sum() >= 1
    with pytest.raises(ValueError, match="num_blobs"):
        blob_mask(8, 8, 0.1, num_blobs=4)


@pytest.mark.parametrize("size", [(8, 16), (32, 64), (5, 7)], ids=["int-8", "int-32", "ragged"])
def test_block_reductions_equal_adaptive_pools(size):
    """The reshape-reduction path of the mask pyramid equals the adaptive pools it replaces."""
    import torch.nn.functional as F

    from sigec.runtime.masks import _area_and_footprint

    src = (torch.rand(2, 1, 64, 128) > 0.7).float()
    cover, foot = _area_and_footprint(src, *size)
    assert torch.equal(cover, F.interpolate(src, size=size, mode="area"))
    assert torch.equal(foot, F.adaptive_max_pool2d(src, size))


def test_tile_grid_equals_ceil_max_pool():
    import torch.nn.functional as F

    from sigec.runtime.masks import tile_grid

    for h, w in ((12, 18), (13, 17)):
        m = torch.rand(h, w) > 0.9
        want = F.max_pool2d(m[None, None].float(), 6, 6, ceil_mode=True)[0, 0] > 0
        assert torch.equal(tile_grid(m, 6), want)


def test_difference_mask_counts_nan_changes_but_not_nan_that_stays():
    """|NaN - x| > eps is False: without care, a NaN painted into the image would be left out of
    the edit (and a NaN in the record never repaired)."""
    a = torch.zeros(1, 2, 4, 4)
    a[0, 1, 3, 3] = float("nan")  # a NaN in the record...
    a[0, 0, 0, 3] = float("inf")
    b = a.clone()
    b[0, 0, 1, 1] = float("nan")  # ...a new one in the edit
    b[0, 1, 3, 3] = 0.5  # the recorded one repaired
    b[0, 0, 2, 2] = float("nan")
    a[0, 0, 2, 2] = float("nan")  # one that stays NaN: no change
    m = difference_mask(a, b)[0]
    assert m[1, 1] and m[3, 3] and not m[2, 2] and not m[0, 3]  # inf that stays: no change
    assert m.sum() == 2
