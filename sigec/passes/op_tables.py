"""The ATen ops sigec knows how to run on tiles, and how to read their parameters.

Op sets by class (convs, fusable activations, pointwise ops, norms, pads, upsampling, attention
parts) and readers of a node's parameters (``conv_params``, ``transposed_params``, ``pad_spec``,
``upsample_factor``). ``classify.py`` decides each node's op class and mode from them; the passes
read them to rewrite. Supporting a new op usually starts here.
"""

from __future__ import annotations

import torch
import torch.fx

aten = torch.ops.aten

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


# dtypes the tile kernels hold maps in (float64 runs on the CPU reference only)
MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def value_of(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


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
    vin, vout = value_of(x), value_of(node)
    if vin is None or vout is None:
        return None
    (hi, wi), (ho, wo) = vin.shape[-2:], vout.shape[-2:]
    if ho % hi or wo % wi or ho // hi != wo // wi or ho <= hi:
        return None
    return ho // hi
