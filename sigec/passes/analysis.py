"""Analysis passes: classify every node; never mutate the graph.

Each pass writes one frozen ``NodeInfo`` per node under ``node.meta["sigec"]`` (replacing the
previous one with ``dataclasses.replace``). Errors name the node.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx

from sigec.config import SparseConfig
from sigec.passes.layouts import VIEW_OPS, Layout, Prober, match_attention
from sigec.runtime.program import MaskRule

aten = torch.ops.aten

# --- op tables: which ATen ops sigec knows how to run on tiles --------------------

CONV_OPS = {aten.conv2d.default, aten.convolution.default, aten.conv_transpose2d.input}

# Activations the gather prologue can fuse: op -> (name, slope argument index or None).
ACTIVATION_OPS = {
    aten.silu.default: ("silu", None),
    aten.relu.default: ("relu", None),
    aten.leaky_relu.default: ("leaky_relu", 1),
    aten.gelu.default: ("gelu", None),
}

# Ops whose output pixel depends only on the same pixel of their inputs (run on tiles).
POINTWISE_OPS = {
    *ACTIVATION_OPS,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar,
    aten.neg.default, aten.sigmoid.default, aten.tanh.default, aten.exp.default,
    aten.pow.Tensor_Scalar, aten.clamp.default, aten.hardtanh.default, aten.abs.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.to.dtype, aten._to_copy.default, aten.dropout.default,
    aten.silu_.default, aten.relu_.default,
}  # fmt: skip

UPSAMPLE_OPS = {aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default}
PAD_OPS = {aten.pad.default, aten.constant_pad_nd.default}
NORM_OPS = {aten.group_norm.default, aten.batch_norm.default, aten.instance_norm.default}
SIDE_EFFECT_OPS = {aten._assert_tensor_metadata.default}
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
# VIEW_OPS (data movement) live in sigec.passes.layouts, which finds what layout a view's result
# has: a 4-D result is a map only if it holds the map in map layout ([B, heads, tokens, dim] never).
MATMUL_OPS = {aten.bmm.default, aten.baddbmm.default, aten.matmul.default}
ATTENTION_CORE_OPS = {aten.scaled_dot_product_attention.default, aten.bmm.default}
CHUNK_OPS = {aten.chunk.default}
LINEAR_OPS = {aten.linear.default, aten.addmm.default}


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


def info(node: torch.fx.Node) -> NodeInfo:
    return node.meta.get("sigec", NodeInfo())


def set_info(node: torch.fx.Node, **changes) -> None:
    node.meta["sigec"] = dataclasses.replace(info(node), **changes)


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


# dtypes the tile kernels hold maps in (float64 runs on the CPU reference only)
MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_map(val) -> bool:
    """A 4-D tensor of a floating dtype the tile kernels take; a bool mask (``h > 0``), an
    integer or a complex (``torch.fft``) 4-D tensor is not a map and runs dense."""
    return isinstance(val, torch.Tensor) and val.dim() == 4 and val.dtype in MAP_DTYPES


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Node arguments of ``node`` (flattened), in order, without duplicates."""
    return list(dict.fromkeys(node.all_input_nodes))


# --- pass 1: roles ------------------------------------------------------------


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
        val = _val(node)
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
            if m is not None and _val(m.k).shape[0] == _val(m.q).shape[0] == _val(m.v).shape[0]:
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
        src, out = _val(node.args[0]), _val(node)
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
            if a not in lays and not _per_channel(_val(a), lay) and not same_shape(a, lay.shape()):
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
    v = _val(a)
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


# --- pass 2: op classes and execution modes ----------------------------------------


def _conv_params(node: torch.fx.Node):
    """(weight node, bias, stride, padding, dilation, groups) of a conv node, or None if not 2-D."""
    a = list(node.args) + [None] * 9
    if node.target == aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = a[:9]
        if transposed:
            return None
    else:
        x, w, b = a[:3]
        stride = node.kwargs.get("stride", a[3] if a[3] is not None else [1, 1])
        padding = node.kwargs.get("padding", a[4] if a[4] is not None else [0, 0])
        dilation = node.kwargs.get("dilation", a[5] if a[5] is not None else [1, 1])
        groups = node.kwargs.get("groups", a[6] if a[6] is not None else 1)
    if isinstance(padding, str):
        return None  # "same"/"valid" string padding: not rewritten
    pair = lambda v: (int(v[0]), int(v[-1])) if isinstance(v, list | tuple) else (int(v), int(v))
    return w, b, pair(stride), pair(padding), pair(dilation), int(groups)


def conv_params(node: torch.fx.Node):
    return _conv_params(node)


def transposed_params(node: torch.fx.Node):
    """(weight, bias, stride, padding, output_padding, dilation, groups) of a 2-D transposed
    conv node, or None."""
    a = list(node.args) + [None] * 9
    pair = lambda v, d: (
        (d, d)
        if v is None
        # noqa: E731
        else ((int(v[0]), int(v[-1])) if isinstance(v, list | tuple) else (int(v), int(v)))
    )
    if node.target == aten.conv_transpose2d.input:
        _, w, b, stride, padding, out_pad, groups, dilation = a[:8]
    elif node.target == aten.convolution.default and a[6]:
        _, w, b, stride, padding, dilation, _, out_pad, groups = a[:9]
    else:
        return None
    if w is None or len(w.meta["val"].shape) != 4:
        return None
    return (w, b, pair(stride, 1), pair(padding, 0), pair(out_pad, 0), pair(dilation, 1),
            int(groups) if groups is not None else 1)  # fmt: skip


PAD_MODE_NAMES = {"constant": "zeros", "reflect": "reflect", "replicate": "replicate"}
_PAD_TARGETS = {aten.reflection_pad2d.default: "reflect",
                aten.replication_pad2d.default: "replicate"}  # fmt: skip


def pad_spec(node: torch.fx.Node) -> tuple[str, tuple[int, int, int, int]] | None:
    """``(mode, (left, right, top, bottom))`` of a non-negative 2-D pad that a conv can read
    through (mode "zeros" for a constant-zero pad, "reflect", "replicate"), else None."""
    if node.target in _PAD_TARGETS:
        mode, pads, value = _PAD_TARGETS[node.target], list(node.args[1]), 0
    elif node.target in PAD_OPS:
        pads = list(node.args[1])
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if node.target == aten.constant_pad_nd.default:
            mode, value = "constant", node.args[2] if len(node.args) > 2 else 0
        if mode not in PAD_MODE_NAMES or (mode == "constant" and value not in (None, 0, 0.0)):
            return None
        mode = PAD_MODE_NAMES[mode]
    else:
        return None
    if len(pads) > 4 or min(pads) < 0:
        return None
    pads = pads + [0] * (4 - len(pads))
    return mode, tuple(int(p) for p in pads)


def instance_stats(node: torch.fx.Node) -> bool:
    """An instance norm normalising by its input's statistics (not running ones)."""
    return node.target == aten.instance_norm.default and bool(node.args[5])


def upsample_factor(node: torch.fx.Node) -> int | None:
    """Integer nearest-upsampling factor (same on both axes), or None."""
    x = node.args[0]
    vin, vout = _val(x), _val(node)
    if vin is None or vout is None:
        return None
    (hi, wi), (ho, wo) = vin.shape[-2:], vout.shape[-2:]
    if ho % hi or wo % wi or ho // hi != wo // wi or ho <= hi:
        return None
    return ho // hi


def _operands_fit_tiles(node: torch.fx.Node, res) -> str:
    """'' when every tensor operand is a map at ``res`` or broadcasts per sample; else why not."""
    for a in node.all_input_nodes:
        v = _val(a)
        if not isinstance(v, torch.Tensor):
            continue
        if info(a).spatial:
            if tuple(v.shape[-2:]) != res:
                return f"operand {a.name} is at another resolution {tuple(v.shape[-2:])}"
        elif same_shape(a, _val(node).shape):  # read pixel for pixel, like a map
            continue
        elif v.dim() == 4 and v.dtype not in MAP_DTYPES and tuple(v.shape[-2:]) == res:
            return f"operand {a.name} is a {v.dtype} map (tiles hold floating maps)"
        elif (v.dim() >= 2 and tuple(v.shape[-2:]) != (1, 1)) or (v.dim() < 2 and v.numel() > 1):
            return f"operand {a.name} of shape {tuple(v.shape)} does not broadcast per pixel"
    return ""


def analyze_ops(gm: torch.fx.GraphModule, config: SparseConfig) -> None:
    """Op class and execution mode of every dependent node, with the reason for dense ones."""
    exact = config.mask_policy == "exact"
    for node in gm.graph.nodes:
        ni = info(node)
        if ni.role == "const":
            set_info(node, mode="const")
            continue
        if ni.role == "static":
            set_info(node, mode="cached")
            continue
        if ni.role == "input":
            set_info(node, op="input")
            continue
        if ni.role != "dependent" or node.op != "call_function":
            continue
        target = node.target
        if target in SIDE_EFFECT_OPS:
            set_info(node, op="side_effect", mode="dense")
            continue
        if "sigec_attention_part" in node.meta:  # replaced with its attention core
            set_info(node, op="attention_part", mode="fold")
            continue
        if not ni.spatial and not ni.layout:
            set_info(node, op="dense", mode="dense", reason=_non_map_reason(node))
            continue
        res = ni.resolution
        op, mode, reason = "dense", "dense", f"unsupported op {target}: runs dense"
        if "sigec_attention" in node.meta:  # the merged heads of a recognised attention core
            op, mode, reason = "attention", "sparse", ""
        elif is_view(node):  # the same map (in some layout): nothing to compute
            op, mode, reason = "view", "fold", ""
        elif ni.layout and target in CHUNK_OPS:
            op, mode, reason = "chunk", "fold", ""
        elif ni.layout and target in (aten.layer_norm.default, aten.linear.default,
                                      operator.getitem, *POINTWISE_OPS):  # fmt: skip
            op, mode, reason = "tokenwise", "sparse", ""
        elif ni.layout and target == aten.group_norm.default:  # on [B, C, H*W]: a map's norm
            op = "norm"
            if exact:
                reason = "group_norm statistics span the whole map (exact policy): runs dense"
            else:
                mode, reason = "fold", ""
        elif target in CONV_OPS:
            op = "conv"
            p = _conv_params(node) or transposed_params(node)
            if p is None:
                reason = "string-padded or non-2-D convolution: runs dense"
            elif info(p[0]).role in ("dependent", "input"):
                reason = "convolution weights depend on an image input: runs dense"
            elif not info(node.args[0]).spatial:
                reason = "convolution input is not a map: runs dense"
            else:
                mode, reason = "sparse", ""
        elif target in POINTWISE_OPS or target == aten.cat.default:
            op = "cat" if target == aten.cat.default else "pointwise"
            why = _operands_fit_tiles(node, res)
            if op == "cat" and (node.args[1] if len(node.args) > 1 else 0) not in (1, -3):
                why = "concatenation along a dimension other than channels"
            mode, reason = ("dense", f"{why}: runs dense") if why else ("sparse", "")
        elif target in NORM_OPS:
            op = "norm"
            if target == aten.batch_norm.default and node.args[5]:
                reason = "batch_norm in training mode: runs dense (call model.eval() first)"
            elif exact and (target == aten.group_norm.default or instance_stats(node)):
                reason = (f"{str(target).split('.')[1]} statistics span the whole map (exact "
                          "policy): runs dense")  # fmt: skip
            else:
                mode, reason = "fold", ""
        elif pad_spec(node) is not None:  # a conv reads through it (zeros, reflect, replicate)
            op, mode = "pad", "fold"
            reason = ""
        elif target in UPSAMPLE_OPS:
            f = upsample_factor(node)
            if f is not None and config.block_size["pointwise"] % f == 0:
                op, mode, reason = "upsample", "sparse", ""
            else:
                op = "resample"
                reason = "nearest resampling by a non-integer or downsampling factor: runs dense"
        if (
            mode != "dense"
            and op not in ("view", "chunk")
            and min(res) < config.sparse_min_resolution
        ):
            mode = "dense"
            reason = (
                f"resolution {res[0]}x{res[1]} is below sparse_min_resolution "
                f"{config.sparse_min_resolution}: runs dense"
            )
        set_info(node, op=op, mode=mode, reason=reason)


def _non_map_reason(node: torch.fx.Node) -> str:
    val = _val(node)
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


# --- pass 3: mask rules (exact policy) ----------------------------------------


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
            if not _operands_fit_tiles(node, ni.resolution):
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
