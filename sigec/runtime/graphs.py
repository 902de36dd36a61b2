"""Static-shape edits replayed from CUDA graphs (``SparseConfig(cuda_graphs=True)``).

An eager edit is host-bound: hundreds of small launches, each a few microseconds of Python and
driver time. With CUDA graphs the whole edit (mask pyramid -> tile lists -> restoring the previous
edit's tiles -> the edit graph) is one replay:

1. the edit mask is copied into a static buffer; the number of active tiles of every tile list is
   computed on the device and read once (the edit's only host sync);
2. each count is rounded up to a capacity bucket (a power of two, at most the tile grid): padding
   rows of a list write nowhere (``num_active``);
3. the tuple of capacities selects a graph; a new tuple is captured once (after an eager warm-up
   run, which is itself a correct edit), and replayed for every later edit that falls in it;
4. which tiles each map's op wrote is kept in fixed-size device buffers (the whole tile grid), so
   the next replay restores exactly those tiles, whatever bucket the previous edit used;
5. ``commit`` copies the dirty tiles from the working maps into the caches (O(active)); buffers
   never swap, since graphs hold their addresses.

Off CUDA the same static-shape path runs without capture (what the CPU tests exercise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sigec.kernels import restore
from sigec.runtime.tiles import TileTable, edit_masks, grid_size, tile_counts


def bucket(count: int, grid: int) -> int:
    """The capacity for ``count`` active tiles of a grid of ``grid``: next power of two."""
    cap = 1
    while cap < count:
        cap *= 2
    return min(cap, grid)


@dataclass
class _Entry:
    graph: object  # torch.cuda.CUDAGraph, or None off CUDA (run eagerly)
    capacities: dict
    outs: list | None = None
    tiles: TileTable | None = None
    pending_norm_sums: dict | None = None


class GraphedEdits:
    """The static-shape edit path of one slot (see the module docstring)."""

    def __init__(self, engine, state):
        prog = engine.program
        self.program, self.config, self.state, self.edit_gm = (
            prog,
            engine.config,
            state,
            (engine.edit_gm),
        )
        self.keys = sorted(prog.tile_requests)
        self.grid = {k: grid_size(prog.tile_requests[k], prog.tile_requests[k].mask)
                     for k in self.keys}  # fmt: skip
        dev = next(iter(state.buffers())).device
        self.maps = [n for n in prog.map_tiles if n in prog.maps]
        self.dirty = {}
        for name in self.maps:
            g = self.grid[prog.map_tiles[name]]
            self.dirty[name] = (torch.zeros(g, 2, dtype=torch.int32, device=dev),
                                torch.zeros(1, dtype=torch.int32, device=dev))  # fmt: skip
        self.static_mask = torch.zeros(1, *prog.input_resolution, dtype=torch.bool, device=dev)
        self.static_inputs: list | None = None
        self.entries: dict[tuple, _Entry] = {}
        self.last: _Entry | None = None
        self.pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self.captures = 0

    # -- one edit ------------------------------------------------------------------------------

    def _body(self, caps: dict) -> tuple[list, TileTable]:
        prog, state = self.program, self.state
        masks = edit_masks(prog, self.static_mask, self.config.mask_threshold,
                           self.config.mask_level_dilation)  # fmt: skip
        tiles = TileTable(prog, masks, capacities=caps)
        for name in self.maps:  # undo the previous edit, whatever its buckets were
            corners, count = self.dirty[name]
            th, tw = prog.tile_requests[prog.map_tiles[name]].tile
            restore(state.work(name), state.cache(name), corners, th, tw, count,
                    check_values=False)  # fmt: skip
        state.written, state.pending_norm_sums = {}, {}
        outs = list(self.edit_gm(state, tiles, *self.static_inputs))
        for name in self.maps:
            corners, count = self.dirty[name]
            key = prog.map_tiles[name]
            if key in tiles.used():
                ts = tiles[key]
                corners[: ts.capacity].copy_(ts.out_corners)
                count.copy_(ts.num_active)
            else:
                count.zero_()
        return outs, tiles

    def run(self, flat: list, edit_mask: torch.Tensor) -> list:
        """One edit: returns the graph's outputs (static tensors: clone before the next edit)."""
        if self.static_inputs is None:
            self.static_inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
        for buf, v in zip(self.static_inputs, flat, strict=True):
            if isinstance(buf, torch.Tensor):
                buf.copy_(v)
        self.static_mask.copy_(edit_mask.reshape(self.static_mask.shape))
        masks = edit_masks(self.program, self.static_mask, self.config.mask_threshold,
                           self.config.mask_level_dilation)  # fmt: skip
        counts = tile_counts(self.program, masks, self.keys).tolist()  # the one host sync
        caps = {k: bucket(int(c), self.grid[k]) for k, c in zip(self.keys, counts, strict=True)}
        key = tuple(caps[k] for k in self.keys)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._capture(caps)
        elif entry.graph is not None:
            entry.graph.replay()
        else:
            entry.outs, entry.tiles = self._body(caps)
            entry.pending_norm_sums = dict(self.state.pending_norm_sums)
        self.last = entry
        self.state.last_tiles = entry.tiles
        return entry.outs

    def _capture(self, caps: dict) -> _Entry:
        entry = _Entry(None, caps)
        if self.pool is None:
            entry.outs, entry.tiles = self._body(caps)
            entry.pending_norm_sums = dict(self.state.pending_norm_sums)
            return entry
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, sets up library handles
            self._body(caps)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.outs, entry.tiles = self._body(caps)
        entry.pending_norm_sums = dict(self.state.pending_norm_sums)
        entry.graph = graph
        graph.replay()  # capture records without running: this is the edit's real run
        self.captures += 1
        return entry

    # -- commit --------------------------------------------------------------------------------

    def commit(self) -> None:
        """The last edit becomes the original: copy its dirty tiles into the caches."""
        state, prog = self.state, self.program
        for name in self.maps:
            corners, count = self.dirty[name]
            th, tw = prog.tile_requests[prog.map_tiles[name]].tile
            restore(state.cache(name), state.work(name), corners, th, tw, count,
                    check_values=False)  # fmt: skip
            count.zero_()
        if self.last is not None:
            for name, (s1, s2) in (self.last.pending_norm_sums or {}).items():
                r1, r2 = state.norm_sums(name)
                r1.copy_(s1)
                r2.copy_(s2)
