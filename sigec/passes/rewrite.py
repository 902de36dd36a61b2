"""Transform passes: turn a copy of the captured graph into the edit graph.

Each pass is ``pass_fn(gm, ctx) -> PassResult``, mutates ``gm`` in place, ends with
``gm.graph.lint(); gm.recompile()`` and bumps named counters in ``ctx.counters`` (tests assert on
them). The edit graph takes ``(state, tiles, *flat_inputs)``: ``state`` is the slot's caches and
working maps, ``tiles`` the edit's tile lists (see ``sigec.runtime.ops``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree

from sigec.config import SparseConfig
from sigec.passes.analysis import (
    ACTIVATION_OPS,
    conv_params,
    info,
    instance_stats,
    is_identity,
    pad_spec,
    same_shape,
    set_info,
    transposed_params,
    upsample_factor,
)
from sigec.runtime import ops
from sigec.runtime.program import (
    MacEntry,
    NormFold,
    TileRequest,
    transposed_crop,
    transposed_window,
)

aten = torch.ops.aten


@dataclass
class PassContext:
    """What the passes share and hand to the emitted ``Program``."""

    config: SparseConfig
    counters: dict[str, int] = field(default_factory=dict)
    consts: dict[str, torch.Tensor] = field(default_factory=dict)  # folded at compile
    statics: list[str] = field(default_factory=list)  # cached at record
    norms: list[NormFold] = field(default_factory=list)
    maps: dict[str, tuple] = field(default_factory=dict)  # name -> (shape, dtype)
    tile_requests: dict[str, TileRequest] = field(default_factory=dict)
    map_tiles: dict[str, str] = field(default_factory=dict)
    op_tiles: dict[str, str] = field(default_factory=dict)  # captured linear/attention -> tiles
    tile_macs: dict[str, int] = field(default_factory=dict)  # transposed conv -> MACs per tile
    prelude: torch.fx.GraphModule | None = None  # record-time values of hoisted invariants
    hoisted: list[str] = field(default_factory=list)
    state: torch.fx.Node | None = None
    tiles: torch.fx.Node | None = None

    def bump(self, counter: str, by: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + by

    def request(self, node_name: str, res, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                tile=None, in_scale=1, transposed=False) -> str:  # fmt: skip
        """Register the tile list that the op writing map ``node_name`` needs; return its key."""
        t = tile if tile is not None else self.config.block_size["pointwise"]
        mask = node_name if self.config.mask_policy == "exact" else tuple(res)
        req = TileRequest(mask, tuple(kernel), tuple(stride), tuple(padding), (t, t), in_scale,
                          transposed)  # fmt: skip
        mask_txt = mask if isinstance(mask, str) else f"{mask[0]}x{mask[1]}"
        key = (
            f"{mask_txt}|k{req.kernel[0]}x{req.kernel[1]}|s{req.stride[0]}x{req.stride[1]}"
            f"|p{req.padding[0]}x{req.padding[1]}|t{t}|u{in_scale}"
        ) + ("|T" if transposed else "")
        self.tile_requests[key] = req
        self.map_tiles[node_name] = key
        return key

    def add_map(self, name: str, node: torch.fx.Node) -> None:
        """Register the working map named after captured node ``name``, shaped like ``node``."""
        val = node.meta["val"]
        self.maps[name] = (tuple(val.shape), val.dtype)


@dataclass(frozen=True)
class PassResult:
    name: str
    changed: int


def _finish(gm: torch.fx.GraphModule, name: str, changed: int) -> PassResult:
    gm.graph.lint()
    gm.recompile()
    return PassResult(name, changed)


def _replace_with(gm: torch.fx.GraphModule, node: torch.fx.Node, target, args, kwargs=None):
    """Put ``target(*args, **kwargs)`` where ``node`` was: same meta, same users; ``node`` goes."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, tuple(args), dict(kwargs or {}))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def add_runtime_inputs(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Prepend the ``state`` and ``tiles`` placeholders the runtime ops read."""
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first):
        ctx.state = gm.graph.placeholder("sigec_state")
        ctx.tiles = gm.graph.placeholder("sigec_tiles")
    for n in (ctx.state, ctx.tiles):
        n.meta["sigec"] = info(n)
    return _finish(gm, "add_runtime_inputs", 2)


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
    ctx.bump("consts_folded", changed)
    return _finish(gm, "fold_constants", changed)


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
    ctx.bump("statics_cached", changed)
    return _finish(gm, "cache_statics", changed)


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
    ctx.bump("identities_removed", changed)
    return _finish(gm, "remove_identities", changed)


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
    ctx.bump("subexpressions_merged", changed)
    return _finish(gm, "eliminate_common_subexpressions", changed)


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
            spec = NormFold(orig_name(node), "group_norm", orig_name(x), _name(w), _name(b),
                            float(eps), num_groups=int(groups))  # fmt: skip
        elif instance_stats(node):  # a group norm with one group per channel
            x, w, b, eps = a[0], a[1], a[2], a[7]
            spec = NormFold(orig_name(node), "group_norm", orig_name(x), _name(w), _name(b),
                            float(eps), num_groups=int(x.meta["val"].shape[1]))  # fmt: skip
        else:  # batch_norm / instance_norm on running statistics:
            # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
            x, w, b, rm, rv, eps = a[0], a[1], a[2], a[3], a[4], a[7]
            spec = NormFold(orig_name(node), "batch_norm", orig_name(x), _name(w), _name(b),
                            float(eps), running_mean=_name(rm), running_var=_name(rv))  # fmt: skip
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
        new = _replace_with(gm, node, ops.affine, (x, scale, shift))
        new.meta["sigec_name"] = name
        set_info(new, op="affine", mode="sparse")
        changed += 1
    ctx.bump("norms_folded", changed)
    return _finish(gm, "fold_norms", changed)


def orig_name(node: torch.fx.Node) -> str:
    """The captured node a rewritten node stands for (maps and masks are named after it)."""
    return node.meta.get("sigec_name", node.name)


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
    ctx.bump("biases_folded", changed)
    return _finish(gm, "fold_biases", changed)


def _name(node) -> str | None:
    return node.name if isinstance(node, torch.fx.Node) else None


def rewrite_convs(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Every sparse conv -> ``sparse_conv2d`` (gather -> conv on tiles -> scatter)."""
    changed = 0
    for node in list(gm.graph.nodes):
        ni = info(node)
        if ni.op != "conv" or ni.mode != "sparse" or node.op != "call_function":
            continue
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
        new = _replace_with(gm, node, ops.sparse_conv2d,
                            (ctx.state, ctx.tiles, node.args[0], w, b, stride, dilation, groups),
                            {"name": name, "tile_key": key,
                             "kernel": ctx.config.conv_kernel})  # fmt: skip
        new.meta["sigec_conv"] = name  # the captured conv it computes (MAC counts)
        ctx.add_map(name, new)
        changed += 1
    ctx.bump("convs_sparse", changed)
    return _finish(gm, "rewrite_convs", changed)


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
    new = _replace_with(gm, node, ops.sparse_conv2d,
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
        changed += 1
    ctx.bump("pads_folded", changed)
    return _finish(gm, "fold_pads", changed)


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
    ctx.bump("prologues_fused", changed)
    return _finish(gm, "fuse_prologues", changed)


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
    ctx.bump("concats_fused", changed)
    return _finish(gm, "fuse_concats", changed)


def fuse_residuals(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """``add(sparse_conv(...), r)`` -> the conv's scatter adds ``r`` (the sum is written once)."""
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
            key = ctx.request(orig_name(node), info(node).resolution, req.kernel, req.stride,
                              req.padding, req.tile[0])  # fmt: skip
            add_name = orig_name(node)
            conv.kwargs = {**conv.kwargs, "name": add_name, "tile_key": key, "residual": other}
            node.prepend(conv)  # the residual must exist before the fused conv runs
            conv.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(conv)
            gm.graph.erase_node(node)
            ctx.add_map(add_name, conv)
            changed += 1
            break
    ctx.bump("residuals_fused", changed)
    return _finish(gm, "fuse_residuals", changed)


RUNTIME_MAP_OPS = {ops.sparse_conv2d, ops.sparse_attention, ops.tile_op, ops.tile_upsample}


def _is_tile_op(node: torch.fx.Node) -> bool:
    ni = info(node)
    return (
        node.op == "call_function" and ni.mode == "sparse" and ni.spatial
        and node.target not in RUNTIME_MAP_OPS and ni.op != "upsample"
    )  # fmt: skip


def _expression_roots(gm: torch.fx.GraphModule) -> dict:
    """Tile op -> the tile op whose expression computes it (itself if it gets a working map).

    An op is inlined when every user is a tile op at its resolution and all of them belong to
    the same expression: chains, and DAGs such as GEGLU's two halves of one projection.
    """
    root: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in reversed(list(gm.graph.nodes)):
        if not _is_tile_op(n):
            continue
        users = list(n.users)
        owners = {root.get(u) for u in users}
        same = all(_is_tile_op(u) and info(u).resolution == info(n).resolution for u in users)
        root[n] = next(iter(owners)) if users and same and len(owners) == 1 else n
    return root


def rewrite_tile_ops(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remaining sparse pointwise ops, concatenations, norms and token-wise ops -> ``tile_op``.

    Connected ops run as one ``tile_op`` whose function is the whole expression (a small
    GraphModule): an op whose users all belong to one expression at the same resolution is
    inlined into it, so only the expression's result gets a working map (one gather per input
    map and one scatter, instead of one of each per op).
    """
    roots = _expression_roots(gm)
    inlined = {n for n, r in roots.items() if r is not n}
    changed = fused = 0
    for node in list(gm.graph.nodes):
        if not _is_tile_op(node) or node in inlined:
            continue
        group, leaves = _expression(node, inlined)
        out_shape = node.meta["val"].shape  # a same-shaped dense operand is read like a map
        is_map = lambda a, shape=out_shape: (
            isinstance(a, torch.fx.Node)
            and (  # noqa: E731
                info(a).spatial or same_shape(a, shape)
            )
        )
        name = orig_name(node)
        key = ctx.request(name, info(node).resolution)
        for member in group:
            ctx.op_tiles[orig_name(member)] = key
        compiled = False
        if len(group) == 1:  # a single op: call it directly
            fn = ops.TILE_FUNCTIONS_BY_FN.get(node.target, node.target)  # codegen needs a name
            args, kwargs = node.args, dict(node.kwargs)
        else:
            compiled = ctx.config.tile_expressions == "inductor"
            attr = f"_sigec_expr_{name}"
            gm.add_submodule(attr, _expression_module(gm, group, leaves))
            with gm.graph.inserting_before(node):
                fn = gm.graph.get_attr(attr)
            args, kwargs = tuple(leaves), {}
            fused += len(group) - 1
        flags = (pytree.tree_map(is_map, args), pytree.tree_map(is_map, kwargs))
        new = _replace_with(gm, node, ops.tile_op,
                            (ctx.state, ctx.tiles, fn, args, kwargs, flags),
                            {"name": name, "tile_key": key, "compiled": compiled})  # fmt: skip
        ctx.add_map(name, new)
        changed += 1
    ctx.bump("tile_ops", changed)
    ctx.bump("tile_ops_inlined", fused)
    return _finish(gm, "rewrite_tile_ops", changed)


def _expression(root: torch.fx.Node, inlined: set) -> tuple[list, list]:
    """The ops of ``root``'s chain in graph order, and its inputs (leaves) in first-use order."""
    group, leaves, stack = {root}, [], [root]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in inlined and a not in group:
                group.add(a)
                stack.append(a)
    order = [n for n in root.graph.nodes if n in group]
    for n in order:
        for a in n.all_input_nodes:
            if a not in group and a not in leaves:
                leaves.append(a)
    return order, leaves


def _expression_module(gm, group: list, leaves: list) -> torch.fx.GraphModule:
    """A GraphModule computing ``group[-1]`` from ``leaves`` (positional inputs)."""
    graph = torch.fx.Graph()
    env = {leaf: graph.placeholder(f"in_{i}") for i, leaf in enumerate(leaves)}
    for n in group:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[group[-1]])
    return torch.fx.GraphModule(gm, graph)


def rewrite_upsamples(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Nearest upsampling by an integer factor -> ``tile_upsample`` (tiles at both resolutions)."""
    changed = 0
    for node in list(gm.graph.nodes):
        ni = info(node)
        if ni.op != "upsample" or ni.mode != "sparse" or node.op != "call_function":
            continue
        f = upsample_factor(node)
        key = ctx.request(orig_name(node), ni.resolution, in_scale=f)
        name = orig_name(node)
        new = _replace_with(gm, node, ops.tile_upsample, (ctx.state, ctx.tiles, node.args[0], f),
                            {"name": name, "tile_key": key})  # fmt: skip
        ctx.add_map(name, new)
        changed += 1
    ctx.bump("upsamples_sparse", changed)
    return _finish(gm, "rewrite_upsamples", changed)


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
        return _finish(gm, "hoist_invariants", 0)
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
    _dead_code(gm)
    ctx.bump("invariants_hoisted", len(roots))
    return _finish(gm, "hoist_invariants", len(roots))


def _dead_code(gm: torch.fx.GraphModule) -> int:
    """Remove nodes without users (runtime ops return the map they write: unused means dead)."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and node.target in (aten._assert_tensor_metadata.default,):
            continue
        gm.graph.erase_node(node)
        removed += 1
    return removed


def eliminate_dead_code(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Drop what no output needs (the static and const subgraphs the edit reads from caches)."""
    removed = _dead_code(gm)
    ctx.bump("nodes_removed", removed)
    return _finish(gm, "eliminate_dead_code", removed)


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
