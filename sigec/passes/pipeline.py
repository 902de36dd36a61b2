"""The pass pipeline: capture -> analyses -> transforms -> a runnable ``Program``.

Read ``PIPELINE`` top to bottom; the comment on each line says why it sits where it does.
To print the graph after each pass: ``logging.getLogger("sigec.passes").setLevel(logging.DEBUG)``.
"""

from __future__ import annotations

import logging

import torch
import torch.fx
import torch.utils._pytree as pytree

from sigec.config import SparseConfig
from sigec.errors import CaptureError
from sigec.passes import rewrite as rw
from sigec.passes.analysis import analyze_ops, analyze_roles, info, mask_rules
from sigec.passes.capture import Captured, capture
from sigec.passes.regions import group_dense_regions
from sigec.passes.tokens import tokens_to_maps
from sigec.runtime import ops
from sigec.runtime.program import MacEntry, Program

log = logging.getLogger("sigec.passes")

PIPELINE = (
    rw.add_runtime_inputs,  # state / tiles placeholders: every later pass may use them
    tokens_to_maps,  # token regions -> ops on maps; first, so every pass below sees only maps
    rw.fold_constants,  # weight-only subgraphs -> buffers, so they are not cached per slot
    rw.cache_statics,  # subgraphs of non-image inputs -> values cached at record
    rw.remove_identities,  # eval dropout, clones: before fusions, which look through nothing
    rw.eliminate_common_subexpressions,  # repeated pure ops (after identities made them equal)
    rw.fold_norms,  # norms -> affine(x, scale, shift); before rewrite_convs so prologues see them
    rw.fold_biases,  # affine(x + temb) -> affine'(x): after fold_norms, before prologue fusion
    rw.rewrite_convs,  # sparse convs -> sparse_conv2d (gather -> conv -> scatter)
    rw.fold_pads,  # conv(pad(x)) -> conv(x) with more padding; before prologue fusion looks at x
    rw.fuse_prologues,  # act(affine(x)) into the gather; before rewrite_tile_ops wraps them
    rw.fuse_concats,  # conv(cat(a, b)) gathers a and b; after fuse_prologues saw the affine
    rw.fuse_residuals,  # add(conv, r) into the scatter; before rewrite_tile_ops wraps the add
    rw.eliminate_dead_code,  # fused-away activations and norms, before they get working maps
    rw.rewrite_tile_ops,  # remaining sparse pointwise ops -> tile_op
    rw.rewrite_upsamples,  # integer nearest upsampling -> tile_upsample
    rw.eliminate_dead_code,  # drops the subgraphs the passes above made unused
    rw.hoist_invariants,  # arithmetic on cached values -> computed once at record
    group_dense_regions,  # last: what is still plain ATen runs dense; runs -> compiled regions
)


def classify_inputs(flat_inputs, names, config: SparseConfig) -> list[str]:
    """Per flat input: "spatial" (an image the edit changes), "tensor" or "const"."""
    kinds = []
    for value, name in zip(flat_inputs, names, strict=True):
        if not isinstance(value, torch.Tensor):
            kinds.append("const")
        elif config.spatial_inputs is not None:
            kinds.append("spatial" if name in config.spatial_inputs else "tensor")
        else:
            kinds.append("spatial" if value.dim() == 4 and value.is_floating_point() else "tensor")
    if "spatial" not in kinds:
        raise CaptureError(
            f"no image input among {names}: sigec needs at least one; by default every 4-D "
            "floating-point input is one, or name them with SparseConfig(spatial_inputs=...)"
        )
    return kinds


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def build_program(model, args, kwargs, config: SparseConfig, passes=PIPELINE) -> Program:
    """Capture ``model`` and run the pipeline; the result is what ``SparseEngine`` executes.

    ``passes`` may be a prefix of ``PIPELINE`` (tests run every prefix: each yields a runnable,
    correct edit graph).
    """
    return build_program_from(capture(model, args, kwargs), config, passes)


def build_program_from(cap: Captured, config: SparseConfig, passes=PIPELINE) -> Program:
    """``build_program`` on a model already captured (``sigec.load`` passes a saved one)."""
    kinds = classify_inputs(cap.flat_inputs, cap.input_names, config)
    record_gm = cap.gm
    analyze_roles(record_gm, kinds)
    analyze_ops(record_gm, config)
    rules = mask_rules(record_gm) if config.mask_policy == "exact" else ()
    macs = rw.count_macs(record_gm, config)

    edit_gm = _copy_graph_module(record_gm)
    ctx = rw.PassContext(config)
    for pass_fn in passes:
        result = pass_fn(edit_gm, ctx)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("after %s (%d changes):\n%s", result.name, result.changed, edit_gm.graph)

    conv_tiles = {
        n.meta["sigec_conv"]: n.kwargs["tile_key"]
        for n in edit_gm.graph.nodes
        if n.target is ops.sparse_conv2d
    }
    conv_tiles.update(ctx.op_tiles)  # token-wise linears and attention cores on tiles
    macs = tuple(
        MacEntry(
            e.node,
            e.op,
            e.resolution,
            e.dense,
            "sparse",
            e.per_pixel,
            conv_tiles[e.node],
            ctx.tile_macs.get(e.node, 0),
        )  # fmt: skip
        if e.node in conv_tiles and (e.per_pixel or e.node in ctx.tile_macs)
        else e
        for e in macs
    )
    nodes = list(record_gm.graph.nodes)
    node_res = {n.name: info(n).resolution for n in nodes if info(n).resolution is not None}
    layouts = {n.name: (info(n).layout, info(n).resolution) for n in nodes if info(n).layout}
    fallbacks = tuple(
        (n.name, str(n.target), info(n).reason)
        for n in nodes
        if info(n).role == "dependent" and info(n).mode == "dense" and info(n).reason
    )
    ctx.bump("dense_fallbacks", len(fallbacks))
    private = _private_maps(edit_gm, ctx)
    ctx.bump("private_maps", len(private))
    passed = pass_tiles(edit_gm, private, ctx) if config.pass_tiles else frozenset()
    ctx.bump("tiles_passed", len(passed))
    spatial_inputs = [v for v, k in zip(cap.flat_inputs, kinds, strict=True) if k == "spatial"]
    example_meta = [
        (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else v
        for v in cap.flat_inputs
    ]
    return Program(
        record_gm=record_gm,
        edit_gm=edit_gm,
        in_spec=cap.in_spec,
        out_spec=cap.out_spec,
        example_meta=example_meta,
        input_kinds=kinds,
        input_names=cap.input_names,
        maps={k: v for k, v in ctx.maps.items() if k not in passed},  # passed: no map at all
        statics=tuple(ctx.statics),
        norms=tuple(ctx.norms),
        tile_requests=dict(ctx.tile_requests),
        map_tiles=dict(ctx.map_tiles),
        mask_rules=rules,
        resolutions=tuple(  # the per-resolution masks the tile lists use (truncated policy)
            sorted(
                {r.mask for r in ctx.tile_requests.values() if isinstance(r.mask, tuple)},
                reverse=True,
            )  # fmt: skip
        ),
        node_resolutions=node_res,
        input_resolution=tuple(spatial_inputs[0].shape[-2:]),
        macs=macs,
        fallbacks=fallbacks,
        counters=dict(ctx.counters),
        layouts=layouts,
        prelude_gm=ctx.prelude,
        hoisted=tuple(ctx.hoisted),
        private_maps=private,
        policy=config.mask_policy,
    )


def _private_maps(edit_gm: torch.fx.GraphModule, ctx) -> frozenset[str]:
    """Maps that are only ever read at the tiles their producer writes in the same edit.

    Every user gathers the map through the very tile list that wrote it (token-wise ops and the
    queries of attention at one resolution share the pointwise tile list): values outside those
    tiles are never read, so the map needs no cache and no restore. Outputs, maps read in full
    (keys/values, dense ops, convs with halos or other tiles) and incremental norms' inputs keep
    theirs.
    """
    norm_inputs = {nf.input for nf in ctx.norms if nf.incremental}
    private = set()
    for node in edit_gm.graph.nodes:
        if node.target not in (ops.tile_op, ops.sparse_attention, ops.sparse_conv2d,
                               ops.tile_upsample):  # fmt: skip
            continue
        name, key = node.kwargs["name"], node.kwargs["tile_key"]
        if name not in ctx.maps or name in norm_inputs or not node.users:
            continue
        if all(_reads_only_tiles(u, node, key) for u in node.users):
            private.add(name)
    return frozenset(private)


def pass_tiles(edit_gm: torch.fx.GraphModule, private: frozenset, ctx) -> frozenset[str]:
    """Scatter -> gather fusion on one tile list: a private map whose producer is a ``tile_op`` or
    ``sparse_attention`` and whose readers all are too (they gather it at the same tiles) is never
    built. The producer returns its tile batch (``as_tiles``) and each reader takes it as its
    operand (flag ``ops.TILES``, or ``q_tiles``): per map one scatter and one gather per reader
    fewer, and no working map. Inside a transformer block: the LayerNorm outputs, queries and
    attention outputs. Returns the maps it removed."""
    passing = (ops.tile_op, ops.sparse_attention)
    passed = set()
    for node in edit_gm.graph.nodes:
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
    edit_gm.graph.lint()
    edit_gm.recompile()
    return frozenset(passed)


def _reads_only_tiles(user: torch.fx.Node, producer: torch.fx.Node, key: str) -> bool:
    if user.op != "call_function" or user.kwargs.get("tile_key") != key:
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
