"""Static-shape edits replayed from CUDA graphs (``SparseConfig(cuda_graphs=True)``).

An eager edit is host-bound: hundreds of small launches, each a few microseconds of Python and
driver time. With CUDA graphs the whole edit (mask pyramid -> tile lists -> restoring the previous
edit's tiles -> the edit graph) is one replay:

1. the edit mask and inputs are copied into static buffers; the number of active tiles of every
   tile list and the stale check of the non-image inputs are computed on the device and read
   once (the edit's only host sync);
2. each count is rounded up to a capacity bucket (a power of two, at most the tile grid): padding
   rows of a list write nowhere (``num_active``);
3. the tuple of capacities selects a graph; a new tuple is captured once (after an eager warm-up
   run, which is itself a correct edit), and replayed for every later edit that falls in it;
   with ``speculate``, the previous edit's graph is already launched before the sync and kept
   when the new counts fit its capacities (``run``);
4. which tiles each map's op wrote is kept in fixed-size device buffers (the whole tile grid);
   the host knows the previous edit's capacities, so the next replay restores exactly that many
   rows (they are part of the graph's key);
5. cost model: the first time a key is seen on CUDA, its sparse graph and a graph of the dense
   model are both timed; the faster one serves every edit with that key (large edits run dense);
6. ``commit`` copies the dirty tiles from the working maps into the caches (O(active)); buffers
   never swap, since graphs hold their addresses. After a dense edit, commit records again in
   place.

Off CUDA the same static-shape path runs without capture (what the CPU tests exercise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sigec.kernels.restore import RestoreBatch
from sigec.runtime.dense import CompiledOrEager
from sigec.runtime.inputs import raise_if_stale
from sigec.runtime.tiles import (
    TileTable,
    edit_masks,
    full_tile_lists,
    grid_size,
    tile_counts,
    tile_grids,
)


def entry_key(entry: _Entry) -> tuple:
    return tuple(sorted(entry.capacities.items()))


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
        self.program, self.config, self.state = prog, engine.config, state
        self.edit_gm = engine.edit_gm
        self.keys = sorted(prog.tile_requests)
        self.grid = {k: grid_size(prog.tile_requests[k], prog.tile_requests[k].mask)
                     for k in self.keys}  # fmt: skip
        dev = next(iter(state.buffers())).device
        # maps with a cache (private maps are never read outside this edit's tiles)
        self.maps = [n for n in prog.map_tiles if n in prog.maps and n not in prog.private_maps]
        # maps written through the same tile list share one dirty list (one copy per list)
        self.map_key = {n: prog.map_tiles[n] for n in self.maps}
        self.dirty_keys = sorted(set(self.map_key.values()))
        self.dirty = {
            k: (torch.zeros(self.grid[k], 2, dtype=torch.int32, device=dev),
                torch.zeros(1, dtype=torch.int32, device=dev))
            for k in self.dirty_keys
        }  # fmt: skip
        self.static_mask = torch.zeros(1, *prog.input_resolution, dtype=torch.bool, device=dev)
        self.static_inputs: list | None = None
        # non-image tensor inputs (timestep, prompt embedding, labels): checked in the count graph
        self.stale_inputs = [i for i, k in enumerate(prog.input_kinds) if k == "tensor"]
        self.stale_names = [prog.input_names[i] for i in self.stale_inputs]
        self.good_mask: torch.Tensor | None = None  # the last successful edit's mask
        # speculation: the last edit's capacities; counts read through pinned memory
        self.last_caps: dict | None = None
        self.speculated = 0  # edits whose speculative launch was their result
        self.missed = 0  # edits whose speculative launch was not (undone or superseded)
        self.host_counts: torch.Tensor | None = None
        self.count_event = None
        self.entries: dict[tuple, _Entry] = {}
        self.last: _Entry | None = None
        self.pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self.captures = 0
        self.record_gm = engine.record_gm
        self.prev = {k: 0 for k in self.dirty_keys}  # rows the previous edit dirtied, per list
        self.choice: dict[tuple, str] = {}  # graph key -> "sparse" or "dense" (cost model)
        self.default_choice = "sparse"  # for keys the cost model has not measured
        self.timings: dict[tuple, dict] = {}  # capacities -> measured ms of both
        self.dense: _Entry | None = None
        self.count_graph, self.count_out = None, None
        self.masks: tuple = ({}, {}, {})  # this edit's masks, tile grids and full tile lists
        self.dense_fn = engine.dense_callable()  # what the cost model's dense path runs
        self.ran_dense = False
        # one-launch restores (device tables of buffer addresses: built before any capture)
        self.restorers: dict[tuple, RestoreBatch] = {}
        # the mask pyramid, tile grids and counts: ~100 tiny kernels for GauGAN's 16 tile lists
        # eagerly, a few when inductor fuses them (on CUDA, with dense_regions="inductor")
        self._count_fn = self._count_impl
        if dev.type == "cuda" and self.config.dense_regions == "inductor":
            self._count_fn = CompiledOrEager(self._count_impl, "the count graph (mask pyramid, "
                                             "tile grids and counts)", "dense_regions",
                                             dynamic=False)  # fmt: skip

    # -- one edit ------------------------------------------------------------------------------

    def _body(self, caps: dict, restore_caps: dict) -> tuple[list, TileTable]:
        prog, state = self.program, self.state
        masks, grids, full = self.masks  # from the count graph of this edit (static tensors)
        tiles = TileTable(prog, masks, capacities=caps, grids=grids, full=full)
        self._restorer("undo", restore_caps)()  # undo the previous edit: as many rows as it had
        state.written, state.pending_norm_sums = {}, {}
        outs = list(self.edit_gm(state, tiles, *self.static_inputs))
        for key in self.dirty_keys:
            corners, count = self.dirty[key]
            if key in tiles.used():
                ts = tiles[key]
                corners[: ts.capacity].copy_(ts.out_corners)
                count.copy_(ts.num_active)
            else:
                count.zero_()
        return outs, tiles

    def run(self, flat: list, edit_mask: torch.Tensor) -> list:
        """One edit: returns the graph's outputs (static tensors: clone before the next edit).

        The stale check (non-image tensor inputs against the slot's record) runs inside the
        count graph and is read with the tile counts (the one host sync); a stale input raises
        with the caches untouched and the previous edit's inputs and tile lists put back.

        Speculation (``config.speculate``): before that sync, the graph of the previous edit's
        capacities is already launched, so the GPU does not wait for the host. If this edit's
        counts fit those capacities (padding rows write nowhere) it is this edit's result;
        otherwise the graph that then runs undoes its rows (it restores as many).
        """
        self.static_mask.copy_(edit_mask.reshape(self.static_mask.shape))
        if self.static_inputs is None:
            self.static_inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
        else:
            for buf, v in zip(self.static_inputs, flat, strict=True):
                if isinstance(buf, torch.Tensor):
                    buf.copy_(v)
        counts_dev = self._counts()
        if self.pool is not None:  # read the counts without waiting for the speculative graph
            if self.host_counts is None:
                self.host_counts = torch.empty(counts_dev.shape, dtype=counts_dev.dtype,
                                               pin_memory=True)  # fmt: skip
                self.count_event = torch.cuda.Event()
            self.host_counts.copy_(counts_dev, non_blocking=True)
            self.count_event.record()
        spec = self._speculate()
        if self.pool is not None:
            self.count_event.synchronize()  # the one host sync
            counts = self.host_counts.tolist()
        else:
            counts = counts_dev.tolist()
        if any(counts[len(self.keys) :]):
            self._refuse(spec)
            raise_if_stale(self.stale_names, [bool(c) for c in counts[len(self.keys) :]])
        self.good_mask = edit_mask
        counts = counts[: len(self.keys)]
        caps = {k: bucket(int(c), self.grid[k]) for k, c in zip(self.keys, counts, strict=True)}
        self.last_caps = caps
        if spec is not None:
            kind, spec_caps, entry = spec
            fits = all(c <= spec_caps[k] for k, c in zip(self.keys, counts, strict=True))
            if kind == "sparse" and fits:
                self.speculated += 1
                return self._ran_sparse(entry, spec_caps)
            if kind == "dense" and self._choice(caps, self.prev) == "dense":
                self.speculated += 1
                self.ran_dense = True
                return entry
            self.missed += 1
            if kind == "sparse":  # too small: the graph that runs next undoes its rows
                self.prev = {k: spec_caps[k] for k in self.dirty_keys}
        return self._run_bucket(caps)

    def _choice(self, caps: dict, restore_caps: dict) -> str:
        key = (tuple(caps[k] for k in self.keys), tuple(restore_caps[k] for k in self.dirty_keys))
        return self.choice.get(key, self.default_choice)

    def _speculate(self):
        """Launch what the previous edit's capacities ran, where it exists already: returns
        ("sparse", capacities, entry), ("dense", capacities, outputs) or None."""
        if not self.config.speculate or self.last_caps is None:
            return None
        caps, restore_caps = self.last_caps, dict(self.prev)
        key = (tuple(caps[k] for k in self.keys), tuple(restore_caps[k] for k in self.dirty_keys))
        if key not in self.entries:  # restoring more rows than were dirtied is as right
            more = [k for k in self.entries if k[0] == key[0]
                    and all(a >= b for a, b in zip(k[1], key[1], strict=True))]  # fmt: skip
            key = min(more, key=lambda k: sum(k[1])) if more else key
            restore_caps = dict(zip(self.dirty_keys, key[1], strict=True))
        entry = self.entries.get(key)
        if self.choice.get(key, self.default_choice) == "dense":
            if self.pool is not None and (self.dense is None or self.dense.graph is None):
                return None
            return "dense", caps, self._run_dense()
        if entry is None or (self.pool is not None and entry.graph is None):
            return None
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.outs, entry.tiles = self._body(caps, restore_caps)
            entry.pending_norm_sums = dict(self.state.pending_norm_sums)
        return "sparse", caps, entry

    def _refuse(self, spec) -> None:
        """A stale input: undo what the speculative graph wrote, then put back the previous
        edit (its inputs, mask and tile lists; its tiles too if it is uncommitted)."""
        if spec is None or spec[0] != "sparse":
            self._put_back()
            return
        self._restorer("undo", {k: spec[1][k] for k in self.dirty_keys})()  # work == cache
        uncommitted = self.state.pending_inputs is not None and not self.ran_dense
        again = self.last if uncommitted and any(self.prev.values()) else None
        rows = dict(self.prev)
        for _, count in self.dirty.values():
            count.zero_()
        self.prev = {k: 0 for k in self.dirty_keys}
        self._put_back()
        if again is not None:  # recompute the uncommitted edit the speculation overwrote
            if again.graph is not None:  # its restore reads the zeroed counts: copies nothing
                again.graph.replay()
            else:
                again.outs, again.tiles = self._body(again.capacities,
                                                     {k: 0 for k in self.dirty_keys})  # fmt: skip
                again.pending_norm_sums = dict(self.state.pending_norm_sums)
            self.prev = rows
            self.state.last_tiles = again.tiles

    def _ran_sparse(self, entry: _Entry, caps: dict) -> list:
        self.prev = {k: caps[k] for k in self.dirty_keys}
        self.last = entry
        self.state.last_tiles = entry.tiles
        self.ran_dense = False
        return entry.outs

    def _run_bucket(self, caps: dict) -> list:
        restore_caps = dict(self.prev)
        key = (tuple(caps[k] for k in self.keys), tuple(restore_caps[k] for k in self.dirty_keys))
        entry = self.entries.get(key)
        if entry is None:  # capture (the capture's replay is this edit's sparse run)
            entry = self.entries[key] = self._capture(caps, restore_caps)
            if self.pool is not None and self.config.cost_model:
                self.choice[key] = self._measure(entry)
            sparse_ran = True
        elif self.choice.get(key, self.default_choice) == "dense":
            sparse_ran = False
        elif entry.graph is not None:
            entry.graph.replay()
            sparse_ran = True
        else:
            entry.outs, entry.tiles = self._body(caps, restore_caps)
            entry.pending_norm_sums = dict(self.state.pending_norm_sums)
            sparse_ran = True
        if sparse_ran:
            self._ran_sparse(entry, caps)
        self.ran_dense = self.choice.get(key, self.default_choice) == "dense"
        if self.ran_dense:  # faster than sparse for this size: the caches are left alone
            return self._run_dense()
        return entry.outs

    def _put_back(self) -> None:
        """After a refused edit: static inputs, mask and count-graph outputs as the last
        successful edit (or the record) left them, so a commit, a footprint or a dense replay
        sees that edit and not the refused one."""
        state = self.state
        for i, buf in enumerate(self.static_inputs):
            if not isinstance(buf, torch.Tensor):
                continue
            pending = state.pending_inputs or {}
            buf.copy_(pending[i] if i in pending else state.recorded_input(i))
        if self.good_mask is None:
            self.static_mask.zero_()
        else:
            self.static_mask.copy_(self.good_mask.reshape(self.static_mask.shape))
        self._counts()

    def _restorer(self, direction: str, rows: dict) -> RestoreBatch:
        """One launch copying the dirty rows of every map: "undo" cache -> work (before an edit),
        "commit" work -> cache. Built on first use for these row counts (outside any capture:
        the warm-up run comes first), then reused, also by captured graphs."""
        key = (direction, tuple(sorted(rows.items())))
        batch = self.restorers.get(key)
        if batch is None:
            state, items = self.state, []
            for name in self.maps:
                k = self.map_key[name]
                if rows[k]:
                    corners, count = self.dirty[k]
                    src, dst = state.cache(name), state.work(name)
                    if direction == "commit":
                        src, dst = dst, src
                    items.append((dst, src, corners[: rows[k]], count,
                                  *self.program.tile_requests[k].tile))  # fmt: skip
            batch = self.restorers[key] = RestoreBatch(items)
        return batch

    def _run_dense(self) -> list:
        if self.dense is not None and self.dense.graph is not None:
            self.dense.graph.replay()
            return self.dense.outs
        return list(self.dense_fn(*self.static_inputs))

    def _count_body(self) -> tuple[torch.Tensor, tuple[dict, dict, dict]]:
        given = [self.static_inputs[i] for i in self.stale_inputs]
        recorded = [self.state.recorded_input(i) for i in self.stale_inputs]
        return self._count_fn(self.static_mask, given, recorded)

    def _count_impl(self, mask: torch.Tensor, given: list, recorded: list):
        """Tile counts per list, then one flag per non-image tensor input (1: differs from the
        record), as one int tensor; and the masks, tile grids and full-grid tile lists."""
        masks = edit_masks(self.program, mask, self.config.mask_threshold,
                           self.config.mask_level_dilation)  # fmt: skip
        grids = tile_grids(self.program, masks, self.keys)
        full = full_tile_lists(self.program, masks, grids, self.keys)
        counts = tile_counts(self.program, grids, self.keys)
        if given:
            flags = [(g.to(r.dtype) != r).any() for g, r in zip(given, recorded, strict=True)]
            counts = torch.cat([counts, torch.stack(flags).to(counts.dtype)])
        return counts, (masks, grids, full)

    def _counts(self) -> torch.Tensor:
        """Active tiles per list, from a small graph of its own on CUDA (one replay). Its masks,
        tile grids and full-grid tile lists stay in ``self.masks`` for the edit graph, which
        slices the lists to its capacities and recomputes none of them
        (the graph's outputs are static tensors, alive as long as this object)."""
        if self.pool is None:
            counts, self.masks = self._count_body()
            return counts
        if self.count_graph is None:
            self._warm_up(self._count_body)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.count_out, self.masks = self._count_body()
            self.count_graph = graph
        self.count_graph.replay()
        return self.count_out

    def _capture(self, caps: dict, restore_caps: dict) -> _Entry:
        entry = _Entry(None, caps)
        if self.pool is None:
            entry.outs, entry.tiles = self._body(caps, restore_caps)
            entry.pending_norm_sums = dict(self.state.pending_norm_sums)
            return entry
        self._warm_up(lambda: self._body(caps, restore_caps))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.outs, entry.tiles = self._body(caps, restore_caps)
        entry.pending_norm_sums = dict(self.state.pending_norm_sums)
        entry.graph = graph
        graph.replay()  # capture records without running: this is the edit's real run
        self.captures += 1
        return entry

    @staticmethod
    def _warm_up(fn) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles kernels, sets up library handles
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def _measure(self, entry: _Entry) -> str:
        """Time the sparse graph of ``entry`` against the dense model's graph: the faster wins.

        Replaying the sparse graph again is harmless (it restores, then recomputes the same
        edit); the dense graph touches no cache.
        """
        if self.dense is None:
            gm, inputs = self.dense_fn, self.static_inputs
            self._warm_up(lambda: gm(*inputs))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outs = list(gm(*inputs))
            self.dense = _Entry(graph, {}, outs)
        times = {}
        for name, graph in (("sparse", entry.graph), ("dense", self.dense.graph)):
            best = float("inf")
            for _ in range(3):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end))
            times[name] = best
        self.timings[entry_key(entry)] = times
        return "dense" if times["dense"] < times["sparse"] else "sparse"

    # -- commit --------------------------------------------------------------------------------

    def forget_dirty(self) -> None:
        """The working maps equal the caches everywhere (after recording again in place)."""
        self.prev = {k: 0 for k in self.dirty_keys}
        for _, count in self.dirty.values():
            count.zero_()
        self.ran_dense = False

    def commit(self) -> None:
        """The last edit becomes the original: copy its dirty tiles into the caches."""
        state = self.state
        self._restorer("commit", self.prev)()
        for _, count in self.dirty.values():
            count.zero_()
        self.prev = {k: 0 for k in self.dirty_keys}
        if self.last is not None:
            for name, (s1, s2) in (self.last.pending_norm_sums or {}).items():
                r1, r2 = state.norm_sums(name)
                r1.copy_(s1)
                r2.copy_(s2)
