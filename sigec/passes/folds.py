"""Folding passes: what can be computed once moves out of the edit.

Constants and weight-only subgraphs become buffers, subgraphs of non-image inputs cached values,
identities and repeated pure ops go, norms fold into ``affine(x, scale, shift)`` with their
statistics cached (and biases such as the time embedding into the shift), and arithmetic on
cached values is hoisted to record time.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from sigec.passes.analysis import info, is_identity, set_info
from sigec.passes.base import (
    RUNTIME_MAP_OPS,
    PassContext,
    PassResult,
    dead_code,
    finish,
    node_name,
    orig_name,
    replace_with,
)
from sigec.passes.op_tables import instance_stats
from sigec.runtime import ops
from sigec.runtime.program import (
    NormFold,
)

aten = torch.ops.aten


def _used_by_edit(node: torch.fx.Node) -> bool:
    return any(info(u).role in ("dependent", "output") for u in node.users)


def fold_constants(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Nodes computed from weights only (e.g. spectral norm) become compile-time buffers."""
    env: dict[torch.fx.Node, object] = {}
    interp = torch.fx.Interpreter(gm)
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            env[node] = interp.fetch_attr(node.target)
        if info(node).role != "const" or node.op != "call_function":
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
        with torch.no_grad():
            env[node] = node.target(*args, **kwargs)
        if _used_by_edit(node) and isinstance(env[node], torch.Tensor):
            attr = f"_sigec_const_{node.name}"
            gm.register_buffer(attr, env[node].detach().clone())
            ctx.consts[attr] = getattr(gm, attr)
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(attr)
            new.meta.update(node.meta)
            set_info(new, role="param", mode="")
            node.replace_all_uses_with(new, delete_user_cb=lambda u: info(u).role != "const")
            changed += 1
    return finish(gm, "fold_constants", changed, ctx, "consts_folded")


def cache_statics(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Nodes computed from non-image inputs (timestep embeddings...) are read from the record."""
    changed = 0
    for node in list(gm.graph.nodes):
        if info(node).role != "static" or not _used_by_edit(node):
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(ops.cached, (ctx.state, node.name))
        new.meta.update(node.meta)
        set_info(new, role="static", mode="cached")
        node.replace_all_uses_with(new, delete_user_cb=lambda u: info(u).role != "static")
        ctx.statics.append(node.name)
        changed += 1
    return finish(gm, "cache_statics", changed, ctx, "statics_cached")


def remove_identities(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Eval-mode dropout, clones and same-dtype casts on image paths: uses see their input.

    Export's metadata assertions go too: the record graph keeps them, and they would keep the
    static subgraphs they check alive in the edit graph.
    """
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            continue
        if node.op == "call_function" and info(node).role == "dependent" and is_identity(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed += 1
    return finish(gm, "remove_identities", changed, ctx, "identities_removed")


def _cse_key(node: torch.fx.Node):
    """A hashable key of a pure ATen call (target and arguments, nodes by identity), or None."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
        return None

    def freeze(v):
        if isinstance(v, list | tuple):
            return (type(v).__name__, tuple(freeze(x) for x in v))
        if isinstance(v, dict):
            return ("dict", tuple(sorted((k, freeze(x)) for k, x in v.items())))
        if isinstance(v, torch.fx.Node | int | float | bool | str | type(None)):
            return (type(v).__name__, v)
        if isinstance(v, torch.dtype | torch.device | torch.memory_format | torch.layout):
            return (type(v).__name__, str(v))
        raise TypeError  # anything else: not merged

    try:
        return t, freeze(node.args), freeze(node.kwargs)
    except TypeError:
        return None


def eliminate_common_subexpressions(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pure ATen calls repeated with the same arguments -> the first one (e.g. every SPADE layer
    of GauGAN resizes the same label map to its own resolution: one resize per resolution)."""
    seen: dict = {}
    changed = 0
    for node in list(gm.graph.nodes):
        key = _cse_key(node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            changed += 1
    return finish(gm, "eliminate_common_subexpressions", changed, ctx, "subexpressions_merged")


def fold_norms(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """GroupNorm and InstanceNorm (cached statistics), eval BatchNorm -> ``affine(x, scale,
    shift)``."""
    changed = 0
    for node in list(gm.graph.nodes):
        if info(node).mode != "fold" or info(node).op != "norm":
            continue
        a = list(node.args) + [None] * 9
        if node.target == aten.group_norm.default:
            x, groups, w, b = a[0], a[1], a[2], a[3]
            eps = a[4] if a[4] is not None else 1e-5
            spec = NormFold(orig_name(node), "group_norm", orig_name(x), node_name(w), node_name(b),
                            float(eps), num_groups=int(groups))  # fmt: skip
        elif instance_stats(node):  # a group norm with one group per channel
            x, w, b, eps = a[0], a[1], a[2], a[7]
            spec = NormFold(orig_name(node), "group_norm", orig_name(x), node_name(w), node_name(b),
                            float(eps), num_groups=int(x.meta["val"].shape[1]))  # fmt: skip
        else:  # batch_norm / instance_norm on running statistics:
            # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
            x, w, b, rm, rv, eps = a[0], a[1], a[2], a[3], a[4], a[7]
            spec = NormFold(orig_name(node), "batch_norm", orig_name(x), node_name(w),
                            node_name(b), float(eps), running_mean=node_name(rm),
                            running_var=node_name(rv))  # fmt: skip
        incremental = spec.kind == "group_norm" and ctx.config.norm_stats == "incremental"
        spec = dataclasses.replace(spec, incremental=incremental)
        ctx.norms.append(spec)
        with gm.graph.inserting_before(node):
            if incremental:  # statistics of the map being computed, updated from its tiles
                stats = gm.graph.call_function(
                    ops.norm_incremental, (ctx.state, ctx.tiles, x, w, b),
                    {"name": spec.name, "groups": spec.num_groups, "eps": spec.eps},
                )  # fmt: skip
                stats.meta["sigec"] = info(node)
                set_info(stats, op="norm_stats", mode="", spatial=False, resolution=None)
                scale = gm.graph.call_function(operator.getitem, (stats, 0))
                shift = gm.graph.call_function(operator.getitem, (stats, 1))
            else:
                scale = gm.graph.call_function(ops.norm_scale, (ctx.state, spec.name))
                shift = gm.graph.call_function(ops.norm_shift, (ctx.state, spec.name))
        for n in (scale, shift):
            n.meta["sigec"] = info(n)
            set_info(n, role="static", mode="cached")
        name = orig_name(node)
        new = replace_with(gm, node, ops.affine, (x, scale, shift))
        new.meta["sigec_name"] = name
        set_info(new, op="affine", mode="sparse")
        changed += 1
    return finish(gm, "fold_norms", changed, ctx, "norms_folded")


def fold_biases(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """``affine(x + b)`` with a per-channel ``b`` (a timestep embedding) -> ``affine'(x)``.

    With cached statistics the affine is ``x * scale + shift``, so the bias moves into the shift:
    ``shift' = shift + scale * b``; the sum ``x + b`` is then never materialised. Incremental
    statistics need that sum's map, so they keep it.
    """
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.affine:
            continue
        add, scale, shift = node.args
        if shift.target is not ops.norm_shift or add.target != aten.add.Tensor:
            continue
        if len(add.users) != 1 or len(add.args) != 2 or add.kwargs:
            continue
        x, b = add.args
        bv = b.meta.get("val") if isinstance(b, torch.fx.Node) else None
        if not (isinstance(x, torch.fx.Node) and info(x).spatial) or bv is None:
            continue
        if info(b).spatial or bv.dim() != 4 or tuple(bv.shape[2:]) != (1, 1):
            continue
        with gm.graph.inserting_before(node):
            new_shift = gm.graph.call_function(ops.bias_through_affine, (scale, shift, b))
        new_shift.meta["sigec"] = info(shift)
        node.args = (x, scale, new_shift)
        gm.graph.erase_node(add)
        changed += 1
    return finish(gm, "fold_biases", changed, ctx, "biases_folded")


BUFFER_READS = {ops.cached, ops.norm_scale, ops.norm_shift}


def hoist_invariants(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Arithmetic on values no edit changes -> computed once at record, read as a cached value.

    A node is edit-invariant when it reads a slot buffer that edits never change (cached statics,
    folded norm scale/shift), a weight, or only such nodes (e.g. ``bias_through_affine`` of a
    norm's shift and the timestep embedding). The outermost computed ones are moved into
    ``ctx.prelude``, a graph of the slot state that ``record`` runs; the edit reads their values
    (``cached``), so each edit launches none of their kernels.
    """
    inv: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.target in BUFFER_READS):
            inv.add(node)
        elif (
            node.op == "call_function" and node.target not in RUNTIME_MAP_OPS
            and node.target is not ops.norm_incremental and node.all_input_nodes
            and all(a in inv for a in node.all_input_nodes)
        ):  # fmt: skip
            inv.add(node)
    computed = {n for n in inv if n.op == "call_function" and n.target not in BUFFER_READS}
    roots = [n for n in gm.graph.nodes
             if n in computed and any(u not in inv for u in n.users)
             and isinstance(n.meta.get("val", torch.empty(0)), torch.Tensor)]  # fmt: skip
    if not roots:
        return finish(gm, "hoist_invariants", 0)
    graph = torch.fx.Graph()
    state = graph.placeholder("sigec_state")
    env: dict[torch.fx.Node, torch.fx.Node] = {ctx.state: state}
    for node in gm.graph.nodes:  # every invariant node a root needs, in graph order
        if node in inv and node not in env:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[r] for r in roots))
    prelude = torch.fx.GraphModule(gm, graph)
    prelude.graph.eliminate_dead_code()
    prelude.recompile()
    for root in roots:
        name = f"hoisted_{root.name}"
        with gm.graph.inserting_before(root):
            new = gm.graph.call_function(ops.cached, (ctx.state, name))
        new.meta.update(root.meta)
        root.replace_all_uses_with(new)
        ctx.hoisted.append(name)
    ctx.prelude = prelude
    dead_code(gm)
    ctx.bump("invariants_hoisted", len(roots))
    return finish(gm, "hoist_invariants", len(roots))
