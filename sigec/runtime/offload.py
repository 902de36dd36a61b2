"""Slot caches in host memory: pinned buffers, and one slot's device copy made ahead of its load.

A trajectory of many steps keeps one slot per step; their caches need not all sit on the GPU.
A slot placed on the host (``SlotCache.place(host=True)``) keeps its packed flat tensors in
pinned memory. Its edits need them in the working set, a full copy per slot switch; to hide that
copy behind the previous step's compute, ``Staging.prefetch`` copies the next slot into a device
buffer of the working set's layout on a side stream, and the load copies from there (device to
device) after waiting for it. The staging copy is tagged with the slot's key and version (bumped
by every record and commit): a copy of older values is never used.

Stream order, on CUDA: the side stream waits for everything queued on the current stream when a
prefetch starts (the previous load from the staging buffer, commits that wrote the slot), and the
current stream waits for the prefetch before it reads the staging buffer. Off CUDA the same steps
run as plain copies (what the CPU tests check).
"""

from __future__ import annotations

import torch


def check_where(value, allowed: tuple, what: str = "where"):
    """``value`` if it is one of ``allowed`` (where caches live), else a ValueError naming them."""
    if value not in allowed:
        raise ValueError(f"{what}: expected one of {allowed}, got {value!r}")
    return value


def to_pinned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in pinned host memory (``t`` itself when it is on the CPU already: a CPU
    engine has no device memory to save, and pinning needs CUDA)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


class Staging:
    """One host slot's packed caches on the device, ready for its load (see the module doc)."""

    def __init__(self):
        self.flats: dict | None = None  # dtype -> device flat, the working set's layout
        self.tag: tuple | None = None  # (slot key, slot version) of what it holds (or copies)
        self.stream = None
        self.device = None
        self.ready = None  # CUDA event: the copy into ``flats`` finished
        self.hits = 0  # loads served by a prefetched copy
        self.misses = 0  # loads of a host slot copied straight from the host

    def prefetch(self, key: str, version: int, host: dict, like: dict) -> bool:
        """Copy ``host`` (a slot's flats) into the staging buffer; ``like``: the working set's
        flats (device and layout). True once the copy is queued (or already held)."""
        if self.tag == (key, version):
            return True
        self.reserve(like)
        device = self.device
        if device.type == "cuda":
            if self.stream is None:
                self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                for dt, flat in host.items():
                    self.flats[dt].copy_(flat, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(self.stream)
        else:
            for dt, flat in host.items():
                self.flats[dt].copy_(flat)
        self.tag = (key, version)
        return True

    def reserve(self, like: dict) -> None:
        """Allocate the staging buffer (the working set's layout ``like``) if it is not."""
        if self.flats is None or any(self.flats[d].shape != f.shape for d, f in like.items()):
            if self.stream is not None:  # the old buffer may still be written on the side stream
                self.stream.synchronize()
            self.flats = {dt: torch.empty_like(f) for dt, f in like.items()}
            self.tag = None
        self.device = next(iter(like.values())).device

    def take(self, key: str, slot) -> dict | None:
        """The staging flats if they hold ``slot``'s current values (the current stream then
        waits for their copy), else None (the load copies from the host: a miss)."""
        if self.flats is None or self.tag != (key, slot.version):
            self.misses += 1
            return None
        if self.ready is not None:  # CUDA: the load (queued next) waits for the copy
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        self.hits += 1
        return self.flats

    def forget(self) -> None:
        """Drop the staging buffer (its memory) and what it held."""
        if self.stream is not None:
            self.stream.synchronize()  # no copy into the buffer is left in flight
        self.flats, self.tag, self.ready = None, None, None

    def nbytes(self) -> int:
        if self.flats is None:
            return 0
        return sum(f.numel() * f.element_size() for f in self.flats.values())

    def stats(self) -> dict:
        return {"prefetch_hits": self.hits, "host_loads": self.misses,
                "staging_bytes": self.nbytes()}  # fmt: skip
