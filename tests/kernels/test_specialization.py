"""Kernels compile once per layer, not once per size class: an argument that changes with the
edit's size class (the tile capacity) must not be specialized by Triton (warm-up time)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import triton

import sigec.kernels
from sigec.kernels._common import CAPACITY


def _kernels():
    """Every Triton kernel of ``sigec.kernels`` (jitted functions named ``_*_kernel``)."""
    found = []
    for mod in pkgutil.iter_modules(sigec.kernels.__path__):
        module = importlib.import_module(f"sigec.kernels.{mod.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "arg_names"):
                found.append((f"{mod.name}.{name}", obj))
    return found


def _unspecialized(kernel) -> list:
    if isinstance(kernel, triton.runtime.JITFunction):
        return [kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize]
    return list(kernel.kwargs.get("do_not_specialize") or [])  # the interpreter's wrapper


def test_the_kernel_list_is_found():
    names = {n for n, _ in _kernels()}
    assert {"conv._tile_conv_kernel", "gather._gather_kernel", "scatter._scatter_kernel"} <= names


@pytest.mark.parametrize("name,kernel", _kernels(), ids=[n for n, _ in _kernels()])
def test_capacity_arguments_are_not_specialized(name, kernel):
    for arg in CAPACITY:
        if arg in kernel.arg_names:
            assert arg in _unspecialized(kernel), (
                f"{name}: add triton.jit(do_not_specialize=CAPACITY), or every size class whose "
                f"{arg} differs in divisibility by 16 compiles the kernel again"
            )
