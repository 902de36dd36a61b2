"""Tile lists of the static (CUDA-graph) path: the count graph's full-grid lists, sliced to a
size class's capacities, equal lists computed at that capacity; the class graphs then do no
tile-list work."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sigec
from sigec.models.configs import MODELS, build
from sigec.runtime.masks import blob_mask
from sigec.runtime.tiles import (
    TileTable,
    edit_masks,
    full_tile_lists,
    grid_size,
    tile_counts,
    tile_grids,
)


def _program(name):
    model, args, kwargs = build(name, seed=0)
    config = sigec.SparseConfig(**MODELS[name].sige_config, cuda_graphs=True)
    engine = sigec.compile(model, args, kwargs, config=config)
    engine.record(*args, **kwargs)  # warms up: the size classes
    return engine, args, kwargs


@pytest.mark.parametrize("name", ["sd15-unet-tiny", "gaugan-tiny", "ddpm-tiny"])
@pytest.mark.parametrize("fraction", [0.02, 0.2])
def test_sliced_full_lists_equal_lists_at_the_capacity(name, fraction):
    engine, args, _ = _program(name)
    prog, config = engine.program, engine.config
    mask = blob_mask(*args[0].shape[-2:], fraction, seed=1, num_blobs=2)[None]
    masks = edit_masks(prog, mask, config.mask_threshold, config.mask_level_dilation)
    keys = sorted(prog.tile_requests)
    grids = tile_grids(prog, masks, keys)
    counts = tile_counts(prog, grids, keys).tolist()
    full = full_tile_lists(prog, masks, grids, keys)
    classes = engine.path.classes
    s = classes.choose(counts)
    # the class that holds the edit, and the last one (it holds everything; classes are not
    # nested, so the next index may be smaller in some list)
    for chosen in (s, len(classes) - 1):
        caps = classes.capacities(chosen)
        for k, c in zip(keys, counts, strict=True):
            grid = grid_size(prog.tile_requests[k], masks[prog.tile_requests[k].mask].shape[-2:])
            assert c <= caps[k] <= grid, k
        want = TileTable(prog, masks, capacities=caps, grids=grids)
        got = TileTable(prog, masks, capacities=caps, grids=grids, full=full)
        for k in keys:
            a, b = want[k], got[k]
            assert (a.out_tile, a.in_tile) == (b.out_tile, b.in_tile), k
            assert torch.equal(a.num_active, b.num_active), k
            n = int(a.num_active)  # rows past the count are padding: their values do not matter
            assert torch.equal(a.out_corners[:n], b.out_corners[:n]), k
            assert torch.equal(a.in_corners[:n], b.in_corners[:n]), k
            assert b.capacity == caps[k]


def test_the_edit_graph_runs_no_tile_list_work():
    engine, args, kwargs = _program("sd15-unet-tiny")
    x = args[0]
    mask = blob_mask(*x.shape[-2:], 0.05, seed=0, num_blobs=1)
    engine.edit(torch.where(mask, torch.randn_like(x), x), *args[1:], mask=mask, **kwargs)
    path = engine.path
    ops = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            ops[func.__name__.split(".")[0]] += 1
            return func(*a, **(kw or {}))

    with Count():
        path._body(path.last.size_class)
    assert ops["nonzero_static"] == 0 and ops["floor_divide"] == 0  # all in the count graph


@pytest.mark.parametrize(
    "k, s, p, op, d",
    [
        (4, 2, 1, 0, 1),
        (3, 2, 1, 1, 1),
        (3, 2, 0, 1, 2),
        (5, 3, 2, 2, 1),
        (2, 2, 0, 0, 1),
        (3, 1, 1, 0, 1),
    ],
)
def test_transposed_tiles_are_the_dense_transposed_conv(k, s, p, op, d):
    """Each output tile of a transposed conv (a multiple of the stride, at a multiple of it)
    comes from its input window (``transposed_window``): the window's transposed conv, padded
    and cut by ``transposed_crop``, is the dense one there; and the exact policy's mask spread
    is the transposed conv of the mask."""
    import torch.nn.functional as F

    from sigec.runtime.program import MaskRule, transposed_crop, transposed_window
    from sigec.runtime.tiles import _spread_transposed

    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 7, 6), torch.randn(2, 3, k, k)
    dense = F.conv_transpose2d(x, w, stride=s, padding=p, output_padding=op, dilation=d)
    keff, tile = d * (k - 1) + 1, 2 * s
    first, size, _ = transposed_window(keff, s, p, tile)
    pad, off = transposed_crop(keff, s, p, tile)
    padded = F.pad(x, (64, 64, 64, 64))
    for oy in range(0, dense.shape[2], tile):
        for ox in range(0, dense.shape[3], tile):
            iy, ix = oy // s + first + 64, ox // s + first + 64
            window = padded[:, :, iy : iy + size, ix : ix + size]
            got = F.conv_transpose2d(window, w, stride=s, padding=pad, dilation=d)
            want = dense[:, :, oy : oy + tile, ox : ox + tile]
            got = got[:, :, off : off + want.shape[2], off : off + want.shape[3]]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    m = torch.rand(1, 7, 6) > 0.8
    rule = MaskRule("y", "conv_transpose", ("x",), (k, k), (s, s), (p, p), dilation=(d, d),
                    output_padding=(op, op))  # fmt: skip
    spread = F.conv_transpose2d(m.float()[None], torch.ones(1, 1, k, k), stride=s, padding=p,
                                output_padding=op, dilation=d)[0] > 0  # fmt: skip
    assert torch.equal(_spread_transposed(m, rule), spread)
