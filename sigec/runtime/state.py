"""The buffers of an engine: one ``SlotCache`` per record, one ``LiveState`` the edits run on.

A slot (one per denoising step, or per anything else the caller keeps apart) holds what its
record left: a cache of every sparse map (``cache__<map>``), the values of cached statics
(``static__<node>``), folded normalisations (``norm__<node>__scale`` / ``__shift``, or the
per-group sums of incremental ones), the recorded inputs (``input__<i>``) and outputs
(``output__<i>``).

The edit graphs never touch a slot. They run on the engine's one ``LiveState``: a working map
per sparse map (``work__<map>``: the cache of the active slot with the current edit's tiles
written in) and live copies of the active slot's small buffers. Its buffers never move, so the
same CUDA graphs serve every slot; switching to another slot copies that slot's caches in
(``load``: one copy per dtype, since a slot's buffers are packed into one flat tensor per dtype
at its record, in the working set's layout), and an edit of one slot replaces the uncommitted
edit of another (there is one working set). Memory: one working set per engine, one set of
caches per slot.

A slot's packed buffers may live in pinned host memory instead (``SlotCache.place``): a load then
copies them in from the host, or from the device copy that ``LiveState.prefetch`` started on a
side stream while the previous edit ran (``sigec.runtime.offload.Staging``). The undo and commit
launches read and write a host slot's tiles in place (pinned memory is addressable from CUDA
kernels), so only a slot switch moves whole caches.
"""

from __future__ import annotations

import torch

from sigec.runtime.masks import TileSet
from sigec.runtime.offload import Staging, to_pinned


class _Buffers(torch.nn.Module):
    """Buffers by key, with the accessors the edit graph and the record-time prelude read."""

    def set_buffer(self, key: str, value: torch.Tensor) -> None:
        """Buffer ``key`` := ``value`` (registered if new, copied in place otherwise)."""
        if key in self._buffers:
            self._buffers[key].copy_(value)
        else:
            self.register_buffer(key, value.detach().clone())

    def static(self, name: str) -> torch.Tensor:
        return self._buffers[f"static__{name}"]

    def norm(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._buffers[f"norm__{name}__scale"], self._buffers[f"norm__{name}__shift"]

    def norm_sums(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Recorded (or committed) per-group sum and sum of squares, fp64 [N, G]."""
        return self._buffers[f"norm__{name}__s1"], self._buffers[f"norm__{name}__s2"]

    def recorded_input(self, i: int) -> torch.Tensor:
        return self._buffers[f"input__{i}"]

    def small_keys(self) -> list[str]:
        """Keys of everything but maps: statics, norms, inputs (copied on a slot switch)."""
        return [k for k in self._buffers if k.split("__")[0] in ("static", "norm", "input")]

    def nbytes(self) -> int:
        """Bytes held: each packed flat tensor in full (alignment padding too), then every
        buffer outside them."""
        flats = getattr(self, "_flats", None) or {}
        inside = {f.untyped_storage().data_ptr() for f in flats.values()}
        total = sum(f.numel() * f.element_size() for f in flats.values())
        return total + sum(b.numel() * b.element_size() for b in self.buffers()
                           if b.untyped_storage().data_ptr() not in inside)  # fmt: skip

    @classmethod
    def holding(cls, values: dict[str, torch.Tensor]) -> _Buffers:
        """A holder of ``values`` by key (not copied): what the prelude reads at a record."""
        holder = cls()
        for key, value in values.items():
            holder.register_buffer(key, value)
        return holder


class SlotCache(_Buffers):
    """One record's values: caches of the sparse maps, statics, norms, inputs (see above)."""

    def __init__(self):
        super().__init__()
        self._flats: dict = {}  # packed: one tensor per dtype holding the keys below
        self._flat_keys: list[str] = []
        self.map_names: list[str] = []  # maps with a cache (not the private ones)
        self.replaced_by: str | None = None  # its uncommitted edit was replaced by this slot's
        self.output_kinds: list = []  # per flat output: its index (a tensor) or its value
        self.version = 0  # bumped by every record and commit: a prefetched copy of another is stale
        self.on_host = False  # its packed buffers live in (pinned) host memory (``place``)
        self._device: torch.device | None = None  # where they go back to

    def set_outputs(self, outs: list) -> None:
        """Keep the record's outputs (``output__<i>``): an edit with an empty mask returns them."""
        self.output_kinds = []
        for i, o in enumerate(outs):
            if isinstance(o, torch.Tensor):
                self.set_buffer(f"output__{i}", o)
                self.output_kinds.append(i)
            else:
                self.output_kinds.append(o)

    def recorded_output(self, i: int) -> torch.Tensor:
        return self._buffers[f"output__{i}"]

    def set_map(self, name: str, value: torch.Tensor) -> None:
        """Cache of ``name`` := ``value`` (a new buffer, or copied in place)."""
        key = f"cache__{name}"
        if key in self._buffers:
            self._buffers[key].copy_(value)
            return
        self.register_buffer(key, value.detach().clone())
        self.map_names.append(name)

    def cache(self, name: str) -> torch.Tensor:
        return self._buffers[f"cache__{name}"]

    def packed(self, keys: list[str]) -> dict | None:
        """``keys``' buffers as flat tensors per dtype (packed now if they are not), or None if
        the slot lacks one of them."""
        if self._flat_keys != keys or not _packed(self, self._flats, keys):
            if any(k not in self._buffers for k in keys):
                return None
            self._flats, self._flat_keys = pack(self, keys), list(keys)
        return self._flats

    @property
    def flats(self) -> dict:
        """The packed flat tensors (one per dtype; empty before ``packed``)."""
        return self._flats

    def place(self, host: bool) -> None:
        """Move the packed buffers to pinned host memory (``host``; pinned when they are on CUDA,
        left where they are on a CPU engine) or back to the device they came from. The slot must
        be packed (``LiveState.pack_slot``); its unpacked buffers (outputs) stay where they are.
        Every tensor of the packed keys is replaced: tables holding their addresses must be made
        again."""
        if host == self.on_host:
            return
        if not self._flats:
            raise RuntimeError("SlotCache.place: pack the slot first (LiveState.pack_slot)")
        if host:
            self._device = next(iter(self._flats.values())).device
            move = to_pinned
        else:
            move = lambda t: t.to(self._device)  # noqa: E731
        self._flats = relocate(self, self._flats, self._flat_keys, move)
        self.on_host = host

    def host_bytes(self) -> int:
        """Bytes of this slot held in host memory (its packed buffers, when placed there)."""
        if not self.on_host:
            return 0
        return sum(f.numel() * f.element_size() for f in self._flats.values())


ALIGN = 256  # elements between packed buffers: every view keeps the allocator's alignment


def pack(module: _Buffers, keys: list[str]) -> dict[torch.dtype, torch.Tensor]:
    """Re-home the buffers ``keys`` into one flat tensor per dtype, in order (views with the
    same shapes and strides; values copied), so that a full copy of them is one copy per dtype.
    A module whose buffers are packed the same way (same shapes, strides, dtypes, order) has the
    same flat layout."""
    groups: dict[torch.dtype, list[str]] = {}
    for k in keys:
        groups.setdefault(module._buffers[k].dtype, []).append(k)
    flats = {}
    for dt, ks in groups.items():
        bufs = [module._buffers[k] for k in ks]
        sizes = [-(-_extent(b) // ALIGN) * ALIGN for b in bufs]
        flat = torch.empty(sum(sizes), dtype=dt, device=bufs[0].device)
        offset = 0
        for k, b, n in zip(ks, bufs, sizes, strict=True):
            view = flat.as_strided(b.shape, b.stride(), offset)
            view.copy_(b)
            module._buffers[k] = view
            offset += n
        flats[dt] = flat
    module._pack_heads = [ks[0] for ks in groups.values()]
    return flats


def relocate(module: _Buffers, flats: dict, keys: list[str], move) -> dict:
    """Packed ``flats`` := ``move(flat)`` per dtype, and every buffer of ``keys`` re-pointed at
    the same offset of the moved flat (shapes and strides kept)."""
    moved = {dt: move(flat) for dt, flat in flats.items()}
    for k in keys:
        b = module._buffers[k]
        offset = b.storage_offset() - flats[b.dtype].storage_offset()
        module._buffers[k] = moved[b.dtype].as_strided(b.shape, b.stride(), offset)
    return moved


def _extent(t: torch.Tensor) -> int:
    """Elements of storage a tensor's shape and strides span."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))


def _packed(module: _Buffers, flats: dict, keys: list[str]) -> bool:
    """Whether ``keys``' buffers are still views of ``flats`` (``to()`` replaces buffers)."""
    if not flats or not keys:
        return bool(flats) == bool(keys)
    for k in getattr(module, "_pack_heads", ()):  # the first buffer of each dtype: cheap
        b = module._buffers.get(k)
        if b is None or b.dtype not in flats:
            return False
        if b.untyped_storage().data_ptr() != flats[b.dtype].untyped_storage().data_ptr():
            return False
    return True


def _same_layout(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[d].shape == b[d].shape for d in a)


class LiveState(_Buffers):
    """The working set every edit graph reads and writes (see the module docstring).

    ``work(name)`` is the working map of ``name``; ``static`` / ``norm`` / ``norm_sums`` /
    ``recorded_input`` are copies of the active slot's (``slot``: its key, None after a record
    replaced its values); ``cache(name)`` is a live copy of the cache for the maps whose
    statistics an incremental norm updates (the edit reads their old tiles).
    """

    def __init__(self, first: SlotCache, maps: dict, norm_inputs: dict[str, str],
                 channels_last: bool):  # fmt: skip
        super().__init__()
        self.slot: str | None = None
        self.cached_maps = list(first.map_names)
        self.norm_inputs = dict(norm_inputs)  # incremental norm -> its input map
        self.written: dict[str, TileSet] = {}  # this edit: map -> the tiles its op wrote
        self.pending_norm_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        device = next(iter(first.buffers())).device
        for name, (shape, dtype) in maps.items():
            if name in first.map_names:
                work = torch.empty_like(first.cache(name))  # the cache's memory format
            else:  # a private map: written before it is read, in every edit
                fmt = torch.channels_last if channels_last and len(shape) == 4 else None
                work = torch.zeros(shape, dtype=dtype, device=device)
                work = work.contiguous(memory_format=fmt) if fmt else work
            self.register_buffer(f"work__{name}", work)
        for key in first.small_keys():
            self.register_buffer(key, first._buffers[key].clone())
        self.sources = sorted({m for m in self.norm_inputs.values() if m in first.map_names})
        for name in self.sources:
            self.register_buffer(f"livecache__{name}", first.cache(name).clone())
        self._small = first.small_keys()
        self._flats = pack(self, [f"work__{n}" for n in self.cached_maps] + self._small)
        self.staging = Staging()  # a host slot's caches, copied to the device ahead of its load

    def work(self, name: str) -> torch.Tensor:
        return self._buffers[f"work__{name}"]

    def cache(self, name: str) -> torch.Tensor:
        return self._buffers[f"livecache__{name}"]

    def has_map(self, name: str) -> bool:
        return f"work__{name}" in self._buffers

    def norm_input(self, name: str) -> str:
        return self.norm_inputs[name]

    def note_written(self, name: str, tiles: TileSet) -> None:
        self.written[name] = tiles

    def pack_slot(self, slot: SlotCache) -> None:
        """Pack ``slot``'s buffers in this working set's layout (``load`` is then one copy per
        dtype); a no-op when they already are."""
        slot.packed([f"cache__{n}" for n in self.cached_maps] + self._small)

    def load(self, key: str, slot: SlotCache) -> None:
        """Make this the working set of ``slot``: every working map := its cache, every small
        buffer := the slot's. A full copy: one copy per dtype once both sides are packed (the
        slot is packed on its first load), a multi-tensor copy otherwise. A slot in host memory
        is copied from its prefetched device copy when ``prefetch`` made one of its current
        values, straight from the host otherwise (stream-ordered either way)."""
        src_keys = [f"cache__{n}" for n in self.cached_maps] + self._small
        dst_keys = [f"work__{n}" for n in self.cached_maps] + self._small
        if not _packed(self, self._flats, dst_keys):
            self._flats = pack(self, dst_keys)
        flats = slot.packed(src_keys)
        if flats is not None and _same_layout(flats, self._flats):
            staged = self.staging.take(key, slot) if slot.on_host else None
            for dt, flat in (staged or flats).items():
                self._flats[dt].copy_(flat, non_blocking=True)
        else:  # the slot's buffers differ in layout (or are missing): tensor by tensor
            torch._foreach_copy_([self._buffers[k] for k in dst_keys],
                                 [slot._buffers[k] for k in src_keys])  # fmt: skip
        if self.sources:
            torch._foreach_copy_([self.cache(n) for n in self.sources],
                                 [slot.cache(n) for n in self.sources])  # fmt: skip
        self.slot = key

    def prefetch(self, key: str, slot: SlotCache) -> bool:
        """Start copying host slot ``key``'s caches to the device (a side stream on CUDA), for
        its next ``load``; False when there is nothing to prefetch (a device slot, an unpacked
        one, or the slot the working set holds)."""
        if not slot.on_host or self.slot == key or not slot.flats:
            return False
        if not _same_layout(slot.flats, self._flats):
            return False
        return self.staging.prefetch(key, slot.version, slot.flats, self._flats)

    def packed_bytes(self) -> int:
        """Bytes of what a slot switch copies (the staging copy's size)."""
        return sum(f.numel() * f.element_size() for f in self._flats.values())

    def reserve_staging(self) -> None:
        """Allocate the device copy ``prefetch`` fills (counted in ``nbytes`` from now on)."""
        self.staging.reserve(self._flats)

    def work_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for k, b in self._buffers.items()
                   if k.startswith(("work__", "livecache__")))  # fmt: skip

    def nbytes(self) -> int:
        """The working set and, once a host slot was prefetched, its device copy."""
        return super().nbytes() + self.staging.nbytes()
