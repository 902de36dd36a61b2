"""The edit path: what runs an edit and a commit. One interface, two implementations.

``EditPath`` is what ``SparseEngine`` calls: ``warmup(key, slot)`` once, then ``run(key, slot,
flat, mask)`` per edit and ``commit(key, slot, record)``. Both paths run the program's edit
graph on the engine's ``LiveState`` (``sigec.runtime.state``) and keep the last edit as an
``EditRecord``:

- ``EagerPath`` (``SparseConfig(cuda_graphs=False)``, and the exact policy): tile lists of
  exactly the active tiles (one host sync per list), the edit graph run op by op; with
  ``cost_model`` the dense model runs where the tiles would execute at least its MACs.
- ``StaticPath`` (``cuda_graphs=True``, ``sigec.runtime.static_path``): a bounded set of static
  edit shapes (``sigec.runtime.sizes``), captured as CUDA graphs during warm-up.

Both share what this base class does: switching the working set to another slot (a full copy of
its caches; the other slot's uncommitted edit is replaced), and committing (the tiles the edit
wrote are copied from the working maps into the slot's caches, O(active); after an edit the
dense model ran, the slot records the edited inputs again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sigec.errors import EditReplacedError
from sigec.kernels.restore import RestoreBatch
from sigec.runtime import cost
from sigec.runtime.inputs import raise_if_stale
from sigec.runtime.program import Program
from sigec.runtime.state import LiveState, SlotCache
from sigec.runtime.tiles import TileTable, edit_masks


@dataclass
class EditRecord:
    """The last edit: whose it was, its inputs and mask, where it wrote, how it ran."""

    key: str
    slot: SlotCache
    flat: list
    mask: torch.Tensor
    tiles: TileTable | None
    ran_dense: bool = False
    norm_sums: dict = field(default_factory=dict)
    size_class: int | None = None
    committed: bool = False
    empty: bool = False  # an empty mask: the record's outputs, nothing computed
    outs: list = field(default_factory=list)  # what it returned (a commit records them)

    @property
    def pending(self) -> bool:
        """Uncommitted, and its tiles are in the working maps."""
        return not self.committed and not self.ran_dense


class EditPath:
    """Shared part of both edit paths (see the module docstring)."""

    def __init__(self, program: Program, config, edit_gm, live: LiveState, dense_fn):
        self.program, self.config, self.edit_gm, self.live = program, config, edit_gm, live
        self.dense_fn = dense_fn  # () -> the dense model as a callable of the flat inputs
        self.last: EditRecord | None = None
        self.upcoming: tuple[str, SlotCache] | None = None  # (key, slot) edited next: prefetch
        self.warmup_report: dict | None = None
        # maps with a cache whose op writes through a tile list: what undo and commit copy
        self.written_maps = [n for n in program.map_tiles if n in live.cached_maps]

    @property
    def warmed(self) -> bool:
        return self.warmup_report is not None

    # -- what the engine calls -------------------------------------------------------------------

    def warmup(self, key: str, slot: SlotCache) -> dict:
        raise NotImplementedError

    def run(self, key: str, slot: SlotCache, flat: list, mask: torch.Tensor) -> list:
        raise NotImplementedError

    def commit(self, key: str, slot: SlotCache, record) -> None:
        """Make the last edit of ``key`` the slot's new original. ``record(slot, flat)`` records
        inputs again (after an edit the dense model ran)."""
        last = self.last
        if last is None or last.key != key or last.committed:
            if slot.replaced_by is not None:
                raise EditReplacedError(
                    f"slot {key!r}: its last edit was replaced by an edit of slot "
                    f"{slot.replaced_by!r} before it was committed (an engine keeps one "
                    "uncommitted edit at a time); commit each slot's edit before editing another "
                    "slot, or edit this slot again"
                )
            return
        if last.ran_dense:
            record(slot, last.flat)
            self.live.slot = None  # the working maps hold the old caches: reload on next edit
        else:
            self._commit_tiles(key, slot)
            for name, (s1, s2) in last.norm_sums.items():
                for holder in (slot, self.live):
                    r1, r2 = holder.norm_sums(name)
                    r1.copy_(s1)
                    r2.copy_(s2)
            for i, kind in enumerate(self.program.input_kinds):
                if kind == "spatial":
                    slot.recorded_input(i).copy_(last.flat[i])
                    self.live.recorded_input(i).copy_(last.flat[i])
            slot.set_outputs(last.outs)  # what an empty edit of the new original returns
        last.committed = True
        slot.replaced_by = None

    def prepare(self, key: str, slot: SlotCache) -> None:
        """Set slot ``key`` up for edits right after its record (its caches packed for one-copy
        loads), so that its first edit costs what any edit costs."""
        self.live.pack_slot(slot)

    def forget(self, key: str) -> None:
        """Slot ``key`` was recorded again: its uncommitted edit and its working set are gone."""
        if self.last is not None and self.last.key == key:
            self.last = None
        if self.live.slot == key:
            self.live.slot = None

    # -- shared steps ----------------------------------------------------------------------------

    def _activate(self, key: str, slot: SlotCache) -> bool:
        """Make the working set hold slot ``key``; True if it had to be loaded. Then start the
        prefetch of the slot edited next (``upcoming``), which overlaps this edit."""
        loaded = self.live.slot != key
        if loaded:
            last = self.last
            if last is not None and last.key != key and not last.committed:
                last.slot.replaced_by = key
            self.live.load(key, slot)
            self._switched(key, slot)
        if self.upcoming is not None:
            self.live.prefetch(*self.upcoming)
            self.upcoming = None
        return loaded

    def _tile_items(self, tiles: TileTable, to_cache: bool, slot: SlotCache) -> list:
        """RestoreBatch items over the tiles ``tiles`` wrote: cache -> working map (undo) or
        working map -> cache (commit, which also refreshes the live caches of incremental
        norms' inputs)."""
        items = []
        used = tiles.used()
        for name in self.written_maps:
            key = self.program.map_tiles[name]
            if key not in used:
                continue
            ts = used[key]
            work, cache = self.live.work(name), slot.cache(name)
            pair = (cache, work) if to_cache else (work, cache)
            items.append((*pair, ts.out_corners, ts.num_active, *ts.out_tile))
            if to_cache and name in self.live.sources:
                items.append((self.live.cache(name), work, ts.out_corners, ts.num_active,
                              *ts.out_tile))  # fmt: skip
        return items

    def _commit_tiles(self, key: str, slot: SlotCache) -> None:
        RestoreBatch(self._tile_items(self.last.tiles, True, slot))()

    def _switched(self, key: str, slot: SlotCache) -> None:
        """Hook: the working set was just loaded from ``slot`` (it equals its caches)."""

    def recorded_outputs(self, slot: SlotCache) -> list:
        """The flat outputs of the slot's record: what an edit with an empty mask returns."""
        return [slot.recorded_output(i) if isinstance(v, int) else v
                for i, v in enumerate(slot.output_kinds)]  # fmt: skip

    def inputs_of(self, slot: SlotCache) -> list:
        """The flat inputs of the slot's record (constants from the compiled example)."""
        dev = self.program.image_meta[2]
        return [slot.recorded_input(i).to(dev) if kind != "const" else self.program.example_meta[i]
                for i, kind in enumerate(self.program.input_kinds)]  # fmt: skip


class EagerPath(EditPath):
    """Exact tile lists, the edit graph run op by op (see the module docstring)."""

    def warmup(self, key: str, slot: SlotCache) -> dict:
        """Nothing to capture. On CUDA, two edits of the slot's own inputs (a small and a large
        mask) compile the dense regions and tile expressions; both are then undone."""
        t0 = time.perf_counter()
        if any(b.is_cuda for b in self.live.buffers()):
            h, w = self.program.input_resolution
            flat = self.inputs_of(slot)
            for share in (0.02, 0.3):
                m = torch.zeros(1, h, w, dtype=torch.bool, device=flat[0].device)
                m[:, : max(1, int(h * share)), : max(1, int(w * share))] = True
                self.run(key, slot, flat, m)
            self._undo()
        self.warmup_report = {"warmup_s": round(time.perf_counter() - t0, 3), "graphs": 0}
        return self.warmup_report

    def run(self, key: str, slot: SlotCache, flat: list, mask: torch.Tensor) -> list:
        self._check_not_stale(slot, flat)
        if not self._activate(key, slot):
            self._undo()
        live = self.live
        live.written, live.pending_norm_sums = {}, {}
        masks = edit_masks(self.program, mask, self.config.mask_threshold,
                           self.config.mask_level_dilation)  # fmt: skip
        tiles = TileTable(self.program, masks, pad_to_grid=self.config.tile_lists == "grid")
        record = EditRecord(key, slot, flat, mask, tiles)
        self.last = record
        if not bool(mask.any()):  # nothing edited: the record's outputs, bit for bit
            record.empty = True
            record.outs = self.recorded_outputs(slot)
        elif self.config.cost_model and self._dense_is_cheaper(tiles):
            record.ran_dense = True
            record.outs = list(self.dense_fn()(*flat))
        else:
            record.outs = list(self.edit_gm(live, tiles, *flat))
            record.norm_sums = dict(live.pending_norm_sums)
        return record.outs

    def _check_not_stale(self, slot: SlotCache, flat: list) -> None:
        """Non-image inputs against the slot's record (a host sync; StaleCacheError). The
        static path reads these flags with its size class instead."""
        names, changed = [], []
        for i, kind in enumerate(self.program.input_kinds):
            if kind != "tensor":
                continue
            rec, v = slot.recorded_input(i), flat[i]
            rec = rec.to(v.device, non_blocking=True)  # a host slot's copy is pinned
            same = v.shape == rec.shape and bool((v.to(rec.dtype) == rec).all())
            names.append(self.program.input_names[i])
            changed.append(not same)
        raise_if_stale(names, changed)

    def _dense_is_cheaper(self, tiles: TileTable) -> bool:
        """The cost model of this path: the dense model runs where the edit's active tiles
        execute at least its MACs (nothing is timed on this path; every tile list is built to
        count them)."""
        rows = {k: _active(tiles[k]) for k in self.program.tile_requests}
        spent = cost.executed(self.program, rows)
        return spent.sparse >= spent.dense

    def _undo(self) -> None:
        """The working maps := the caches again where the last (uncommitted) edit wrote."""
        last = self.last
        if last is not None and last.pending and last.key == self.live.slot:
            RestoreBatch(self._tile_items(last.tiles, False, last.slot))()
            self.last = None  # nothing of it is left to commit


def _active(ts) -> int:
    """Active tiles of a list (its rows, or its device-side count where it is padded)."""
    return int(ts.num_active.item()) if ts.num_active is not None else ts.capacity
