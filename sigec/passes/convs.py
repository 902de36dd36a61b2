"""Convolution passes: sparse convs become gather -> conv -> scatter (``ops.sparse_conv2d``),
with pads and nearest upsamplings folded into the reads, the norm/activation prologue into the
gather, concatenated inputs gathered part by part and a residual add into the scatter.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from sigec.passes.analysis import info
from sigec.passes.base import (
    PassContext,
    PassResult,
    finish,
    orig_name,
    replace_with,
    sparse_nodes,
)
from sigec.passes.op_tables import (
    ACTIVATION_OPS,
    conv_params,
    pad_spec,
    transposed_params,
    upsample_factor,
)
from sigec.runtime import ops
from sigec.runtime.program import (
    transposed_crop,
    transposed_window,
)

aten = torch.ops.aten


def rewrite_convs(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Every sparse conv -> ``sparse_conv2d`` (gather -> conv on tiles -> scatter)."""
    changed = 0
    for node in sparse_nodes(gm, "conv"):
        ni = info(node)
        if transposed_params(node) is not None:
            _rewrite_transposed(gm, node, ctx)
            changed += 1
            continue
        w, b, stride, padding, dilation, groups = conv_params(node)
        kh, kw = node.args[1].meta["val"].shape[-2:]
        kernel = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
        tile = ctx.config.tile_for(int(kh), int(kw), ni.resolution)
        key = ctx.request(orig_name(node), ni.resolution, kernel, stride, padding, tile)
        name = orig_name(node)
        new = replace_with(gm, node, ops.sparse_conv2d,
                            (ctx.state, ctx.tiles, node.args[0], w, b, stride, dilation, groups),
                            {"name": name, "tile_key": key,
                             "kernel": ctx.config.conv_kernel})  # fmt: skip
        new.meta["sigec_conv"] = name  # the captured conv it computes (MAC counts)
        ctx.add_map(name, new)
        changed += 1
    return finish(gm, "rewrite_convs", changed, ctx, "convs_sparse")


def _rewrite_transposed(gm: torch.fx.GraphModule, node: torch.fx.Node, ctx: PassContext) -> None:
    """A transposed conv -> ``sparse_conv2d(transposed=...)``: output tiles a multiple of the
    stride, each computed from its input window (``program.transposed_window``) and cropped."""
    ni = info(node)
    w, b, stride, padding, _, dilation, groups = transposed_params(node)
    kh, kw = (int(k) for k in node.args[1].meta["val"].shape[-2:])
    kernel = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    step = math.lcm(*stride)
    tile = -(-ctx.config.tile_for(kh, kw, ni.resolution) // step) * step
    name = orig_name(node)
    key = ctx.request(name, ni.resolution, kernel, stride, padding, tile, transposed=True)
    windows = [transposed_window(kernel[a], stride[a], padding[a], tile) for a in (0, 1)]
    crops = [transposed_crop(kernel[a], stride[a], padding[a], tile) for a in (0, 1)]
    crop = (crops[0][0], crops[1][0], crops[0][1], crops[1][1])  # pads, then offsets
    wv = w.meta["val"]  # [C_in, C_out / groups, kh, kw]: every input element meets C_out/g * k
    n = int(node.args[0].meta["val"].shape[0])
    ctx.tile_macs[name] = n * windows[0][1] * windows[1][1] * wv.numel()
    new = replace_with(gm, node, ops.sparse_conv2d,
                        (ctx.state, ctx.tiles, node.args[0], w, b, stride, dilation, groups),
                        {"name": name, "tile_key": key, "kernel": ctx.config.conv_kernel,
                         "transposed": crop})  # fmt: skip
    new.meta["sigec_conv"] = name
    ctx.add_map(name, new)


def fold_pads(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """``conv(pad(x))`` -> the conv reads ``x`` with more (top, left) padding, in the pad's mode.

    Gathers read outside the map as zeros, or (``pad_mode``) as the pixel a reflection /
    replicate pad would put there, so only the top/left pads shift the input tiles; the
    bottom/right pads need nothing. A reflection / replicate pad folds into a conv without zero
    padding of its own (one mode per read). A pad whose users are not all sparse convs stays
    (dense).
    """
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.sparse_conv2d:
            continue
        pad = node.args[2]
        if not (isinstance(pad, torch.fx.Node) and info(pad).op == "pad"):
            continue
        mode, (left, _, top, _) = pad_spec(pad)
        key = node.kwargs["tile_key"]
        req = ctx.tile_requests[key]
        current = node.kwargs.get("pad_mode", "zeros")
        if mode != "zeros" and (req.padding != (0, 0) or current != "zeros"):
            continue  # zeros around a reflection: not one read mode
        if mode == "zeros" and current != "zeros":
            continue
        padding = (req.padding[0] + top, req.padding[1] + left)
        new_key = ctx.request(node.kwargs["name"], info(node).resolution, req.kernel, req.stride,
                              padding, req.tile[0])  # fmt: skip
        node.args = (*node.args[:2], pad.args[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "tile_key": new_key}
        if mode != "zeros":
            node.kwargs = {**node.kwargs, "pad_mode": mode}
        if not pad.users:  # gone now, so the passes below see the conv as x's reader
            gm.graph.erase_node(pad)
        changed += 1
    return finish(gm, "fold_pads", changed, ctx, "pads_folded")


def fold_upsamples(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """``conv(upsample_nearest(x, f))`` -> the conv reads ``x`` through the lookup ``y // f``
    (``sparse_conv2d(upsample=f)``; ``SparseConfig.upsample_reads``).

    The upsampled map is then never built: no working map, no cache per slot, no upsampling in
    the edit. Exact: ``x``'s working map holds the edited tiles and the record everywhere else,
    so the virtual map equals the upsampling of it at every pixel the conv reads, padding
    included (corners and the folded pad's reflection are in the upsampled map's pixels). Only
    where every reader of the upsampling is a sparse conv taking it as its one input (not a
    concat part or a residual, not transposed); otherwise it stays a map. After ``fold_pads``,
    so ``conv(pad(upsample(x)))`` folds both; before ``fuse_prologues``, which may then fold an
    activation or norm of ``x`` into the same read (pointwise ops commute with the upsampling).
    """
    if not ctx.config.upsample_reads:
        ctx.bump("upsamples_read", 0)
        return PassResult("fold_upsamples", 0)
    changed = 0
    for up in list(gm.graph.nodes):
        if up.op != "call_function" or info(up).op != "upsample" or info(up).mode != "sparse":
            continue
        f = upsample_factor(up)
        users = list(up.users)
        if f is None or not users or not all(_reads_as_input(u, up) for u in users):
            continue
        for conv in users:
            conv.args = (*conv.args[:2], up.args[0], *conv.args[3:])
            conv.kwargs = {**conv.kwargs, "upsample": f}
        gm.graph.erase_node(up)
        changed += 1
    return finish(gm, "fold_upsamples", changed, ctx, "upsamples_read")


def _reads_as_input(user: torch.fx.Node, up: torch.fx.Node) -> bool:
    """``user`` is a sparse conv whose single input (nothing else of it) is ``up``."""
    if user.target is not ops.sparse_conv2d or user.args[2] is not up:
        return False
    if user.kwargs.get("transposed") is not None or user.kwargs.get("upsample", 1) != 1:
        return False
    rest = [*user.args[3:], *user.kwargs.values()]
    return up not in rest


def fuse_prologues(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """``conv(act(affine(x)))``, ``conv(affine(x))``, ``conv(act(x))``: fold into the gather."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.sparse_conv2d:
            continue
        src = node.args[2]
        kwargs = dict(node.kwargs)
        if (
            src.op == "call_function"
            and src.target in ACTIVATION_OPS
            and info(src).mode == "sparse"
        ):
            act, slope_idx = ACTIVATION_OPS[src.target]
            if src.target == aten.gelu.default and src.kwargs.get("approximate", "none") == "tanh":
                act = "gelu_tanh"
            kwargs["act"] = act
            if slope_idx is not None:
                kwargs["slope"] = float(src.args[slope_idx]) if len(src.args) > slope_idx else 0.01
            src = src.args[0]
        if src.op == "call_function" and src.target is ops.affine:
            kwargs["scale"], kwargs["shift"] = src.args[1], src.args[2]
            src = src.args[0]
        if src is node.args[2]:
            continue
        node.args = (*node.args[:2], src, *node.args[3:])
        node.kwargs = kwargs
        changed += 1
    return finish(gm, "fuse_prologues", changed, ctx, "prologues_fused")


def fuse_concats(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """``conv(cat([a, b], dim=1))`` -> the conv gathers ``a`` and ``b`` and concatenates tiles.

    UNet decoders concatenate skip connections before every resnet; the full concatenated map
    (and its cache) is never needed when only convs read it (its norm folds into their gathers).
    """
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target is not ops.sparse_conv2d:
            continue
        cat = node.args[2]
        if not (isinstance(cat, torch.fx.Node) and cat.target == aten.cat.default):
            continue
        dim = cat.args[1] if len(cat.args) > 1 else 0
        parts = cat.args[0]
        if dim not in (1, -3) or not all(isinstance(p, torch.fx.Node) and info(p).spatial
                                         for p in parts):  # fmt: skip
            continue
        node.args = (*node.args[:2], list(parts), *node.args[3:])
        changed += 1
    return finish(gm, "fuse_concats", changed, ctx, "concats_fused")


def fuse_residuals(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """``add(sparse_conv(...), r)`` -> the conv's scatter adds ``r`` (the sum is written once).

    A 1x1 conv (a ResBlock's shortcut) whose residual another sparse op writes at the same
    resolution takes that op's tile size: it then reads the residual exactly at the tiles the
    producer wrote, so the residual map needs no cache (``tile_ops.mark_private_maps``): DDPM's
    up-block ResBlocks drop one cached map each.
    """
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target != aten.add.Tensor or info(node).mode != "sparse" or node.kwargs:
            continue
        if len(node.args) != 2:
            continue
        for conv, other in (node.args, node.args[::-1]):
            if not (isinstance(conv, torch.fx.Node) and conv.target is ops.sparse_conv2d):
                continue
            if len(conv.users) != 1 or conv.kwargs.get("residual") is not None:
                continue
            ov = other.meta.get("val") if isinstance(other, torch.fx.Node) else None
            if ov is None or tuple(ov.shape) != tuple(conv.meta["val"].shape):
                continue
            if not info(other).spatial or ov.dtype != conv.meta["val"].dtype:
                continue
            old_name = conv.kwargs["name"]
            key = ctx.map_tiles.pop(old_name)
            ctx.maps.pop(old_name)
            req = ctx.tile_requests[key]
            tile = _residual_tile(req, other, info(node).resolution, ctx) or req.tile[0]
            key = ctx.request(orig_name(node), info(node).resolution, req.kernel, req.stride,
                              req.padding, tile)  # fmt: skip
            add_name = orig_name(node)
            conv.kwargs = {**conv.kwargs, "name": add_name, "tile_key": key, "residual": other}
            node.prepend(conv)  # the residual must exist before the fused conv runs
            conv.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(conv)
            gm.graph.erase_node(node)
            ctx.add_map(add_name, conv)
            changed += 1
            break
    return finish(gm, "fuse_residuals", changed, ctx, "residuals_fused")


def _residual_tile(req, other, res, ctx: PassContext) -> int | None:
    """The tile size for a pointwise conv (1x1, stride 1, no padding) whose residual ``other``
    a sparse op writes on the same mask (truncated policy: the same resolution) and nothing else
    reads (so the map becomes private), or None."""
    if (req.kernel, req.stride, req.padding, req.transposed) != ((1, 1), (1, 1), (0, 0), False):
        return None
    if ctx.config.mask_policy != "truncated" or not isinstance(other, torch.fx.Node):
        return None
    if len(other.users) != 1:  # read elsewhere too: it keeps its cache, keep the 1x1's tile
        return None
    name = other.kwargs.get("name") if other.op == "call_function" else None
    theirs = ctx.tile_requests.get(ctx.map_tiles.get(name, ""))
    if theirs is None or theirs.mask != tuple(res) or theirs.tile[0] != theirs.tile[1]:
        return None
    return theirs.tile[0]
