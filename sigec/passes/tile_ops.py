"""Tile-op passes: the sparse pointwise ops left after the conv passes run on tile batches
(``ops.tile_op``: one expression per group of ops, compiled by inductor when asked) and integer
nearest upsampling becomes ``ops.tile_upsample``.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree

from sigec.passes.analysis import info, same_shape
from sigec.passes.base import (
    RUNTIME_MAP_OPS,
    PassContext,
    PassResult,
    finish,
    orig_name,
    replace_with,
    sparse_nodes,
)
from sigec.passes.op_tables import upsample_factor
from sigec.runtime import ops

aten = torch.ops.aten


def _is_tile_op(node: torch.fx.Node) -> bool:
    ni = info(node)
    return (
        node.op == "call_function" and ni.mode == "sparse" and ni.spatial
        and node.target not in RUNTIME_MAP_OPS and ni.op != "upsample"
    )  # fmt: skip


def _expression_roots(gm: torch.fx.GraphModule) -> dict:
    """Tile op -> the tile op whose expression computes it (itself if it gets a working map).

    An op is inlined when every user is a tile op at its resolution and all of them belong to
    the same expression: chains, and DAGs such as GEGLU's two halves of one projection.
    """
    root: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in reversed(list(gm.graph.nodes)):
        if not _is_tile_op(n):
            continue
        users = list(n.users)
        owners = {root.get(u) for u in users}
        same = all(_is_tile_op(u) and info(u).resolution == info(n).resolution for u in users)
        root[n] = next(iter(owners)) if users and same and len(owners) == 1 else n
    return root


def rewrite_tile_ops(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remaining sparse pointwise ops, concatenations, norms and token-wise ops -> ``tile_op``.

    Connected ops run as one ``tile_op`` whose function is the whole expression (a small
    GraphModule): an op whose users all belong to one expression at the same resolution is
    inlined into it, so only the expression's result gets a working map (one gather per input
    map and one scatter, instead of one of each per op).
    """
    roots = _expression_roots(gm)
    inlined = {n for n, r in roots.items() if r is not n}
    changed = fused = 0
    for node in list(gm.graph.nodes):
        if not _is_tile_op(node) or node in inlined:
            continue
        group, leaves = _expression(node, inlined)
        out_shape = node.meta["val"].shape  # a same-shaped dense operand is read like a map
        is_map = lambda a, shape=out_shape: (
            isinstance(a, torch.fx.Node)
            and (  # noqa: E731
                info(a).spatial or same_shape(a, shape)
            )
        )
        name = orig_name(node)
        key = ctx.request(name, info(node).resolution)
        for member in group:
            ctx.op_tiles[orig_name(member)] = key
        compiled = False
        if len(group) == 1:  # a single op: call it directly
            fn = ops.TILE_FUNCTIONS_BY_FN.get(node.target, node.target)  # codegen needs a name
            args, kwargs = node.args, dict(node.kwargs)
        else:
            compiled = ctx.config.tile_expressions == "inductor"
            attr = f"_sigec_expr_{name}"
            gm.add_submodule(attr, _expression_module(gm, group, leaves))
            with gm.graph.inserting_before(node):
                fn = gm.graph.get_attr(attr)
            args, kwargs = tuple(leaves), {}
            fused += len(group) - 1
        flags = (pytree.tree_map(is_map, args), pytree.tree_map(is_map, kwargs))
        new = replace_with(gm, node, ops.tile_op,
                            (ctx.state, ctx.tiles, fn, args, kwargs, flags),
                            {"name": name, "tile_key": key, "compiled": compiled})  # fmt: skip
        ctx.add_map(name, new)
        changed += 1
    ctx.bump("tile_ops", changed)
    ctx.bump("tile_ops_inlined", fused)
    return finish(gm, "rewrite_tile_ops", changed)


def _expression(root: torch.fx.Node, inlined: set) -> tuple[list, list]:
    """The ops of ``root``'s chain in graph order, and its inputs (leaves) in first-use order."""
    group, leaves, stack = {root}, [], [root]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in inlined and a not in group:
                group.add(a)
                stack.append(a)
    order = [n for n in root.graph.nodes if n in group]
    for n in order:
        for a in n.all_input_nodes:
            if a not in group and a not in leaves:
                leaves.append(a)
    return order, leaves


def _expression_module(gm, group: list, leaves: list) -> torch.fx.GraphModule:
    """A GraphModule computing ``group[-1]`` from ``leaves`` (positional inputs)."""
    graph = torch.fx.Graph()
    env = {leaf: graph.placeholder(f"in_{i}") for i, leaf in enumerate(leaves)}
    for n in group:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[group[-1]])
    return torch.fx.GraphModule(gm, graph)


def rewrite_upsamples(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Nearest upsampling by an integer factor -> ``tile_upsample`` (tiles at both resolutions)."""
    changed = 0
    for node in sparse_nodes(gm, "upsample"):
        ni = info(node)
        f = upsample_factor(node)
        key = ctx.request(orig_name(node), ni.resolution, in_scale=f)
        name = orig_name(node)
        new = replace_with(gm, node, ops.tile_upsample, (ctx.state, ctx.tiles, node.args[0], f),
                            {"name": name, "tile_key": key})  # fmt: skip
        ctx.add_map(name, new)
        changed += 1
    return finish(gm, "rewrite_upsamples", changed, ctx, "upsamples_sparse")


def mark_private_maps(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Maps that are only ever read at the tiles their producer writes in the same edit
    (``ctx.private_maps``).

    Every user gathers the map through the very tile list that wrote it (token-wise ops and the
    queries of attention at one resolution share the pointwise tile list), or reads it at a
    conv's output tiles, which are the producer's (same mask and tile size): as the residual
    (``convs.fuse_residuals`` picks the tile so) or as the input of a 1x1 conv (a transformer
    block's output into ``proj_out``). Values outside those tiles are never read, so the map
    needs no cache and no restore. Outputs, maps read in full
    (keys/values, dense ops, convs with halos or other tiles) and incremental norms' inputs keep
    theirs.
    """
    norm_inputs = {nf.input for nf in ctx.norms if nf.incremental}
    private = set()
    for node in gm.graph.nodes:
        if node.target not in (ops.tile_op, ops.sparse_attention, ops.sparse_conv2d,
                               ops.tile_upsample):  # fmt: skip
            continue
        name, key = node.kwargs["name"], node.kwargs["tile_key"]
        if name not in ctx.maps or name in norm_inputs or not node.users:
            continue
        if all(_reads_only_tiles(u, node, key, ctx.tile_requests) for u in node.users):
            private.add(name)
    ctx.private_maps = frozenset(private)
    ctx.bump("private_maps", len(private))
    return PassResult("mark_private_maps", len(private))


def pass_tiles(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Scatter -> gather fusion on one tile list (``SparseConfig.pass_tiles``; after
    ``mark_private_maps``): a private map whose producer is a ``tile_op`` or
    ``sparse_attention`` and whose readers all are too (they gather it at the same tiles) is never
    built. The producer returns its tile batch (``as_tiles``) and each reader takes it as its
    operand (flag ``ops.TILES``, or ``q_tiles``): per map one scatter and one gather per reader
    fewer, and no working map. Inside a transformer block: the LayerNorm outputs, queries and
    attention outputs. The maps it removed: ``ctx.passed_maps``."""
    if not ctx.config.pass_tiles:
        ctx.bump("tiles_passed", 0)
        return PassResult("pass_tiles", 0)
    private = ctx.private_maps
    passing = (ops.tile_op, ops.sparse_attention)
    passed = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in passing:
            continue
        name = node.kwargs["name"]
        if name not in private or not all(u.target in passing for u in node.users):
            continue
        n = ctx.maps[name][0][0]
        node.kwargs = {**node.kwargs, "as_tiles": ctx.maps[name][1], "batch": n}
        for user in list(node.users):
            if user.target is ops.sparse_attention:  # private: the producer is its queries only
                user.kwargs = {**user.kwargs, "q_tiles": True, "batch": n}
                continue
            state, tiles, fn, args, kwargs, flags = user.args
            marks, spec = pytree.tree_flatten(flags)
            leaves = pytree.tree_leaves((args, kwargs))
            marks = [ops.TILES if a is node else f for a, f in zip(leaves, marks, strict=True)]
            user.args = (state, tiles, fn, args, kwargs, pytree.tree_unflatten(marks, spec))
            user.kwargs = {**user.kwargs, "batch": n}
        passed.add(name)
    ctx.passed_maps = frozenset(passed)
    ctx.bump("tiles_passed", len(passed))
    return finish(gm, "pass_tiles", len(passed))


def _reads_only_tiles(user: torch.fx.Node, producer: torch.fx.Node, key: str,
                      requests: dict) -> bool:  # fmt: skip
    if user.op != "call_function":
        return False
    if user.target is ops.sparse_conv2d:
        # a conv reads its residual at its output tiles, and a 1x1 conv (stride 1, no padding)
        # its input too: the producer's tiles when both lists come from one mask and one tile
        # size (their output corners are the same list)
        mine, theirs = requests[user.kwargs["tile_key"]], requests[key]
        if (mine.mask, mine.tile) != (theirs.mask, theirs.tile):
            return False
        if user.kwargs.get("upsample", 1) != 1:  # reads through a lookup: other pixels
            return False
        if producer not in pytree.tree_leaves(user.args):
            return user.kwargs.get("residual") is producer
        return (mine.kernel, mine.stride, mine.padding, mine.in_scale, mine.transposed) == (
            (1, 1), (1, 1), (0, 0), 1, False)  # fmt: skip
    if user.kwargs.get("tile_key") != key:
        return False
    if user.target is ops.sparse_attention:  # the queries only (keys/values are read in full)
        return user.args[2] is producer and producer not in user.args[3:5]
    if user.target is ops.tile_op:  # gathered operands, all at the user's tiles
        _, _, _, args, kwargs, flags = user.args
        leaves = pytree.tree_leaves((args, kwargs))
        marks = pytree.tree_leaves(flags)
        uses = [m for a, m in zip(leaves, marks, strict=True) if a is producer]
        return bool(uses) and all(uses) and producer not in pytree.tree_leaves(user.kwargs)
    return False
