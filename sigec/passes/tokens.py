"""Transform pass: token regions (transformer blocks) -> ops on maps.

``sigec.passes.layouts`` found the tensors that are maps in a token layout and the attention
cores between them (``analysis.analyze_roles``). This pass gives each of them a *map form*: a node
computing the same values as a map ``[B, C, H, W]``, so every later pass (norm folding, prologue
fusion, tile ops, residual fusion) treats a transformer block like any other part of the model:

- a view or identity (``permute``, ``reshape``, ``transpose``, eval dropout...) is its source's map;
- a token-wise op becomes the same op on the channels of every pixel:
  ``layer_norm`` -> ``ops.layer_norm_channels``, ``linear`` -> ``ops.linear_channels``,
  a part of ``chunk`` along the channels -> ``aten.slice`` on dim 1, pointwise ops stay (their
  per-channel operands are reshaped to ``[1, C, 1, 1]``);
- ``group_norm`` on ``[B, C, H*W]`` is ``group_norm`` on the map;
- an attention core becomes ``ops.sparse_attention`` (queries of the active tiles against all keys
  and values), or ``ops.attention_channels`` on full maps when it runs dense.

Consumers outside the region (dense ops, the graph output) get their original layout back through
``ops.map_to_layout``. The original region nodes are left without users and removed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from sigec.passes.analysis import info, same_shape, set_info
from sigec.passes.base import PassContext, PassResult, dead_code, finish
from sigec.runtime import ops

aten = torch.ops.aten

REGION_OPS = ("view", "tokenwise", "chunk", "attention", "attention_part")


def _in_region(node: torch.fx.Node) -> bool:
    ni = info(node)
    return ni.role == "dependent" and (ni.op in REGION_OPS or (ni.op == "norm" and bool(ni.layout)))


def tokens_to_maps(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Every token-region node -> its map form (see the module docstring)."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    form: dict[torch.fx.Node, torch.fx.Node] = {}
    changed = 0

    def map_of(a):
        if not isinstance(a, torch.fx.Node):
            return a
        if a in form:
            return form[a]
        if info(a).spatial:
            return a
        raise AssertionError(f"{a.name} has no map form")

    for node in list(graph.nodes):
        if node.op != "call_function" or not _in_region(node):
            continue
        ni = info(node)
        if ni.op in ("attention_part", "chunk"):
            continue
        if ni.op == "view":
            form[node] = map_of(node.args[0])
            continue
        with graph.inserting_before(node):
            new = _map_form(gm, node, map_of, by_name, ctx)
        val = node.meta["val"]
        b, c = int(val.shape[0]), _channels(node)
        h, w = ni.resolution
        new.meta["val"] = torch.empty((b, c, h, w), dtype=val.dtype, device="meta")
        new.meta["sigec_name"] = node.name
        new.meta["sigec"] = ni
        set_info(new, spatial=True, layout="",
                 op={"tokenwise": "pointwise"}.get(ni.op, ni.op))  # fmt: skip
        if new.target is ops.sparse_attention:
            ctx.add_map(node.name, new)
        form[node] = new
        changed += 1

    # consumers outside the region read the map in their own layout
    for node, mapped in form.items():
        lay = info(node).layout
        conv = None
        for user in list(node.users):
            if _in_region(user):
                continue
            if not lay:
                user.replace_input_with(node, mapped)
                continue
            if conv is None:
                with graph.inserting_after(mapped):
                    conv = graph.call_function(ops.map_to_layout, (mapped, lay))
                conv.meta.update(node.meta)
                set_info(conv, op="dense", mode="dense", spatial=False)
            user.replace_input_with(node, conv)
    dead_code(gm)
    return finish(gm, "tokens_to_maps", changed, ctx, "token_ops_mapped")


def _channels(node: torch.fx.Node) -> int:
    val = node.meta["val"]
    return int(val.shape[{"tokens": 2, "flat": 1, "nhwc": 3, "": 1}[info(node).layout]])


def _map_form(gm, node, map_of, by_name, ctx: PassContext) -> torch.fx.Node:
    """The node computing ``node``'s value as a map (inserted before ``node``)."""
    graph = gm.graph
    ni = info(node)
    t = node.target
    a = list(node.args)
    if ni.op == "attention":
        m = node.meta["sigec_attention"]
        q, k, v = (by_name[m[r]] for r in ("q", "k", "v"))
        k, v = (map_of(x) if info(x).layout or info(x).spatial else x for x in (k, v))
        if ni.mode == "sparse":
            key = ctx.request(node.name, ni.resolution)
            for part in m["parts"]:
                ctx.op_tiles[part] = key
            return graph.call_function(
                ops.sparse_attention, (ctx.state, ctx.tiles, map_of(q), k, v),
                {"heads": m["heads"], "scale": m["scale"], "name": node.name, "tile_key": key},
            )  # fmt: skip
        return graph.call_function(ops.attention_channels,
                                   (map_of(q), k, v, m["heads"], m["scale"]))  # fmt: skip
    if t == aten.layer_norm.default:
        eps = a[4] if len(a) > 4 else 1e-5
        return graph.call_function(ops.layer_norm_channels,
                                   (map_of(a[0]), _opt(a, 2), _opt(a, 3), eps))  # fmt: skip
    if t == aten.linear.default:
        return graph.call_function(ops.linear_channels, (map_of(a[0]), a[1], _opt(a, 2)))
    if t is operator.getitem:  # a part of a chunk along the channels
        chunk, i = a
        cdim = {"tokens": 2, "flat": 1, "nhwc": 3}[info(chunk).layout]
        parts = chunk.meta["val"]
        start = sum(int(p.shape[cdim]) for p in parts[:i])
        end = start + int(parts[i].shape[cdim])
        return graph.call_function(aten.slice.Tensor, (map_of(chunk.args[0]), 1, start, end))
    if t == aten.group_norm.default:
        return graph.call_function(t, (map_of(a[0]), *a[1:]), dict(node.kwargs))

    def operand(x):  # a pointwise op's operand
        if not isinstance(x, torch.fx.Node):
            return x
        if _in_region(x) or info(x).spatial:
            return map_of(x)
        xv = x.meta.get("val")
        if not isinstance(xv, torch.Tensor) or xv.numel() == 1:
            return x
        if same_shape(x, node.meta["val"].shape):  # a dense tensor in the region's layout
            as_map = graph.call_function(ops.layout_to_map, (x, ni.layout, ni.resolution))
            b, c, (h, w) = int(xv.shape[0]), _channels(node), ni.resolution
            as_map.meta["val"] = torch.empty((b, c, h, w), dtype=xv.dtype, device="meta")
            as_map.meta["sigec"] = info(x)
            set_info(as_map, spatial=True, resolution=ni.resolution, layout="", op="view",
                     mode="dense")  # fmt: skip
            return as_map
        op = graph.call_function(ops.channel_operand, (x,))
        op.meta["val"] = xv.reshape(1, -1, 1, 1)
        role = info(x).role
        op.meta["sigec"] = info(x)
        # a per-channel view of a weight is a constant; of a static value, a cheap per-edit view
        const = role in ("param", "const")
        set_info(op, role="const" if const else "dependent", mode="const" if const else "dense",
                 op="", spatial=False)  # fmt: skip
        return op

    args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), operand)
    return graph.call_function(t, tuple(args), dict(kwargs))


def _opt(a: list, i: int):
    return a[i] if len(a) > i else None
