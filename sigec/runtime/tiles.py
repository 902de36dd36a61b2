"""Per-edit masks and tile lists: the edit mask -> a mask per resolution (or per node) -> tiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sigec.runtime.masks import (
    TileSet,
    in_corners_of,
    mask_pyramid,
    tile_grid,
    tile_indices,
    tiles_at,
)
from sigec.runtime.program import MaskRule, Program, TileRequest, transposed_window


def propagate_masks(rules: tuple[MaskRule, ...], input_mask: torch.Tensor, shapes: dict) -> dict:
    """Exact policy: every node's changed region, from the edit mask through each op's rule.

    Args:
        rules: in graph order.
        input_mask: bool ``[1, H, W]`` at the image inputs' resolution.
        shapes: node name -> (H, W) of spatial nodes (None for non-map nodes).

    Returns:
        node name -> bool ``[1, H, W]`` mask (``[1, 1, 1]`` flag for non-map nodes).
    """
    masks: dict[str, torch.Tensor] = {}
    dev = input_mask.device

    def changed(srcs):
        return any(bool(masks[s].any()) for s in srcs if s in masks)

    for r in rules:
        res = shapes.get(r.node)
        if r.kind == "input":
            m = input_mask
            if res is not None and tuple(m.shape[-2:]) != tuple(res):
                m = F.interpolate(m[None].float(), size=res, mode="nearest")[0] > 0
        elif r.kind == "conv":
            src = masks[r.srcs[0]].float()[None]
            ph, pw = r.padding
            src = F.pad(src, (pw, pw, ph, ph))
            m = F.max_pool2d(src, r.kernel, r.stride)[0] > 0
        elif r.kind == "union":
            m = torch.zeros((1, *res), dtype=torch.bool, device=dev)
            for s in r.srcs:
                m = m | masks[s]
        elif r.kind == "conv_transpose":
            m = _spread_transposed(masks[r.srcs[0]], r)
        elif r.kind == "upsample":
            f = r.factor
            m = masks[r.srcs[0]].repeat_interleave(f, 1).repeat_interleave(f, 2)
        elif r.kind == "pad":
            src = masks[r.srcs[0]]
            if r.pad_mode == "zeros":
                m = F.pad(src, r.pads)
            else:  # padded pixels copy map pixels: they change with them
                m = F.pad(src.float(), r.pads, mode=r.pad_mode) > 0
        elif r.kind == "resample":
            m = F.interpolate(masks[r.srcs[0]][None].float(), size=r.size, mode="nearest")[0] > 0
        else:  # "full": a global op
            shape = (1, *res) if res is not None else (1, 1, 1)
            m = torch.full(shape, changed(r.srcs), dtype=torch.bool, device=dev)
        if res is not None and tuple(m.shape[-2:]) != tuple(res):
            raise AssertionError(f"mask of {r.node}: {tuple(m.shape)} vs map {res}")
        masks[r.node] = m
    return masks


def _spread_transposed(src: torch.Tensor, r: MaskRule) -> torch.Tensor:
    """Output pixels of a transposed conv that a changed input pixel reaches: its inputs
    placed every ``stride`` pixels, then a max-pool over the (dilated) kernel's footprint."""
    (sh, sw), (kh, kw), (dh, dw) = r.stride, r.kernel, r.dilation
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    b, h, w = src.shape
    stuffed = torch.zeros(b, (h - 1) * sh + 1, (w - 1) * sw + 1, device=src.device)
    stuffed[:, ::sh, ::sw] = src.float()
    ph, pw = eh - 1 - r.padding[0], ew - 1 - r.padding[1]
    padded = F.pad(stuffed, (pw, pw + r.output_padding[1], ph, ph + r.output_padding[0]))
    return F.max_pool2d(padded[None], (kh, kw), stride=1, dilation=(dh, dw))[0] > 0


class TileTable:
    """The tile lists of one edit, computed on first use and kept for the edit's lifetime.

    ``table[key]`` gives the ``TileSet`` of ``program.tile_requests[key]``.
    """

    def __init__(self, program: Program, masks: dict, pad_to_grid: bool = False,
                 capacities: dict[str, int] | None = None, grids: dict | None = None,
                 full: dict | None = None):  # fmt: skip
        """``full``: ``full_tile_lists`` of this edit's masks; with ``capacities``, each list is
        then the first ``capacity`` rows of its full list (views: no kernel at all)."""
        self.program = program
        self.full = full
        self.masks = masks
        self.grids = grids or {}  # (mask key, tile) -> tile_grid, where already computed
        self.pad_to_grid = pad_to_grid
        self.capacities = capacities  # fixed list sizes per key (CUDA graphs' buckets)
        self._sets: dict[str, TileSet] = {}
        self._indices: dict[tuple, tuple] = {}

    def __getitem__(self, key: str) -> TileSet:
        ts = self._sets.get(key)
        if ts is None:
            ts = self._sets[key] = self._make(self.program.tile_requests[key], key)
        return ts

    def _make(self, req: TileRequest, key: str) -> TileSet:
        if self.full is not None and self.capacities is not None:
            out_corners, in_corners, count = self.full[key]
            cap = self.capacities[key]  # >= the active count: the rows past it are padding
            return TileSet(out_corners[:cap], in_corners[:cap], req.tile,
                           _in_tile(req), count)  # fmt: skip
        mask = self.masks[req.mask]
        capacity = None
        if self.capacities is not None:
            capacity = self.capacities[key]
        elif self.pad_to_grid:  # the whole grid: a size that does not depend on the mask
            capacity = grid_size(req, mask.shape[-2:])
        # lists of one mask and tile size share their grid coordinates (convs differ only in
        # their input corners)
        ikey = (req.mask, req.tile, capacity)
        if ikey not in self._indices:
            idx, count = tile_indices(mask, req.tile, capacity, self.grids.get(req.mask, {})
                                      .get(req.tile))  # fmt: skip
            self._indices[ikey] = tiles_at(idx, count, (1, 1), (1, 1), (0, 0), req.tile)
        base = self._indices[ikey]  # out corners are shared; in corners follow the geometry
        if req.in_scale != 1:  # nearest upsampling: input tiles at the lower resolution
            in_corners = base.out_corners // req.in_scale
        elif req.transposed:  # a transposed conv: the input window of each output tile
            in_corners = transposed_corners(base.out_corners, req)
        else:
            in_corners = in_corners_of(base.out_corners, req.stride, req.padding)
        return TileSet(base.out_corners, in_corners, req.tile, _in_tile(req), base.num_active)

    def used(self) -> dict[str, TileSet]:
        return dict(self._sets)


def _in_tile(req: TileRequest) -> tuple[int, int]:
    """Input tile size of a request: the conv's receptive field of an output tile, the tile at
    the lower resolution for nearest upsampling (``in_scale``), or a transposed conv's window."""
    th, tw = req.tile
    if req.in_scale != 1:
        return th // req.in_scale, tw // req.in_scale
    if req.transposed:
        return tuple(transposed_window(req.kernel[a], req.stride[a], req.padding[a], req.tile[a])[1]
                     for a in (0, 1))  # fmt: skip
    return (th - 1) * req.stride[0] + req.kernel[0], (tw - 1) * req.stride[1] + req.kernel[1]


def transposed_corners(out_corners: torch.Tensor, req: TileRequest) -> torch.Tensor:
    """Input window corners of a transposed conv's output tiles (``program.transposed_window``;
    python scalars only: no host data copied to the device)."""
    (sh, sw), (fh, fw) = req.stride, (
        transposed_window(req.kernel[a], req.stride[a], req.padding[a], req.tile[a])[0]
        for a in (0, 1))  # fmt: skip
    return torch.stack([out_corners[:, 0] // sh + fh, out_corners[:, 1] // sw + fw], dim=1)


def full_tile_lists(program: Program, masks: dict, grids: dict, keys) -> dict:
    """``{key: (out_corners, in_corners, count)}``: every tile list padded to its whole grid.

    The CUDA-graph path computes them in its count graph (one compiled graph, before the edit's
    sync); each edit graph then takes the first ``capacity`` rows, so the edit graph itself runs
    no tile-list bookkeeping. Lists of one mask and tile size share their indices.
    """
    table = TileTable(program, masks, pad_to_grid=True, grids=grids)
    return {k: (ts.out_corners, ts.in_corners, ts.num_active)
            for k in keys for ts in (table[k],)}  # fmt: skip


def grid_size(req: TileRequest, res) -> int:
    """Number of output tiles of ``req``'s grid over a map of resolution ``res``."""
    return -(-int(res[0]) // req.tile[0]) * -(-int(res[1]) // req.tile[1])


def tile_grids(program: Program, masks: dict, keys) -> dict:
    """``{mask key: {tile: tile_grid}}`` for the tile lists ``keys`` (each grid once)."""
    grids: dict = {}
    for k in keys:
        req = program.tile_requests[k]
        per_mask = grids.setdefault(req.mask, {})
        if req.tile not in per_mask:
            per_mask[req.tile] = tile_grid(masks[req.mask], req.tile)
    return grids


def tile_counts(program: Program, grids: dict, keys) -> torch.Tensor:
    """int64 ``[len(keys)]`` on the grids' device: active tiles of each tile list (no sync)."""
    reqs = [program.tile_requests[k] for k in keys]
    if not reqs:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([grids[r.mask][r.tile].sum() for r in reqs])


def edit_masks(program: Program, input_mask: torch.Tensor, threshold: float, dilation: int):
    """Masks keyed the way ``program.tile_requests`` refer to them, for either policy."""
    if program.policy == "exact":
        shapes = {r.node: None for r in program.mask_rules}
        shapes.update(program.node_resolutions)
        return propagate_masks(program.mask_rules, input_mask, shapes)
    return mask_pyramid(input_mask, program.resolutions, threshold, dilation)
