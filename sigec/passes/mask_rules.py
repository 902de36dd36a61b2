"""The exact policy's mask rules: how each node's changed region follows from its inputs'."""

from __future__ import annotations

import torch.fx

from sigec.passes.analysis import info
from sigec.passes.classify import operands_fit_tiles
from sigec.passes.op_tables import conv_params, pad_spec, transposed_params, upsample_factor
from sigec.runtime.program import MaskRule


def mask_rules(gm: torch.fx.GraphModule):
    """How each dependent node's changed region follows from its inputs', in graph order.

    Rules follow op semantics, not the execution mode: a conv that runs dense still changes only
    its inputs' receptive field. Unknown ops and normalisations with recomputed statistics are
    global ("full").
    """
    rules = []
    for node in gm.graph.nodes:
        ni = info(node)
        if ni.role == "input":
            rules.append(MaskRule(node.name, "input"))
            continue
        if ni.role != "dependent" or node.op != "call_function":
            continue
        srcs = tuple(a.name for a in node.all_input_nodes if info(a).role in ("input", "dependent"))
        map_srcs = tuple(
            a.name for a in node.all_input_nodes
            if (info(a).spatial or info(a).layout) and info(a).role != "param"
        )  # fmt: skip
        region = ni.spatial or bool(ni.layout)
        rule = MaskRule(node.name, "full", srcs)
        if ni.spatial and ni.op == "conv" and transposed_params(node) is not None:
            _, _, stride, padding, out_pad, dilation, _ = transposed_params(node)
            kh, kw = node.args[1].meta["val"].shape[-2:]
            if info(node.args[0]).spatial:
                rule = MaskRule(node.name, "conv_transpose", (node.args[0].name,),
                                (int(kh), int(kw)), stride, padding, dilation=dilation,
                                output_padding=out_pad)  # fmt: skip
        elif ni.spatial and ni.op == "conv" and conv_params(node) is not None:
            _, _, stride, padding, dilation, _ = conv_params(node)
            kh, kw = node.args[1].meta["val"].shape[-2:]
            kernel = (dilation[0] * (int(kh) - 1) + 1, dilation[1] * (int(kw) - 1) + 1)
            if info(node.args[0]).spatial:
                rule = MaskRule(node.name, "conv", (node.args[0].name,), kernel, stride, padding)
        elif ni.spatial and ni.op in ("pointwise", "cat") and len(map_srcs) == len(srcs):
            if not operands_fit_tiles(node, ni.resolution):
                rule = MaskRule(node.name, "union", map_srcs)
        elif region and ni.op in ("view", "tokenwise", "chunk") and len(map_srcs) == len(srcs):
            rule = MaskRule(node.name, "union", map_srcs)
        elif region and ni.op == "norm" and ni.mode == "fold":
            rule = MaskRule(node.name, "union", map_srcs)
        elif ni.spatial and ni.op == "upsample":
            rule = MaskRule(node.name, "upsample", map_srcs, factor=upsample_factor(node))
        elif ni.spatial and ni.op == "resample" and len(map_srcs) == 1:
            rule = MaskRule(node.name, "resample", map_srcs, size=ni.resolution)
        elif ni.spatial and ni.op == "pad" and len(map_srcs) == 1:
            mode, pads = pad_spec(node)
            rule = MaskRule(node.name, "pad", map_srcs, pads=pads, pad_mode=mode)
        rules.append(rule)
    return tuple(rules)
