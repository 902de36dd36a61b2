"""Functions compiled by inductor on first call, one compile per distinct graph.

An edit graph holds many small graphs that inductor compiles: dense regions, tile expressions
(a SPADE modulation, a transformer block's feed-forward). A UNet repeats its blocks, so most of
them are the same graph on the same shapes: SD 1.5's 48 compiled tile expressions are 9
distinct compiles (measured, docs/results.md). Dynamo compiles per code object, and every
``GraphModule`` has its own, so each copy used to pay a trace, AOT and inductor's cache lookup
(twice for a tile expression: static, then dynamic in the tile count) during warm-up, with a
warm disk cache too.

``CompiledOrEager`` shares one compiled function between all graphs of the same structure called
with the same argument signature (dtype, device, shape and strides of every tensor; the leading
tile dimension left out where the compile is dynamic). The graphs are functional (their weights
are inputs: ``passes.regions`` hoists every read), so calling the first one with another's
arguments computes the other's result. Graphs holding tensor constants or submodules, and plain
functions, are never shared.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.fx
import torch.utils._pytree as pytree

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
          torch.layout, slice, type(Ellipsis))  # fmt: skip


class _Unshareable(Exception):
    pass


def structure_key(fn) -> tuple | None:
    """What ``fn`` computes, independent of its node names: one row per node (op, target,
    arguments with nodes as indices and constants by value); None if it cannot be shared."""
    if not isinstance(fn, torch.fx.GraphModule):
        return None
    index: dict[torch.fx.Node, int] = {}
    rows = []
    try:
        for i, node in enumerate(fn.graph.nodes):
            if node.op in ("call_module", "get_attr"):
                return None
            index[node] = i
            rows.append((node.op, _target(node), _canon(node.args, index),
                         _canon(node.kwargs, index)))  # fmt: skip
    except _Unshareable:
        return None
    return tuple(rows)


def _target(node: torch.fx.Node) -> str:
    t = node.target
    if node.op == "placeholder":
        return ""  # called positionally: its name does not matter
    if node.op in ("output", "call_method"):
        return str(t)
    if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(t)
    if callable(t):  # Python functions (operator.getitem, sigec.runtime.ops)
        return f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', repr(t))}"
    raise _Unshareable


def _canon(value, index):
    if isinstance(value, torch.fx.Node):
        return ("%", index[value])
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_canon(v, index) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _canon(v, index)) for k, v in value.items())))
    if isinstance(value, _PLAIN):
        return (type(value).__name__, repr(value))
    raise _Unshareable  # tensors and other objects: compared by identity, never shared


def call_signature(args, kwargs, free_leading_dim: bool) -> tuple:
    """dtype, device, shape and strides of every tensor argument, other arguments by value.

    With ``free_leading_dim`` (a compile dynamic in the tile count) the leading dimension is left
    out of the tensors that carry the tile batch: those whose leading size is the first 4-D
    tensor's (tile batches are ``[N*M, C, th, tw]``; per-tile operands are repeated to N*M rows).
    A parameter of another leading size keeps it, so graphs that differ there are not shared.
    """
    leaves = pytree.tree_leaves((args, kwargs))
    batch = next((v.shape[0] for v in leaves if isinstance(v, torch.Tensor) and v.dim() == 4),
                 None) if free_leading_dim else None  # fmt: skip

    def one(v):
        if isinstance(v, torch.Tensor):
            shape, stride = tuple(v.shape), v.stride()
            if batch is not None and v.dim() > 0 and shape[0] == batch:
                shape, stride = ("*", *shape[1:]), stride[1:]
            return ("T", str(v.dtype), str(v.device), shape, stride, v.requires_grad)
        if isinstance(v, _PLAIN):
            return (type(v).__name__, repr(v))
        return ("id", id(v))

    return tuple(one(v) for v in leaves)


class _Shared:
    """One compiled function and its state (None: not yet compiled; False: inductor failed)."""

    def __init__(self, fn, compile_kwargs):
        self.fn, self.compile_kwargs = fn, compile_kwargs
        self.compiled = None
        self.users = 0


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_compiles() -> dict:
    """How many compiled functions are alive and how many graphs use them (diagnostics)."""
    live = list(_SHARED.values())
    return {"functions": len(live), "users": sum(s.users for s in live)}


class CompiledOrEager:
    """``fn`` compiled by inductor on first call; if inductor fails on it, ``fn`` runs eagerly
    from then on, with a warning naming ``what`` and the ``SparseConfig`` knob that turns it off.
    Graphs of one structure called with one signature share a compile (module docstring).
    """

    def __init__(self, fn, what: str, knob: str, **compile_kwargs):
        self.fn, self.what, self.knob, self.compile_kwargs = fn, what, knob, compile_kwargs
        self._shared: _Shared | None = None

    def _resolve(self, args, kwargs) -> _Shared:
        structure = structure_key(self.fn)
        if structure is None:
            return _Shared(self.fn, self.compile_kwargs)
        free = self.compile_kwargs.get("dynamic") is not False
        key = (structure, tuple(sorted((k, repr(v)) for k, v in self.compile_kwargs.items())),
               call_signature(args, kwargs, free))  # fmt: skip
        shared = _SHARED.get(key)
        if shared is None:
            shared = _Shared(self.fn, self.compile_kwargs)
            _SHARED[key] = shared
        return shared

    def __call__(self, *args, **kwargs):
        shared = self._shared
        if shared is None:
            shared = self._shared = self._resolve(args, kwargs)
            shared.users += 1
        if shared.compiled is False:
            return self.fn(*args, **kwargs)
        if shared.compiled is None:
            shared.compiled = torch.compile(shared.fn, fullgraph=True, **shared.compile_kwargs)
        try:
            return shared.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - inductor could not take it: run eagerly, say so
            warnings.warn(
                f"sigec: {self.what} runs eagerly, because torch.compile failed on it "
                f"({type(e).__name__}: {str(e)[:200]}); set SparseConfig({self.knob}='eager') "
                "to silence this",
                stacklevel=2,
            )
            shared.compiled = False
            return self.fn(*args, **kwargs)
