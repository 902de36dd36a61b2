"""``group_dense_regions``: runs of dense ATen ops of the edit graph -> ``DenseRegion`` modules.

Runs after every rewrite (the ops left as plain ATen calls are exactly the dense ones). Reads of
slot buffers (cached values, folded norm parameters) and weights are first moved to the top of
the graph, so they do not cut runs apart; then every maximal run of at least ``MIN_OPS``
consecutive ATen ops (and stateless map functions of ``sigec.runtime.ops``, e.g. a dense
attention block's ``linear_channels``) becomes one region: its inputs are the values it reads
from outside, its outputs the values read after it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from sigec.runtime import ops
from sigec.runtime.dense import DenseRegion

MIN_OPS = 4  # shorter runs are not worth a compiled region


# the stateless functions of sigec.runtime.ops that run on whole maps (dense token regions)
MAP_FUNCTIONS = {
    ops.affine, ops.bias_through_affine, ops.layer_norm_channels, ops.linear_channels,
    ops.attention_channels, ops.map_to_layout, ops.layout_to_map, ops.channel_operand,
}  # fmt: skip


def _is_dense_op(node: torch.fx.Node, run: set) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return node.args[0] in run
    t = node.target
    if t in MAP_FUNCTIONS:
        return True
    return (
        isinstance(t, torch._ops.OpOverload)
        and t.namespace == "aten"
        and not t._schema.is_mutable
        and t is not torch.ops.aten._assert_tensor_metadata.default
    )  # fmt: skip


def _hoist_reads(gm: torch.fx.GraphModule, reads) -> None:
    """Move weight and slot-buffer reads right after the placeholders (they depend on nothing
    else), so that runs of dense ops are not cut by them."""
    nodes = list(gm.graph.nodes)
    anchor = [n for n in nodes if n.op == "placeholder"][-1]
    for node in nodes:
        read = node.op == "call_function" and node.target in reads
        if node.op == "get_attr" or (read and all(a.op == "placeholder"
                                                  for a in node.all_input_nodes)):  # fmt: skip
            anchor.append(node)
            anchor = node


def _runs(gm: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
    runs, cur = [], []
    for node in gm.graph.nodes:
        if _is_dense_op(node, set(cur)):
            cur.append(node)
            continue
        if cur:
            runs.append(cur)
        cur = []
    return [r for r in runs if sum(n.target is not operator.getitem for n in r) >= MIN_OPS]


def _extract(gm: torch.fx.GraphModule, run: list[torch.fx.Node], index: int, compile_on_cuda):
    members = set(run)
    inputs = []
    for n in run:
        for a in n.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    outputs = [n for n in run if any(u not in members for u in n.users)]
    graph = torch.fx.Graph()
    env = {a: graph.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    for a, p in env.items():
        p.meta.update(a.meta)
    for n in run:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    sub = torch.fx.GraphModule(torch.nn.Module(), graph)
    name = f"_sigec_dense_{index}"
    gm.add_submodule(name, DenseRegion(sub, compile_on_cuda))
    with gm.graph.inserting_before(run[0]):
        call = gm.graph.call_module(name, tuple(inputs))
        call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
        for i, o in enumerate(outputs):
            get = gm.graph.call_function(operator.getitem, (call, i))
            get.meta.update(o.meta)
            o.replace_all_uses_with(get)
    for n in reversed(run):
        gm.graph.erase_node(n)
    return len(run)


def group_dense_regions(gm: torch.fx.GraphModule, ctx):
    """Runs of dense ATen ops -> ``DenseRegion`` submodules (inductor-compiled on CUDA)."""
    from sigec.passes.base import PassResult
    from sigec.passes.folds import BUFFER_READS

    _hoist_reads(gm, BUFFER_READS)
    gm.graph.lint()
    runs = _runs(gm)
    compile_on_cuda = ctx.config.dense_regions == "inductor"
    grouped = sum(_extract(gm, run, i, compile_on_cuda) for i, run in enumerate(runs))
    ctx.bump("dense_regions", len(runs))
    ctx.bump("dense_region_ops", grouped)
    gm.graph.lint()
    gm.recompile()
    return PassResult("group_dense_regions", len(runs))
