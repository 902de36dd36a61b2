"""CUDA graphs: captured once during warm-up, replayed by every edit.

``GraphSet.capture(fn)`` runs ``fn`` once on a side stream (so Triton and inductor compile, and
libraries set up their handles, outside any capture), records it as one CUDA graph in the
engine's memory pool and returns a ``Captured`` whose call replays it and returns the graph's
outputs (static tensors, overwritten by the next replay). Off CUDA, ``Captured`` simply calls
``fn``: the same code path runs uncaptured, which is what the CPU tests exercise.

Graphs of one engine share a pool: they never run concurrently, and every output an edit returns
is copied before the next replay. ``captures`` counts every graph made; ``edit_captures`` those
made outside ``warming()`` (the edit path makes none: ``engine.stats()`` shows it).
"""

from __future__ import annotations

import contextlib
import statistics

import torch


class Captured:
    """``fn`` as one CUDA graph (``graph`` set) or, off CUDA, as itself."""

    def __init__(self, fn, graph=None, outs=None):
        self.fn, self.graph, self.outs = fn, graph, outs

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.outs


class GraphSet:
    """The CUDA graphs of one engine (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.captures = 0
        self.edit_captures = 0
        self._warming = False

    @contextlib.contextmanager
    def warming(self):
        """Captures inside this block are warm-up's; any other is counted as an edit's."""
        self._warming, before = True, self._warming
        try:
            yield
        finally:
            self._warming = before

    def capture(self, fn) -> Captured:
        """``fn`` run once (warm-up) and captured; off CUDA, ``fn`` itself (not run)."""
        if not self.cuda:
            return Captured(fn)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles kernels, sets up library handles
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outs = fn()
        if self._warming:
            self.captures += 1
        else:
            self.edit_captures += 1
        return Captured(fn, graph, outs)

    def time_ms(self, captured: Captured, reps: int = 5) -> float:
        """Median CUDA-event time of ``reps`` replays (after one untimed), in ms."""
        captured()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            captured()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


class HostReader:
    """Reads a small device tensor on the host: through pinned memory and one event on CUDA
    (the edit's one host sync), plainly elsewhere."""

    def __init__(self, like: torch.Tensor):
        self.cuda = like.is_cuda
        if self.cuda:
            self.host = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
            self.event = torch.cuda.Event()

    def __call__(self, value: torch.Tensor) -> list[int]:
        if not self.cuda:
            return value.tolist()
        self.host.copy_(value, non_blocking=True)
        self.event.record()
        self.event.synchronize()
        return self.host.tolist()
