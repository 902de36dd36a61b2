"""Tile layouts shared by the gather / scatter / restore tests.

Each case: (N, C, H, W, tile_h, tile_w, corners) with corners as a list of (y, x).
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
        1,
        3,
        6,
        7,
        4,
        4,
        [(-2, -2), (-2, 2), (-3, 5), (2, -3), (2, 5), (4, -1), (4, 2), (5, 6)],
        id="off-every-border",
    ),  # fmt: skip
    # tiles wholly in the padding band (a 1x1 conv with padding 1 reads such input tiles)
    pytest.param(1, 2, 5, 5, 2, 2, [(5, 0), (-2, -2), (2, 2), (0, 6)], id="tiles-in-padding"),
    # a single interior tile
    pytest.param(1, 4, 9, 9, 3, 3, [(3, 3)], id="one-tile"),
    # zero active tiles
    pytest.param(2, 3, 5, 5, 3, 3, [], id="zero-tiles"),
    # batch > 1, non-square tiles
    pytest.param(3, 2, 6, 10, 3, 5, [(0, 0), (3, 5), (-1, 7)], id="batch3-nonsquare"),
    # channels not a multiple of the channel block (8x8 tiles: 64 channels per block)
    pytest.param(1, 70, 8, 8, 8, 8, [(0, 0), (-1, 3)], id="channels-70"),
    # a tile with more pixels than one pixel block (1024)
    pytest.param(1, 2, 40, 40, 33, 33, [(-1, -1), (20, 20)], id="big-tile"),
]


def corners_tensor(corners) -> torch.Tensor:
    return torch.tensor(corners, dtype=torch.int32).reshape(-1, 2)


# dtype, atol, rtol for fused arithmetic (pure data movement is always compared exactly)
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
]
