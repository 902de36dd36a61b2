"""Analysis: the role, layout and resolution of every node; never mutates the graph.

``analyze_roles`` writes one frozen ``NodeInfo`` per node under ``node.meta["sigec"]`` (later
analyses replace it with ``dataclasses.replace`` through ``set_info``): which nodes derive from
an image (maps, in map or token layout), which are weights, constants or statics. The op class
and execution mode come next (``classify.py``), the exact policy's mask rules after
(``mask_rules.py``). Errors name the node.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx

from sigec.passes.layouts import VIEW_OPS, Layout, Prober, match_attention
from sigec.passes.op_tables import (
    ATTENTION_CORE_OPS,
    CHUNK_OPS,
    MAP_DTYPES,
    POINTWISE_OPS,
    value_of,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class NodeInfo:
    """What sigec knows about one node.

    Attributes:
        role: "input" (an image input), "other_input" (timestep, embedding, flags), "param"
            (weights and buffers), "const" (computed from params only: folded at compile),
            "static" (computed from non-image inputs: cached at record), "dependent"
            (depends on an image input: recomputed by the edit).
        spatial: a dependent 4-D map ``[N, C, H, W]``.
        resolution: ``(H, W)`` of a spatial node.
        op: the op class sigec sees: "conv", "pointwise", "cat", "norm", "upsample", "resample",
            "pad", "side_effect", "dense", "input" or "".
        mode: how the edit runs it: "sparse" (on tiles), "fold" (a normalisation folded into
            scale/shift, or a zero / reflection / replicate pad folded into the following
            convs' reads; a pad that cannot be folded runs dense), "dense" (on full maps),
            "cached", "const", or "".
        reason: why a dependent node runs dense.
        chosen: it runs dense because the config chose so (``kv_projection="dense"``), not as a
            fallback: ``stats()["dense_fallbacks"]`` leaves it out.
        layout: for a token-region tensor (a map in another layout, see ``sigec.passes.layouts``):
            "tokens" ``[B, H*W, C]``, "flat" ``[B, C, H*W]`` or "nhwc"; ``resolution`` is then the
            map's. "" for maps (``spatial``) and everything else.
    """

    role: str = ""
    spatial: bool = False
    resolution: tuple[int, int] | None = None
    op: str = ""
    mode: str = ""
    reason: str = ""
    layout: str = ""
    chosen: bool = False


def info(node: torch.fx.Node) -> NodeInfo:
    return node.meta.get("sigec", NodeInfo())


def set_info(node: torch.fx.Node, **changes) -> None:
    node.meta["sigec"] = dataclasses.replace(info(node), **changes)


def _is_map(val) -> bool:
    """A 4-D tensor of a floating dtype the tile kernels take; a bool mask (``h > 0``), an
    integer or a complex (``torch.fft``) 4-D tensor is not a map and runs dense."""
    return isinstance(val, torch.Tensor) and val.dim() == 4 and val.dtype in MAP_DTYPES


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Node arguments of ``node`` (flattened), in order, without duplicates."""
    return list(dict.fromkeys(node.all_input_nodes))


def analyze_roles(gm: torch.fx.GraphModule, input_kinds: list[str]) -> None:
    """Role of every node (image input, other input, param, const, static or dependent), and
    which dependent tensors are maps: in map layout (``spatial``) or in a token layout
    (``layout``). Recognised attention cores are noted on their output node
    (``meta["sigec_attention"]``) and parts (``meta["sigec_attention_part"]``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds = dict(zip(placeholders, input_kinds, strict=True))
    prober = Prober()
    lays: dict[torch.fx.Node, Layout] = {}
    attention_outs: dict[torch.fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            role = "input" if kinds[node] == "spatial" else "other_input"
        elif node.op == "get_attr":
            role = "param"
        elif node.op == "output":
            role = "output"
        else:
            roles = {info(a).role for a in node.all_input_nodes}
            if roles & {"input", "dependent"}:
                role = "dependent"
            elif roles & {"other_input", "static"}:
                role = "static"
            else:
                role = "const"
        val = value_of(node)
        lay = None
        if role == "input" and _is_map(val):
            lay = Layout("map", int(val.shape[0]), int(val.shape[1]), _res(val))
        elif role == "dependent" and node.op == "call_function":
            lay = _result_layout(node, val, lays, attention_outs, prober)
        if lay is not None:
            lays[node] = lay
        set_info(
            node, role=role, spatial=lay is not None and lay.kind == "map",
            resolution=lay.res if lay is not None else None,
            layout=lay.kind if lay is not None and lay.kind != "map" else "",
        )  # fmt: skip
        if role == "dependent" and node.target in ATTENTION_CORE_OPS:
            m = match_attention(node, is_view, is_identity, _source_test(lays))
            batch = {value_of(t).shape[0] for t in (m.q, m.k, m.v)} if m is not None else ()
            if m is not None and len(batch) == 1:
                attention_outs[m.out] = m
                m.out.meta["sigec_attention"] = {
                    "q": m.q.name, "k": m.k.name, "v": m.v.name, "heads": m.heads,
                    "scale": m.scale, "parts": tuple(p.name for p in m.parts),
                }  # fmt: skip
                for p in m.parts:
                    p.meta["sigec_attention_part"] = m.out.name


def _res(val) -> tuple[int, int]:
    return int(val.shape[-2]), int(val.shape[-1])


def _source_test(lays):
    def is_source(n, role):
        if n in lays and lays[n].kind == "tokens":
            return True
        return role == "kv" and info(n).role in ("static", "const", "param")

    return is_source


def is_view(node: torch.fx.Node) -> bool:
    """A data-movement op or an identity: its result holds its first operand's values."""
    return node.target in VIEW_OPS or is_identity(node)


def is_identity(node: torch.fx.Node) -> bool:
    """Eval dropout, clones, detaches, same-dtype casts, multiply/divide by 1."""
    t = node.target
    if node.op != "call_function":
        return False
    if t in (aten.alias.default, aten.clone.default, aten.contiguous.default,
             aten.detach.default):  # fmt: skip
        return True
    if t in (aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar):
        other = node.args[1] if len(node.args) > 1 else None
        return isinstance(other, int | float) and other == 1  # e.g. output_scale_factor=1.0
    if t == aten.dropout.default:  # dropout(x, p, train)
        return not (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False))
    if t in (aten.to.dtype, aten._to_copy.default):
        src, out = value_of(node.args[0]), value_of(node)
        return (
            src is not None and out is not None and src.dtype == out.dtype
            and src.device == out.device and not node.kwargs.get("memory_format")
        )  # fmt: skip
    return False


def _result_layout(node, val, lays, attention_outs, prober) -> Layout | None:
    """The layout of a dependent node's result, or None if it is not a map in any layout."""
    if node in attention_outs:
        q = lays[attention_outs[node].q]
        return Layout("tokens", q.batch, int(val.shape[-1]), q.res)
    ins = [a for a in node.all_input_nodes if a in lays]
    if not ins:
        return None
    if is_view(node):
        src = node.args[0]
        if src not in lays or not isinstance(val, torch.Tensor):
            return None
        return prober.view_layout(node, lays[src], identity=is_identity(node))
    if any(lays[a].kind == "map" for a in ins):  # an op on maps: a 4-D result is a map
        if _is_map(val):
            return Layout("map", int(val.shape[0]), int(val.shape[1]), _res(val))
        return None
    lay = lays[ins[0]]
    if any((lays[a].kind, lays[a].res, lays[a].batch) != (lay.kind, lay.res, lay.batch)
           for a in ins):  # fmt: skip
        return None
    return _token_op_layout(node, val, lay, lays)


def _token_op_layout(node, val, lay: Layout, lays) -> Layout | None:
    """Layout of a per-token op's result on operands in token layout ``lay`` (None: not one)."""
    t = node.target
    cdim = lay.channel_dim
    x = node.args[0] if node.args else None
    if t is operator.getitem:  # a part of a chunk along the channels
        if x.target not in CHUNK_OPS or not isinstance(val, torch.Tensor):
            return None
        out = lay.with_channels(int(val.shape[cdim]))
    elif t in CHUNK_OPS:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim % len(lay.shape()) != cdim or x not in lays:
            return None
        return lay
    elif t == aten.layer_norm.default:
        shape = list(node.args[1])
        if lay.kind not in ("tokens", "nhwc") or shape != [lay.channels] or x not in lays:
            return None
        out = lay
    elif t == aten.linear.default:
        if (
            lay.kind not in ("tokens", "nhwc")
            or x not in lays
            or any(a in lays for a in node.all_input_nodes[1:])
        ):
            return None
        out = lay.with_channels(int(val.shape[-1]))
    elif t == aten.group_norm.default:
        if lay.kind != "flat" or x not in lays or any(a in lays for a in node.all_input_nodes[1:]):
            return None
        out = lay
    elif t in POINTWISE_OPS:
        for a in node.all_input_nodes:
            fits = _per_channel(value_of(a), lay) or same_shape(a, lay.shape())
            if a not in lays and not fits:
                return None
        out = lay.with_channels(int(val.shape[cdim])) if isinstance(val, torch.Tensor) else None
    else:
        return None
    if out is None or not isinstance(val, torch.Tensor) or tuple(val.shape) != out.shape():
        return None
    return out


def same_shape(a: torch.fx.Node, shape) -> bool:
    """A tensor (no map: computed densely) of exactly the shape of the map it meets in a
    pointwise op, in a dtype tiles hold: it is read pixel for pixel like a map (a VQ quantizer's
    codes, reshaped to the latent's shape). Its changed region is unknown: the exact policy's
    mask rule for the op is "full"."""
    v = value_of(a)
    return (isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape)
            and v.dtype in MAP_DTYPES)  # fmt: skip


def _per_channel(v, lay: Layout) -> bool:
    """Whether tensor ``v`` broadcasts against ``lay``'s shape per channel (or is a scalar)."""
    if not isinstance(v, torch.Tensor):
        return True
    if v.numel() == 1:
        return True
    shape = lay.shape()
    if v.dim() > len(shape):
        return False
    cdim = lay.channel_dim - len(shape)  # negative index of the channel dim
    if -cdim > v.dim():
        return False
    dims = list(v.shape)
    c = dims[cdim]
    dims[cdim] = 1
    return c in (1, lay.channels) and all(d == 1 for d in dims)
