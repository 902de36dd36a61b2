"""``launch`` and ``precompiling``: inside the context a tile-kernel launch only starts its compile
(the warm-up's dry run); outside it launches. The real compile on a thread pool needs a GPU
(``tests/kernels/test_gpu.py::test_precompiling_compiles_without_running``)."""

from __future__ import annotations

import pytest

import sigec.kernels._common as common
from sigec.kernels import can_precompile, launch, precompiling


class _Kernel:
    """Records how it was called: ``kernel[grid](...)`` or ``kernel.warmup(..., grid=)``."""

    arg_names = ["x", "M", "C"]

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


def test_precompiling_submits_each_signature_once(monkeypatch):
    """Repeats of one launch signature are skipped (Triton hashes the source on every submit);
    launches that differ only in the tile capacity ``M`` (never specialized) are one signature;
    any other argument, a tensor's dtype or its 16-byte alignment makes another."""
    pytest.importorskip("triton.runtime._async_compile")
    import torch

    monkeypatch.setattr(common, "can_precompile", lambda: True)
    k = _Kernel()
    x = torch.zeros(16)
    with precompiling(2):
        launch(k, (1,), x, 8, 32, BLOCK=4)
        launch(k, (9,), x, 8, 32, BLOCK=4)  # the grid follows M: the same kernel
        launch(k, (3,), x, 24, 32, BLOCK=4)  # another capacity: the same kernel
        launch(k, (1,), x, 8, 48, BLOCK=4)  # another channel count
        launch(k, (1,), x.half(), 8, 32, BLOCK=4)  # another dtype
        launch(k, (1,), x[1:], 8, 32, BLOCK=4)  # unaligned
        launch(k, (1,), x, 8, 32, BLOCK=8)  # another block
    assert [c[0] for c in k.calls] == ["warmup"] * 5
