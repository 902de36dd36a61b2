"""Op classes and execution modes: ``analyze_ops`` gives every image-dependent node an op class
(conv, pointwise, norm, attention, ...), a mode (sparse, fold, dense) and, for a dense one, the
reason.

The decision is a table: ``CLASSIFIERS`` lists ``(matches, classify)`` pairs, most specific
first; the first whose ``matches(node, info)`` holds classifies the node as
``classify(node, info, config) -> (op, mode, reason)``. A node no entry matches runs dense as an
unsupported op. Supporting a new op: its op set in ``op_tables.py``, an entry here, its rewrite in
the pass family's file.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from sigec.config import SparseConfig
from sigec.passes.analysis import NodeInfo, info, is_view, same_shape, set_info
from sigec.passes.op_tables import (
    ATTENTION_OPS,
    CHUNK_OPS,
    CONV_OPS,
    MAP_DTYPES,
    MATMUL_OPS,
    NORM_OPS,
    POINTWISE_OPS,
    SIDE_EFFECT_OPS,
    UPSAMPLE_OPS,
    conv_params,
    instance_stats,
    pad_spec,
    transposed_params,
    upsample_factor,
    value_of,
)

aten = torch.ops.aten

TOKENWISE_OPS = {aten.layer_norm.default, aten.linear.default, operator.getitem, *POINTWISE_OPS}
SPARSE, FOLD = "sparse", "fold"


def _exact(config: SparseConfig) -> bool:
    return config.mask_policy == "exact"


def _token_norm(node, ni, config):  # a group norm on [B, C, H*W]: a map's norm
    if _exact(config):
        return (
            "norm",
            "dense",
            "group_norm statistics span the whole map (exact policy): runs dense",
        )
    return "norm", FOLD, ""


def _conv(node, ni, config):
    p = conv_params(node) or transposed_params(node)
    if p is None:
        return "conv", "dense", "string-padded or non-2-D convolution: runs dense"
    if info(p[0]).role in ("dependent", "input"):
        return "conv", "dense", "convolution weights depend on an image input: runs dense"
    if not info(node.args[0]).spatial:
        return "conv", "dense", "convolution input is not a map: runs dense"
    return "conv", SPARSE, ""


def _pointwise(node, ni, config):
    op = "cat" if node.target == aten.cat.default else "pointwise"
    why = operands_fit_tiles(node, ni.resolution)
    if op == "cat" and (node.args[1] if len(node.args) > 1 else 0) not in (1, -3):
        why = "concatenation along a dimension other than channels"
    return (op, "dense", f"{why}: runs dense") if why else (op, SPARSE, "")


def _norm(node, ni, config):
    target = node.target
    if target == aten.batch_norm.default and node.args[5]:
        return "norm", "dense", "batch_norm in training mode: runs dense (call model.eval() first)"
    if _exact(config) and (target == aten.group_norm.default or instance_stats(node)):
        kind = str(target).split(".")[1]
        return "norm", "dense", f"{kind} statistics span the whole map (exact policy): runs dense"
    return "norm", FOLD, ""


def _upsample(node, ni, config):
    f = upsample_factor(node)
    if f is not None and config.pointwise_tile(ni.resolution, f) % f == 0:
        return "upsample", SPARSE, ""
    if f is not None:
        return "resample", "dense", (
            f"nearest upsampling by {f} does not divide the pointwise tile size "
            f"({config.pointwise_tile(ni.resolution, f)}): runs dense; set "
            "SparseConfig(block_size={'pointwise': ...}) to a multiple of the factor")  # fmt: skip
    return "resample", "dense", (
        "nearest resampling by a non-integer or downsampling factor: runs dense")  # fmt: skip


def _fixed(op: str, mode: str):
    return lambda node, ni, config: (op, mode, "")


CLASSIFIERS = (
    # the merged heads of a recognised attention core
    (lambda n, ni: "sigec_attention" in n.meta, _fixed("attention", SPARSE)),
    # the same map (in some layout): nothing to compute
    (lambda n, ni: is_view(n), _fixed("view", FOLD)),
    (lambda n, ni: bool(ni.layout) and n.target in CHUNK_OPS, _fixed("chunk", FOLD)),
    (lambda n, ni: bool(ni.layout) and n.target in TOKENWISE_OPS, _fixed("tokenwise", SPARSE)),
    (lambda n, ni: bool(ni.layout) and n.target == aten.group_norm.default, _token_norm),
    (lambda n, ni: n.target in CONV_OPS, _conv),
    (lambda n, ni: n.target in POINTWISE_OPS or n.target == aten.cat.default, _pointwise),
    (lambda n, ni: n.target in NORM_OPS, _norm),
    # a conv reads through it (zeros, reflect, replicate)
    (lambda n, ni: pad_spec(n) is not None, _fixed("pad", FOLD)),
    (lambda n, ni: n.target in UPSAMPLE_OPS, _upsample),
)


def classify(node: torch.fx.Node, ni: NodeInfo, config: SparseConfig) -> tuple[str, str, str]:
    """``(op, mode, reason)`` of a dependent map node (see the module docstring)."""
    for matches, decide in CLASSIFIERS:
        if matches(node, ni):
            op, mode, reason = decide(node, ni, config)
            break
    else:
        op, mode, reason = "dense", "dense", f"unsupported op {node.target}: runs dense"
    res = ni.resolution
    if mode != "dense" and op not in ("view", "chunk") and min(res) < config.sparse_min_resolution:
        mode = "dense"
        reason = (f"resolution {res[0]}x{res[1]} is below sparse_min_resolution "
                  f"{config.sparse_min_resolution}: runs dense")  # fmt: skip
    return op, mode, reason


def analyze_ops(gm: torch.fx.GraphModule, config: SparseConfig) -> None:
    """Op class and execution mode of every dependent node, with the reason for dense ones;
    with ``config.kv_projection == "dense"`` the key / value projections of recognised
    attentions run dense (``kv_projections``)."""
    for node in gm.graph.nodes:
        ni = info(node)
        if ni.role == "const":
            set_info(node, mode="const")
        elif ni.role == "static":
            set_info(node, mode="cached")
        elif ni.role == "input":
            set_info(node, op="input")
        elif ni.role != "dependent" or node.op != "call_function":
            continue
        elif node.target in SIDE_EFFECT_OPS:
            set_info(node, op="side_effect", mode="dense")
        elif "sigec_attention_part" in node.meta:  # replaced with its attention core
            set_info(node, op="attention_part", mode="fold")
        elif not ni.spatial and not ni.layout:
            set_info(node, op="dense", mode="dense", reason=_non_map_reason(node))
        else:
            op, mode, reason = classify(node, ni, config)
            set_info(node, op=op, mode=mode, reason=reason)
    if config.kv_projection == "dense":
        for node in kv_projections(gm):
            if info(node).mode == SPARSE:
                set_info(node, mode="dense", chosen=True, reason=(
                    "a key / value projection (kv_projection='dense'): runs on every token, "
                    "reading the cached normalised tokens"))  # fmt: skip


def kv_projections(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The image-dependent ``linear`` nodes whose results (through views) are the keys or
    values of a recognised attention core (``meta["sigec_attention"]``)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    found = []
    for node in gm.graph.nodes:
        core = node.meta.get("sigec_attention")
        if not core:
            continue
        for key in ("k", "v"):
            x = by_name.get(core[key])
            while x is not None and x.op == "call_function" and x.target != aten.linear.default:
                x = x.args[0] if is_view(x) and isinstance(x.args[0], torch.fx.Node) else None
            if x is not None and x.target == aten.linear.default and info(x).role == "dependent":
                if x not in found:
                    found.append(x)
    return found


def operands_fit_tiles(node: torch.fx.Node, res) -> str:
    """'' when every tensor operand is a map at ``res`` or broadcasts per sample; else why not."""
    for a in node.all_input_nodes:
        v = value_of(a)
        if not isinstance(v, torch.Tensor):
            continue
        if info(a).spatial:
            if tuple(v.shape[-2:]) != res:
                return f"operand {a.name} is at another resolution {tuple(v.shape[-2:])}"
        elif same_shape(a, value_of(node).shape):  # read pixel for pixel, like a map
            continue
        elif v.dim() == 4 and v.dtype not in MAP_DTYPES and tuple(v.shape[-2:]) == res:
            return f"operand {a.name} is a {v.dtype} map (tiles hold floating maps)"
        elif (v.dim() >= 2 and tuple(v.shape[-2:]) != (1, 1)) or (v.dim() < 2 and v.numel() > 1):
            return f"operand {a.name} of shape {tuple(v.shape)} does not broadcast per pixel"
    return ""


def _non_map_reason(node: torch.fx.Node) -> str:
    val = value_of(node)
    if isinstance(val, torch.Tensor) and val.dim() == 4 and val.dtype not in MAP_DTYPES:
        return (
            f"{node.target} gives a 4-D {val.dtype} tensor: tiles hold floating maps "
            f"({', '.join(str(d).removeprefix('torch.') for d in MAP_DTYPES)}): runs dense"
        )
    if node.target in ATTENTION_OPS or node.target in MATMUL_OPS:
        return (
            "attention / matmul over tokens outside a recognised attention core (with a mask, "
            "causal, or a non-standard head split), or on tensors that are not maps: runs dense"
        )
    return f"{node.target} on a non-map tensor derived from an image: runs dense"
