"""Tile layouts shared by the gather / scatter / restore tests.

Each case: (N, C, H, W, tile_h, tile_w, corners) with corners as a list of (y, x). Tiles never
overlap: that is scatter's contract (the tile grid of a conv never overlaps), and on a GPU
overlapping writes race. ``test_cases_do_not_overlap`` holds the table to it.
"""

import pytest
import torch


def _grid(h, w, th, tw):
    return [(y, x) for y in range(0, h, th) for x in range(0, w, tw)]


TILE_CASES = [
    # minimal: one sample, one channel, one tile covering the whole map
    pytest.param(1, 1, 4, 4, 4, 4, [(0, 0)], id="minimal"),
    # tile-aligned grid, every tile active
    pytest.param(1, 3, 8, 8, 4, 4, _grid(8, 8, 4, 4), id="aligned-all-tiles"),
    # ragged right and bottom edges: the map is not a multiple of the tile
    pytest.param(1, 2, 7, 9, 4, 4, _grid(7, 9, 4, 4), id="ragged-edges"),
    # tiles hanging off every border and corner (halo reads / writes outside the map)
    pytest.param(
        1, 3, 5, 7, 4, 4, [(y, x) for y in (-2, 2) for x in (-3, 1, 5)], id="off-every-border"
    ),
    # tiles wholly in the padding band (a 1x1 conv with padding 1 reads such input tiles)
    pytest.param(1, 2, 5, 5, 2, 2, [(5, 0), (-2, -2), (2, 2), (0, 6)], id="tiles-in-padding"),
    # a single interior tile
    pytest.param(1, 4, 9, 9, 3, 3, [(3, 3)], id="one-tile"),
    # zero active tiles
    pytest.param(2, 3, 5, 5, 3, 3, [], id="zero-tiles"),
    # batch > 1, non-square tiles
    pytest.param(3, 2, 6, 10, 3, 5, [(0, 0), (3, 5), (-1, 7)], id="batch3-nonsquare"),
    # channels not a multiple of the channel block (8x8 tiles: 64 channels per block)
    pytest.param(1, 70, 8, 16, 8, 8, [(0, 0), (-1, 8)], id="channels-70"),
    # a tile with more pixels than one pixel block (1024)
    pytest.param(1, 2, 40, 40, 33, 33, [(-1, -1), (32, 7)], id="big-tile"),
]


def corners_tensor(corners) -> torch.Tensor:
    return torch.tensor(corners, dtype=torch.int32).reshape(-1, 2)


# dtype, atol, rtol for fused arithmetic (pure data movement is always compared exactly)
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
]


def overlapping_pair(corners, th, tw):
    """The first pair of tiles that share a pixel, or None."""
    for i, (y0, x0) in enumerate(corners):
        for y1, x1 in corners[i + 1 :]:
            if abs(y0 - y1) < th and abs(x0 - x1) < tw:
                return (y0, x0), (y1, x1)
    return None


def vector_restore_items(device="cpu"):
    from sigec.kernels import restore_reference

    """Channels-last maps (both work and cache) whose channels allow vector copies, allocated so
    that some lie below the launch's first tensor in memory (negative offsets), with tiles off
    the borders, capacity padding and one NCHW map that takes the generic copy."""
    gen = torch.Generator().manual_seed(3)
    cases = [  # (n, c, h, w, tile, corners, count, dtype)
        (2, 16, 9, 7, 4, [(-2, -1), (0, 4), (5, 5), (8, 2)], 3, torch.float16),
        (1, 24, 6, 6, 3, [(0, 0), (3, 3)], None, torch.float16),
        (1, 64, 5, 8, 2, [(y, x) for y in range(-1, 5, 2) for x in range(-1, 8, 2)], 7,
         torch.float16),
        (1, 32, 8, 8, 4, [(0, 0), (4, 4), (2, 2)], None, torch.float32),
        (1, 16, 8, 8, 4, [(0, 0), (4, 4)], None, torch.float16),  # NCHW: generic
    ]  # fmt: skip
    items, wants = [], []
    for i, (n, c, h, w, t, corners, count, dtype) in enumerate(cases):
        fmt = torch.contiguous_format if i == len(cases) - 1 else torch.channels_last
        work = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(
            memory_format=fmt)  # fmt: skip
        cache = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(
            memory_format=fmt)  # fmt: skip
        co = corners_tensor(corners).to(device)
        cnt = torch.tensor([count], dtype=torch.int32, device=device) if count else None
        want = work.cpu().clone()
        restore_reference(want, cache.cpu(), co.cpu(), t, t, cnt.cpu() if cnt is not None else None)
        items.append((work, cache, co, cnt, t, t))
        wants.append(want)
    return items[::-1], wants[::-1]  # the NCHW map first, the fp16 maps in reverse allocation
