"""The pass pipeline: capture -> analyses -> transforms -> a runnable ``Program``.

Read ``PIPELINE`` top to bottom; the comment on each line says why it sits where it does.
To print the graph after each pass: ``logging.getLogger("sigec.passes").setLevel(logging.DEBUG)``.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from sigec.config import SparseConfig
from sigec.errors import CaptureError
from sigec.passes import base, convs, folds, tile_ops
from sigec.passes.analysis import analyze_roles, info
from sigec.passes.capture import Captured, capture
from sigec.passes.classify import analyze_ops
from sigec.passes.macs import count_macs, macs_on_tiles
from sigec.passes.mask_rules import mask_rules
from sigec.passes.regions import group_dense_regions
from sigec.passes.tokens import tokens_to_maps
from sigec.runtime.program import Program

log = logging.getLogger("sigec.passes")

PIPELINE = (
    base.add_runtime_inputs,  # state / tiles placeholders: every later pass may use them
    tokens_to_maps,  # token regions -> ops on maps; first, so every pass below sees only maps
    folds.fold_constants,  # weight-only subgraphs -> buffers, so they are not cached per slot
    folds.cache_statics,  # subgraphs of non-image inputs -> values cached at record
    folds.remove_identities,  # eval dropout, clones: before fusions, which look through nothing
    folds.eliminate_common_subexpressions,  # repeated pure ops (after identities made them equal)
    folds.fold_norms,  # norms -> affine(x, scale, shift); before rewrite_convs: prologues see them
    folds.fold_biases,  # affine(x + temb) -> affine'(x): after fold_norms, before prologue fusion
    convs.rewrite_convs,  # sparse convs -> sparse_conv2d (gather -> conv -> scatter)
    convs.fold_pads,  # conv(pad(x)) -> conv(x) with more padding; before prologue fusion looks at x
    convs.fold_upsamples,  # conv(upsample(x)) reads x through y // f: no upsampled map at all
    convs.fuse_prologues,  # act(affine(x)) into the gather; before rewrite_tile_ops wraps them
    convs.fuse_concats,  # conv(cat(a, b)) gathers a and b; after fuse_prologues saw the affine
    convs.fuse_residuals,  # add(conv, r) into the scatter; before rewrite_tile_ops wraps the add
    base.eliminate_dead_code,  # fused-away activations and norms, before they get working maps
    tile_ops.rewrite_tile_ops,  # remaining sparse pointwise ops -> tile_op
    tile_ops.rewrite_upsamples,  # integer nearest upsampling -> tile_upsample
    base.eliminate_dead_code,  # drops the subgraphs the passes above made unused
    folds.hoist_invariants,  # arithmetic on cached values -> computed once at record
    group_dense_regions,  # what is still plain ATen runs dense; runs -> compiled regions
    tile_ops.mark_private_maps,  # maps read only at their producer's tiles: no cache, no restore
    tile_ops.pass_tiles,  # last: private maps between tile ops -> tile batches, no map at all
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
    macs = count_macs(record_gm, config)

    edit_gm = _copy_graph_module(record_gm)
    ctx = base.PassContext(config)
    for pass_fn in passes:
        result = pass_fn(edit_gm, ctx)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("after %s (%d changes):\n%s", result.name, result.changed, edit_gm.graph)

    macs = macs_on_tiles(macs, edit_gm, ctx)
    nodes = list(record_gm.graph.nodes)
    node_res = {n.name: info(n).resolution for n in nodes if info(n).resolution is not None}
    layouts = {n.name: (info(n).layout, info(n).resolution) for n in nodes if info(n).layout}
    dense = [n for n in nodes if info(n).role == "dependent" and info(n).mode == "dense"]
    fallbacks = tuple((n.name, str(n.target), info(n).reason) for n in dense
                      if info(n).reason and not info(n).chosen)  # fmt: skip
    ctx.bump("dense_fallbacks", len(fallbacks))
    ctx.bump("kv_projections_dense", sum(info(n).chosen for n in dense))
    private, passed = ctx.private_maps, ctx.passed_maps
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
