"""``launch`` and ``precompiling``: inside the context a tile-kernel launch only starts its compile
(the warm-up's dry run); outside it launches. The real compile on a thread pool needs a GPU
(``tests/kernels/test_gpu.py::test_precompiling_compiles_without_running``)."""

from __future__ import annotations

import pytest

import sigec.kernels._common as common
from sigec.kernels import can_precompile, launch, precompiling


class _Kernel:
    """Records how it was called: ``kernel[grid](...)`` or ``kernel.warmup(..., grid=)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append(("run", grid, a, kw))

    def warmup(self, *a, grid, **kw):
        self.calls.append(("warmup", grid, a, kw))


def test_launch_runs_the_kernel_outside_precompiling():
    k = _Kernel()
    launch(k, (3, 1, 1), 1, 2, BLOCK=4)
    assert k.calls == [("run", (3, 1, 1), (1, 2), {"BLOCK": 4})]


def test_the_interpreter_never_precompiles():
    # the CPU tests run under TRITON_INTERPRET=1: nothing to compile, the context does nothing
    assert not can_precompile()
    k = _Kernel()
    with precompiling(4) as active:
        launch(k, (1,), 5)
    assert active is False and k.calls == [("run", (1,), (5,), {})]


def test_inside_precompiling_a_launch_only_starts_its_compile(monkeypatch):
    pytest.importorskip("triton.runtime._async_compile")
    monkeypatch.setattr(common, "can_precompile", lambda: True)
    k = _Kernel()
    with precompiling(2) as active:
        launch(k, (2, 2), 7, BLOCK=8)
    launch(k, (2, 2), 7, BLOCK=8)  # after the context: a launch again
    assert active is True
    assert k.calls == [("warmup", (2, 2), (7,), {"BLOCK": 8}), ("run", (2, 2), (7,), {"BLOCK": 8})]


def test_no_workers_means_no_precompile(monkeypatch):
    monkeypatch.setattr(common, "can_precompile", lambda: True)
    k = _Kernel()
    with precompiling(0) as active:
        launch(k, (1,), 1)
    assert active is False and k.calls[0][0] == "run"
