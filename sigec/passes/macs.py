"""MAC accounting of a graph: dense and executed multiply-accumulates per conv, linear, matmul
and attention, by resolution and tile list (``count_macs`` -> ``MacEntry`` rows, which the
``Program``, the cost model and ``SparseEngine.stats`` read).
"""

from __future__ import annotations

import torch
import torch.fx

from sigec.config import SparseConfig
from sigec.passes.analysis import info
from sigec.runtime import ops
from sigec.runtime.program import (
    MacEntry,
)

aten = torch.ops.aten


# every convolution ATen op export emits (2-D sparse ones carry ``per_pixel`` for their tiles)
_CONV_MAC_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                 aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
                 aten.convolution.default}  # fmt: skip


_CONV_T_MAC_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                   aten.conv_transpose3d.input}  # fmt: skip


_MATMUL_MAC_OPS = {aten.mm.default, aten.matmul.default}


def count_macs(gm: torch.fx.GraphModule, config: SparseConfig) -> tuple[MacEntry, ...]:
    """MACs of every conv / linear / matmul / attention node of the *captured* graph (analysis
    only). Every op counts, whatever way the edit runs it: a conv the edit runs dense (transposed,
    string-padded, 1-D, at a low resolution) costs its full MACs in every edit."""
    entries = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        ni = info(node)
        mode = {"const": "cached", "cached": "cached"}.get(ni.mode, "dense")
        val = node.meta.get("val")
        target = node.target
        transposed = target in _CONV_T_MAC_OPS or (
            target == aten.convolution.default and len(node.args) > 6 and node.args[6]
        )
        if target in _CONV_MAC_OPS or target in _CONV_T_MAC_OPS:
            w = node.args[1].meta["val"]
            taps = int(w.shape[1]) * _prod(w.shape[2:])  # C_in / groups (or C_out / groups) * k
            if transposed:  # every input element meets C_out / groups * k weights
                dense = node.args[0].meta["val"].numel() * taps
                entries.append(MacEntry(node.name, "conv", _res_of(val), dense, mode))
                continue
            dense = val.numel() * taps  # every output element sums C_in / groups * k products
            per_px = int(val.shape[1]) * taps if val.dim() == 4 else 0
            entries.append(MacEntry(node.name, "conv", _res_of(val), dense, mode, per_px))
        elif target == aten.linear.default:
            w = node.args[1].meta["val"]
            rows = val.numel() // int(val.shape[-1])
            res = ni.resolution if ni.layout else None  # a token-wise linear: per pixel
            per_px = int(w.shape[0]) * int(w.shape[1]) if res else 0
            entries.append(MacEntry(node.name, "linear", res, rows * int(w.shape[0])
                                    * int(w.shape[1]), mode, per_px))  # fmt: skip
        elif target == aten.addmm.default:
            a, b = node.args[1].meta["val"], node.args[2].meta["val"]
            entries.append(MacEntry(node.name, "linear", None, int(a.shape[0]) * int(a.shape[1])
                                    * int(b.shape[1]), mode))  # fmt: skip
        elif target in _MATMUL_MAC_OPS:  # [.., n, k] @ [.., k, m]: every output sums k products
            dense = val.numel() * int(node.args[0].meta["val"].shape[-1])
            if "sigec_attention_part" in node.meta:
                entries.append(_attention_macs(gm, node, dense, mode))
            else:
                entries.append(MacEntry(node.name, "linear", None, dense, mode))
        elif target == aten.scaled_dot_product_attention.default:
            q, k = node.args[0].meta["val"], node.args[1].meta["val"]
            lead = q.numel() // (int(q.shape[-2]) * int(q.shape[-1]))
            dense = 2 * lead * int(q.shape[-2]) * int(k.shape[-2]) * int(q.shape[-1])
            entries.append(_attention_macs(gm, node, dense, mode))
        elif target in (aten.bmm.default, aten.baddbmm.default):
            a = node.args[-2].meta["val"]
            dense = int(a.shape[0]) * int(a.shape[1]) * int(a.shape[2]) * int(val.shape[-1])
            entries.append(_attention_macs(gm, node, dense, mode))
    return tuple(entries)


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _res_of(val) -> tuple[int, int] | None:
    return (int(val.shape[-2]), int(val.shape[-1])) if val.dim() == 4 else None


def _attention_macs(gm, node, dense: int, mode: str) -> MacEntry:
    """A MacEntry for an attention op; per query pixel when it belongs to a recognised core."""
    out_name = node.meta.get("sigec_attention_part")
    out = next((n for n in gm.graph.nodes if n.name == out_name), None) if out_name else None
    if out is None or info(out).resolution is None:
        return MacEntry(node.name, "attention", None, dense, mode)
    res = info(out).resolution
    queries = int(out.meta["val"].shape[0]) * res[0] * res[1]
    return MacEntry(node.name, "attention", res, dense, mode, dense // queries)


def macs_on_tiles(macs: tuple[MacEntry, ...], edit_gm: torch.fx.GraphModule,
                  ctx) -> tuple[MacEntry, ...]:  # fmt: skip
    """``count_macs``'s entries with the edit graph's tile lists: an op the passes put on tiles
    (a sparse conv, a token-wise linear, an attention core) is "sparse" and names its tile list
    (and, for a transposed conv, its MACs per tile); the others stay dense. The ``Program``
    keeps these; ``runtime.cost.executed`` prices an edit from them."""
    conv_tiles = {
        n.meta["sigec_conv"]: n.kwargs["tile_key"]
        for n in edit_gm.graph.nodes
        if n.target is ops.sparse_conv2d
    }
    conv_tiles.update(ctx.op_tiles)  # token-wise linears and attention cores on tiles
    return tuple(
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
