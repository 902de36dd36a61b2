"""What every transform pass shares: the context, the result, the graph helpers.

A pass is ``pass_fn(gm, ctx) -> PassResult``: it mutates ``gm`` in place, ends with ``finish``
(lint, recompile, the counter tests assert on) and bumps named counters in ``ctx.counters``. The
edit graph takes ``(state, tiles, *flat_inputs)``: ``state`` is the slot's caches and working
maps, ``tiles`` the edit's tile lists (see ``sigec.runtime.ops``); ``add_runtime_inputs`` adds
those placeholders and is the first pass of ``pipeline.PIPELINE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from sigec.config import SparseConfig
from sigec.passes.analysis import info
from sigec.runtime import ops
from sigec.runtime.program import (
    NormFold,
    TileRequest,
)

aten = torch.ops.aten


@dataclass
class PassContext:
    """What the passes share and hand to the emitted ``Program``."""

    config: SparseConfig
    counters: dict[str, int] = field(default_factory=dict)
    consts: dict[str, torch.Tensor] = field(default_factory=dict)  # folded at compile
    statics: list[str] = field(default_factory=list)  # cached at record
    norms: list[NormFold] = field(default_factory=list)
    maps: dict[str, tuple] = field(default_factory=dict)  # name -> (shape, dtype)
    tile_requests: dict[str, TileRequest] = field(default_factory=dict)
    map_tiles: dict[str, str] = field(default_factory=dict)
    op_tiles: dict[str, str] = field(default_factory=dict)  # captured linear/attention -> tiles
    tile_macs: dict[str, int] = field(default_factory=dict)  # transposed conv -> MACs per tile
    prelude: torch.fx.GraphModule | None = None  # record-time values of hoisted invariants
    hoisted: list[str] = field(default_factory=list)
    private_maps: frozenset = frozenset()  # maps read only at their producer's tiles
    passed_maps: frozenset = frozenset()  # private maps handed over as tile batches (no map)
    state: torch.fx.Node | None = None
    tiles: torch.fx.Node | None = None

    def bump(self, counter: str, by: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + by

    def request(self, node_name: str, res, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                tile=None, in_scale=1, transposed=False) -> str:  # fmt: skip
        """Register the tile list that the op writing map ``node_name`` needs; return its key."""
        t = tile if tile is not None else self.config.pointwise_tile(res, in_scale)
        mask = node_name if self.config.mask_policy == "exact" else tuple(res)
        req = TileRequest(mask, tuple(kernel), tuple(stride), tuple(padding), (t, t), in_scale,
                          transposed)  # fmt: skip
        mask_txt = mask if isinstance(mask, str) else f"{mask[0]}x{mask[1]}"
        key = (
            f"{mask_txt}|k{req.kernel[0]}x{req.kernel[1]}|s{req.stride[0]}x{req.stride[1]}"
            f"|p{req.padding[0]}x{req.padding[1]}|t{t}|u{in_scale}"
        ) + ("|T" if transposed else "")
        self.tile_requests[key] = req
        self.map_tiles[node_name] = key
        return key

    def add_map(self, name: str, node: torch.fx.Node) -> None:
        """Register the working map named after captured node ``name``, shaped like ``node``."""
        val = node.meta["val"]
        self.maps[name] = (tuple(val.shape), val.dtype)


@dataclass(frozen=True)
class PassResult:
    name: str
    changed: int


def finish(gm: torch.fx.GraphModule, name: str, changed: int, ctx: PassContext | None = None,
           counter: str | None = None) -> PassResult:  # fmt: skip
    """End a pass: lint and recompile ``gm``; ``ctx.counters[counter] += changed`` if given."""
    if counter is not None:
        ctx.bump(counter, changed)
    gm.graph.lint()
    gm.recompile()
    return PassResult(name, changed)


def sparse_nodes(gm: torch.fx.GraphModule, op: str) -> list[torch.fx.Node]:
    """The calls of op class ``op`` that run sparse, as a list (passes replace them as they go)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and info(n).op == op
            and info(n).mode == "sparse"]  # fmt: skip


def replace_with(gm: torch.fx.GraphModule, node: torch.fx.Node, target, args, kwargs=None):
    """Put ``target(*args, **kwargs)`` where ``node`` was: same meta, same users; ``node`` goes."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, tuple(args), dict(kwargs or {}))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def orig_name(node: torch.fx.Node) -> str:
    """The captured node a rewritten node stands for (maps and masks are named after it)."""
    return node.meta.get("sigec_name", node.name)


def node_name(node) -> str | None:
    return node.name if isinstance(node, torch.fx.Node) else None


def dead_code(gm: torch.fx.GraphModule) -> int:
    """Remove nodes without users (runtime ops return the map they write: unused means dead)."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and node.target in (aten._assert_tensor_metadata.default,):
            continue
        gm.graph.erase_node(node)
        removed += 1
    return removed


def eliminate_dead_code(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Drop what no output needs (the static and const subgraphs the edit reads from caches)."""
    removed = dead_code(gm)
    ctx.bump("nodes_removed", removed)
    return finish(gm, "eliminate_dead_code", removed)


RUNTIME_MAP_OPS = {ops.sparse_conv2d, ops.sparse_attention, ops.tile_op, ops.tile_upsample}


def add_runtime_inputs(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Prepend the ``state`` and ``tiles`` placeholders the runtime ops read."""
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first):
        ctx.state = gm.graph.placeholder("sigec_state")
        ctx.tiles = gm.graph.placeholder("sigec_tiles")
    for n in (ctx.state, ctx.tiles):
        n.meta["sigec"] = info(n)
    return finish(gm, "add_runtime_inputs", 2)
