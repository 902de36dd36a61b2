"""Flattening a call's inputs in the order the compiled graph takes them; input checks."""

from __future__ import annotations

import torch.utils._pytree as pytree

from sigec.errors import InputMismatchError, StaleCacheError


def spec_children(spec: pytree.TreeSpec) -> list:
    """Child specs of a pytree spec (``children()`` on newer torch, ``children_specs`` before)."""
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def flatten_call(args: tuple, kwargs: dict, in_spec: pytree.TreeSpec) -> list:
    """Flatten ``(args, kwargs)`` in the order of ``in_spec``; typed error on a mismatch."""
    kwargs = dict(kwargs or {})
    keys = list(spec_children(in_spec)[1].context) if in_spec.num_children == 2 else []
    missing = [k for k in keys if k not in kwargs]
    extra = [k for k in kwargs if k not in keys]
    if missing or extra:
        raise InputMismatchError(
            f"keyword inputs differ from the compiled call: missing {missing}, unexpected {extra}; "
            "call the engine with the same keywords as example_kwargs"
        )
    flat, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in keys}))
    if spec != in_spec:
        raise InputMismatchError(
            f"inputs have another structure than the compiled example ({len(args)} positional "
            f"inputs given); call the engine the way example_inputs / example_kwargs did"
        )
    return flat


def raise_if_stale(names: list[str], changed: list[bool]) -> None:
    """StaleCacheError naming the first non-image input that differs from the recorded one."""
    for name, bad in zip(names, changed, strict=True):
        if bad:
            raise StaleCacheError(
                f"input {name} differs from the one recorded in slot (timestep, prompt "
                "embedding or label changed): the cached features are stale. Record this input "
                "in its own slot (engine.record(..., slot=...)) and edit that slot."
            )
