"""The public API: ``sigec.compile(model, example_inputs, config)`` -> ``SparseEngine``."""

from __future__ import annotations

import copy

import torch

from sigec.config import SparseConfig
from sigec.passes.pipeline import build_program
from sigec.runtime.engine import SparseEngine


def compile(  # noqa: A001 (the verb is the API)
    model: torch.nn.Module,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    config: SparseConfig | None = None,
) -> SparseEngine:
    """Turn an unmodified model into an incremental engine.

    The model is captured with ``torch.export`` (strict=False) on the example inputs, its
    convolutions and the pointwise ops between them are rewritten to run on the edited tiles only,
    and a ``SparseEngine`` is returned::

        engine = sigec.compile(model, example_inputs=(x, t), config=sigec.SparseConfig())
        y0 = engine.record(x, t)                 # dense run; fills the caches
        y1 = engine.edit(x_edited, t)            # recomputes only where x changed
        y1 = engine.edit(x_edited, t, mask=m)    # or where the bool mask m [H, W] says
        engine.commit()                          # the edit becomes the new original
        engine.stats()                           # MACs, active fractions, cache bytes, fallbacks

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture; it is put in eval mode in a
            private copy and never mutated.
        example_inputs: positional inputs of a typical call (shapes and dtypes are fixed by them).
        example_kwargs: keyword inputs of that call (e.g. ``encoder_hidden_states``).
        config: a ``SparseConfig``; the default is SIGE's truncated policy.

    Returns:
        A ``SparseEngine`` with ``record``, ``edit``, ``commit``, ``stats`` and ``to``.
    """
    config = config or SparseConfig()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple | list):
        example_inputs = (example_inputs,)
    source = _private_copy(model).eval()
    example = (tuple(example_inputs), dict(example_kwargs or {}))

    def rebuild(device=None, dtype=None):
        nonlocal example
        if device is not None or dtype is not None:
            source.to(device=device, dtype=dtype)
            example = _move(example, device, dtype)
        return build_program(source, example[0], example[1], config)

    return SparseEngine(rebuild(), config, rebuild)


def _private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model``. Tensors computed in a forward pass and kept as plain attributes
    (spectral norm's ``weight`` after a call with grad enabled) cannot be deep-copied: their
    copies are detached clones; the user's model is not touched."""
    memo = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _move(tree, device, dtype):
    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.to(device) if device is not None else v
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    return torch.utils._pytree.tree_map(move, tree)
