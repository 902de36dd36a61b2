"""The static edit path (``SparseConfig(cuda_graphs=True)``): a bounded set of CUDA graphs, all
made during warm-up, one replay per edit.

Graphs of one engine (at most 16, whatever the masks and however many slots):

- the **count graph**: undo the last uncommitted edit (one ``RestoreBatch`` launch over its tile
  lists, up to device-side counts that a commit zeroes), then the mask pyramid, every tile list
  padded to its whole grid (written into fixed buffers), the counts, the size class that holds
  them (``sigec.runtime.sizes``) and a flag per non-image input that differs from the record;
- one **class graph** per size class: the edit graph with every tile list cut to the class's
  capacities (views of the fixed lists; rows past a list's count are padding that writes
  nowhere);
- the **dense graph**: the dense model (compiled by inductor), what the cost model
  (``sigec.runtime.cost``) runs for the classes where it measured faster.

An edit: copy the mask and inputs into fixed buffers, replay the count graph, read its class and
stale flags (the edit's one host sync), replay that class's graph or the dense one. Nothing is
captured, compiled or timed on this path; ``warmup`` does all of it (calibrating the classes,
compiling, capturing every graph, timing sparse against dense per class).

The graphs read only the engine's ``LiveState`` and fixed buffers, so they serve every slot: the
undo launch reads the active slot's caches through a table that a slot switch reloads
(``RestoreBatch.load_tables``). A stale input is refused with the previous edit put back: its
inputs, mask and tile lists, and its tiles recomputed if it was uncommitted (the refused edit's
count graph already undid them); a refused edit of another slot also loads the working set of
the slot it replaced again, so the stale check needs no host sync of its own. Off CUDA the same
path runs uncaptured (the CPU tests).
"""

from __future__ import annotations

import time

import torch

from sigec.kernels import precompiling
from sigec.kernels.restore import RestoreBatch
from sigec.runtime import cost
from sigec.runtime.capture import Captured, GraphSet, HostReader
from sigec.runtime.compiled import CompiledOrEager
from sigec.runtime.edit_path import EditPath, EditRecord
from sigec.runtime.inputs import raise_if_stale
from sigec.runtime.sizes import SizeClasses, calibrate, cheapest_fitting, describe
from sigec.runtime.state import SlotCache
from sigec.runtime.tiles import (
    TileTable,
    edit_masks,
    full_tile_lists,
    grid_size,
    tile_counts,
    tile_grids,
)


class StaticPath(EditPath):
    """See the module docstring. ``dense_fn()`` returns the dense model as the cost model runs
    it (compiled on first call)."""

    def __init__(self, program, config, edit_gm, live, dense_fn):
        super().__init__(program, config, edit_gm, live, dense_fn)
        self.keys = tuple(sorted(program.tile_requests))
        self.stale_inputs = [i for i, k in enumerate(program.input_kinds) if k == "tensor"]
        self.stale_names = [program.input_names[i] for i in self.stale_inputs]
        self.graphs: GraphSet | None = None
        self.classes: SizeClasses | None = None
        self.choice: list[str] = []  # per class: "sparse" or "dense" (the cost model's verdict)
        self.timings: list[dict] = []  # per class: measured ms of both graphs (CUDA)
        self.entries: list = []  # per class: its graph (None where only dense runs)
        self.tables: list[TileTable] = []  # per class: its tile lists (views of fixed buffers)
        self.dense_graph = None
        self.count_graph = None
        self._slot_batches: dict[str, tuple[RestoreBatch, RestoreBatch]] = {}

    # -- warm-up ---------------------------------------------------------------------------------

    def warmup(self, key: str, slot: SlotCache) -> dict:
        """Calibrate the size classes, compile, capture every graph and run the cost model, on
        the inputs recorded in ``slot`` (the caches are left as they were)."""
        t0 = time.perf_counter()
        report: dict = {}
        self._allocate(slot)
        self._activate(key, slot)
        graphs = self.graphs
        with graphs.warming():
            t = time.perf_counter()
            self.classes = calibrate(self.program, self.config, self.static_mask.device)
            self.caps, self.seconds = self.classes.tables(self.static_mask.device)
            report["calibrate_s"] = time.perf_counter() - t
            t = time.perf_counter()
            self.count_graph = graphs.capture(self._count_step)
            report["count_graph_s"] = time.perf_counter() - t
            timed = self.config.cost_model and self.can_time()
            dense_ms = None
            if timed:
                t = time.perf_counter()
                self.dense_graph = graphs.capture(self._dense_step)
                dense_ms = self.time_ms(self.dense_graph)
                report["dense_graph_s"] = time.perf_counter() - t
            self.tables = [TileTable(self.program, {}, capacities=self.classes.capacities(s),
                                     full=self.full) for s in range(len(self.classes))]  # fmt: skip
            t = time.perf_counter()
            precompiled = self._precompile()
            report["precompile_s"] = time.perf_counter() - t
            t = time.perf_counter()
            self.choice, self.timings, self.entries = [], [], []
            for s in range(len(self.classes)):
                if self.choice[-2:] == ["dense", "dense"]:  # the costlier ones are slower still
                    self.choice.append("dense")
                    self.entries.append(None)
                    self.timings.append({})
                    continue
                if graphs.cuda:  # the capture's warm-up run needs this class's tile lists
                    self._set_mask(self.classes.samples[s])
                    self.count_graph()
                entry = graphs.capture(lambda s=s: self._body(s))
                self.entries.append(entry)
                if timed:
                    sparse_ms = self.time_ms(entry)
                    self.timings.append({"sparse": round(sparse_ms, 4),
                                         "dense": round(dense_ms, 4)})  # fmt: skip
                    self.choice.append(cost.choose(sparse_ms, dense_ms))
                    if self.choice[-1] == "dense":
                        self.entries[-1] = None  # only the dense graph runs for this class
                else:  # nothing to time here: dense where the class computes >= its MACs
                    self.timings.append({})
                    spent = cost.executed(self.program, self.classes.capacities(s))
                    self.choice.append("dense" if self.config.cost_model
                                       and spent.sparse >= spent.dense else "sparse")  # fmt: skip
            report["classes_s"] = time.perf_counter() - t
            # leave no trace: the record's inputs, an empty mask (its count graph undoes the
            # last warm-up edit), nothing to undo
            self._set_inputs(self.inputs_of(slot), None)
            self.count_graph()
            self.undo_counts.zero_()
        self.last = None
        report = {k: round(v, 3) for k, v in report.items()}
        report.update(warmup_s=round(time.perf_counter() - t0, 3), graphs=self.graph_count(),
                      precompiled=precompiled,
                      classes=describe(self.classes, self.program), choice=list(self.choice),
                      timings_ms=list(self.timings))  # fmt: skip
        self.warmup_report = report
        return report

    def _precompile(self) -> bool:
        """A dry run of every class's edit graph that only submits the tile kernels' compiles
        (``sigec.kernels.precompiling``: on ``compile_workers`` threads), so the captures that
        follow find them compiled. Its writes are garbage at the class's tiles (the next count
        graph undoes them, as after any warm-up run). Whether it ran (CUDA, Triton's async
        compile, ``compile_workers > 0``)."""
        if not self._precompile_here():
            return False
        with precompiling(self.config.compile_workers) as active:
            if active:
                for s in range(len(self.classes)):
                    self._set_mask(self.classes.samples[s])
                    self.count_graph()
                    self._body(s)
        return active

    def _precompile_here(self) -> bool:
        """Whether the dry run can help: only CUDA kernels compile."""
        return self.graphs.cuda

    def can_time(self) -> bool:
        """Whether the cost model can measure here (CUDA events: on CUDA only)."""
        return self.graphs.cuda

    def time_ms(self, captured) -> float:
        """Measured time of one graph (the cost model's input)."""
        return self.graphs.time_ms(captured)

    def graph_count(self) -> int:
        """Graphs this engine holds: count graph, captured class graphs, dense graph."""
        made = [self.count_graph, self.dense_graph, *self.entries]
        return sum(1 for g in made if g is not None)

    def _allocate(self, slot: SlotCache) -> None:
        """Fixed buffers every graph reads (their addresses never change)."""
        prog, live = self.program, self.live
        dev = next(iter(live.buffers())).device
        self.graphs = GraphSet(dev)
        self.static_mask = torch.zeros(1, *prog.input_resolution, dtype=torch.bool, device=dev)
        self.static_inputs = [v.clone() if isinstance(v, torch.Tensor) else v
                              for v in self.inputs_of(slot)]  # fmt: skip
        self.grid = {k: grid_size(prog.tile_requests[k], _res(prog, k)) for k in self.keys}
        self.lists = {k: (torch.zeros(self.grid[k], 2, dtype=torch.int32, device=dev),
                          torch.zeros(self.grid[k], 2, dtype=torch.int32, device=dev))
                      for k in self.keys}  # fmt: skip
        self.counts = torch.zeros(len(self.keys), dtype=torch.int32, device=dev)
        self.undo_counts = torch.zeros_like(self.counts)
        # the count graph's answer: size class, empty mask, a stale flag per non-image input
        self.head = torch.zeros(2 + len(self.stale_inputs), dtype=torch.int32, device=dev)
        self.reader = HostReader(self.head)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.full = {k: (*self.lists[k], self.counts[i : i + 1]) for k, i in self.index.items()}
        self.undo = self._slot_batch_pair(slot)[0]
        self.live.slot = None  # loaded (and the undo table pointed at ``slot``) by _activate
        count_fn = self._count_impl
        if self.graphs.cuda and self.config.count_graph == "inductor":
            count_fn = CompiledOrEager(self._count_impl, "the count graph (mask pyramid, tile "
                                       "lists, counts, size class)", "dense_regions",
                                       dynamic=False)  # fmt: skip
        self._count_fn = count_fn

    def _slot_batch_pair(self, slot: SlotCache) -> tuple[RestoreBatch, RestoreBatch]:
        """The slot's undo (cache -> working map at the last edit's tiles, up to the undo
        counts) and commit (working map -> cache, up to this edit's counts) launches."""
        undo, commit = [], []
        for name in self.written_maps:
            k = self.program.map_tiles[name]
            i, tile = self.index[k], self.program.tile_requests[k].tile
            work, cache, corners = self.live.work(name), slot.cache(name), self.lists[k][0]
            undo.append((work, cache, corners, self.undo_counts[i : i + 1], *tile))
            commit.append((cache, work, corners, self.counts[i : i + 1], *tile))
            if name in self.live.sources:
                commit.append((self.live.cache(name), work, corners, self.counts[i : i + 1],
                               *tile))  # fmt: skip
        return RestoreBatch(undo), RestoreBatch(commit)

    # -- one edit --------------------------------------------------------------------------------

    def run(self, key: str, slot: SlotCache, flat: list, mask: torch.Tensor) -> list:
        before = self.live.slot  # a refused edit of another slot puts this one back
        self._activate(key, slot)
        self._set_inputs(flat, mask)
        self.count_graph()
        head = self.reader(self.head)  # the one host sync (the stale flags come with it)
        if any(head[2:]):
            self._refuse(key, slot, before)
            raise_if_stale(self.stale_names, [bool(c) for c in head[2:]])
        s = head[0]
        record = EditRecord(key, slot, flat, mask, self.tables[s], size_class=s)
        self.last = record
        if head[1]:  # an empty mask: the record's outputs, nothing computed
            record.empty = True
            record.outs = self.recorded_outputs(slot)
        elif self.choice[s] == "dense":
            record.ran_dense = True
            record.outs = list(self._dense())
        else:
            outs, sums = self.entries[s]()
            record.outs, record.norm_sums = list(outs), dict(sums)
        return record.outs

    def _set_inputs(self, flat: list, mask: torch.Tensor | None) -> None:
        self._set_mask(mask)
        for buf, v in zip(self.static_inputs, flat, strict=True):
            if isinstance(buf, torch.Tensor):
                buf.copy_(v)

    def _set_mask(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            self.static_mask.zero_()
        else:
            self.static_mask.copy_(mask.reshape(self.static_mask.shape))

    def _refuse(self, key: str, slot: SlotCache, before: str | None) -> None:
        """A stale input: put the previous edit back (inputs, mask, tile lists; its tiles too if
        uncommitted: the refused count graph undid them), or the record if there was none. If
        the refused call switched the working set from slot ``before``, that slot's working set
        comes back (loaded again, its uncommitted edit recomputed), as if nothing had run."""
        if before is not None and before != key:
            last = self.last
            if last is None or last.key != before or not last.pending:
                self.live.slot = None  # nothing pending there: the next edit loads its slot
                return
            last.slot.replaced_by = None
            self.live.load(before, last.slot)
            self._switched(before, last.slot)
            self._set_inputs(last.flat, last.mask)
            self.count_graph()
            if not last.empty:  # an empty edit wrote nothing
                self.entries[last.size_class]()
            return
        last = self.last if self.last is not None and self.last.key == key else None
        if last is None:
            self._set_inputs(self.inputs_of(slot), None)
        else:
            self._set_inputs(last.flat, last.mask)
        self.count_graph()
        if last is not None and last.pending:
            self.entries[last.size_class]()

    def _switched(self, key: str, slot: SlotCache) -> None:
        if key not in self._slot_batches:
            self._slot_batches[key] = self._slot_batch_pair(slot)
        self.undo.load_tables(self._slot_batches[key][0])
        self.undo_counts.zero_()

    def _commit_tiles(self, key: str, slot: SlotCache) -> None:
        self._slot_batches[key][1]()
        self.undo_counts.zero_()  # nothing left to undo: the caches hold the edit

    def prepare(self, key: str, slot: SlotCache) -> None:
        """Also the slot's restore tables (after warm-up made the buffers they point into)."""
        super().prepare(key, slot)
        if self.warmed and key not in self._slot_batches:
            self._slot_batches[key] = self._slot_batch_pair(slot)

    def forget(self, key: str) -> None:
        super().forget(key)
        self._slot_batches.pop(key, None)  # recorded in place: same addresses, but be plain

    # -- what the graphs run ---------------------------------------------------------------------

    def _count_step(self) -> None:
        self.undo()
        given = [self.static_inputs[i] for i in self.stale_inputs]
        recorded = [self.live.recorded_input(i) for i in self.stale_inputs]
        bufs = [b for k in self.keys for b in self.lists[k]]
        self._count_fn(self.static_mask, given, recorded, self.caps, self.seconds, self.counts,
                       self.head, *bufs)  # fmt: skip

    def _count_impl(self, mask, given, recorded, caps, seconds, counts_out, head_out,
                    *bufs) -> None:  # fmt: skip
        """Masks -> full-grid tile lists, counts, size class, stale flags, into fixed buffers."""
        prog = self.program
        masks = edit_masks(prog, mask, self.config.mask_threshold,
                           self.config.mask_level_dilation)  # fmt: skip
        grids = tile_grids(prog, masks, self.keys)
        full = full_tile_lists(prog, masks, grids, self.keys)
        counts = tile_counts(prog, grids, self.keys).to(torch.int32)
        for i, k in enumerate(self.keys):
            bufs[2 * i].copy_(full[k][0])
            bufs[2 * i + 1].copy_(full[k][1])
        counts_out.copy_(counts)
        empty = (~mask.any()).to(torch.int32).reshape(1)
        head = [cheapest_fitting(counts.to(caps.device), caps, seconds), empty]
        head += [(g.to(r.dtype) != r).any().to(torch.int32).reshape(1)
                 for g, r in zip(given, recorded, strict=True)]  # fmt: skip
        head_out.copy_(torch.cat(head))

    def _body(self, s: int):
        live = self.live
        live.written, live.pending_norm_sums = {}, {}
        outs = list(self.edit_gm(live, self.tables[s], *self.static_inputs))
        self.undo_counts.copy_(self.counts)  # what the next count graph undoes
        return outs, dict(live.pending_norm_sums)

    def _dense_step(self) -> list:
        return list(self.dense_fn()(*self.static_inputs))

    def _dense(self) -> list:
        if self.dense_graph is None:  # the cost model never ran: the dense model uncaptured
            self.dense_graph = Captured(self._dense_step)
        return self.dense_graph()


def _res(program, key):
    mask = program.tile_requests[key].mask
    return mask if isinstance(mask, tuple) else program.node_resolutions[mask]
