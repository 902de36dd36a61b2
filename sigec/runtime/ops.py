"""The functions an emitted edit graph calls: sparse conv, ops on tiles, cached values.

Every sparse op computes its output on the tiles of its output mask and scatters them into its
working map (``state.work(name)``), which holds the recorded map everywhere else; it returns that
map. ``state`` is the slot's ``SlotState``, ``tiles`` the edit's ``TileTable``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from sigec.kernels import gather, gather_parts, scatter, tile_conv
from sigec.runtime.compiled import CompiledOrEager
from sigec.runtime.layouts import LAYOUTS, layout_to_map, map_to_layout  # noqa: F401 (edit graphs)


def cached(state, name: str) -> torch.Tensor:
    """A value recorded at ``record`` (a node that depends only on non-image inputs)."""
    return state.static(name)


def norm_scale(state, name: str) -> torch.Tensor:
    """Per-sample per-channel scale ``[N, C]`` of a folded normalisation."""
    return state.norm(name)[0]


def norm_shift(state, name: str) -> torch.Tensor:
    """Per-sample per-channel shift ``[N, C]`` of a folded normalisation."""
    return state.norm(name)[1]


def norm_incremental(state, tiles, x, weight, bias, *, name: str, groups: int, eps: float):
    """``(scale, shift)`` [N, C] of a GroupNorm over the map being computed, in O(active) work.

    The slot holds the recorded per-group sum and sum of squares (fp64). If ``x`` is a working
    map, only the tiles this edit wrote into it differ from its cache: the sums are corrected by
    ``sum(new) - sum(old)`` over those tiles. Any other ``x`` (an input, a dense result) gets
    full statistics.
    """
    n, c = x.shape[:2]
    src = state.norm_input(name)
    ts = state.written.get(src)
    if ts is None and state.has_map(src):
        s1, s2 = state.norm_sums(name)  # the map was not written this edit: unchanged
    elif ts is None:
        xg = x.reshape(n, groups, -1).double()
        s1, s2 = xg.sum(-1), (xg * xg).sum(-1)
    else:
        new = gather(x, ts.out_corners, *ts.out_tile, num_active=ts.num_active,
                     check_values=False)  # fmt: skip
        old = gather(state.cache(src), ts.out_corners, *ts.out_tile,
                     num_active=ts.num_active, check_values=False)  # fmt: skip
        m, per_group = ts.out_corners.shape[0], (c // groups) * ts.out_tile[0] * ts.out_tile[1]
        new = new.reshape(n, m, groups, per_group).double()
        old = old.reshape(n, m, groups, per_group).double()
        r1, r2 = state.norm_sums(name)
        s1 = r1 + (new.sum((1, 3)) - old.sum((1, 3)))
        s2 = r2 + ((new * new).sum((1, 3)) - (old * old).sum((1, 3)))
    state.pending_norm_sums[name] = (s1, s2)
    count = x[0, 0].numel() * (c // groups)
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0)
    inv = torch.rsqrt(var + eps).float().repeat_interleave(c // groups, dim=1)  # [N, C]
    mean = mean.float().repeat_interleave(c // groups, dim=1)
    w = weight.float()[None] if weight is not None else torch.ones_like(inv)
    b = bias.float()[None] if bias is not None else torch.zeros_like(inv)
    scale = inv * w
    return scale, b - mean * scale


def bias_through_affine(scale: torch.Tensor, shift: torch.Tensor, bias: torch.Tensor):
    """The shift of ``affine(x + bias)`` written as ``affine'(x)``: ``shift + scale * bias``.

    ``bias`` is ``[N or 1, C, 1, 1]``; the result is ``[N, C]`` like ``shift``.
    """
    return shift + scale * bias.reshape(bias.shape[0], -1).to(scale.dtype)


def affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift``, ``[N, C]`` scale/shift: a folded normalisation, on maps or tiles."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cd) * scale.to(cd)[:, :, None, None] + shift.to(cd)[:, :, None, None]
    return y.to(x.dtype)


def sparse_conv2d(
    state,
    tiles,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    name: str,
    tile_key: str,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str = "identity",
    slope: float = 0.01,
    residual: torch.Tensor | None = None,
    kernel: str = "cudnn",
    pad_mode: str = "zeros",
    transposed: tuple[int, int, int, int] | None = None,
    upsample: int = 1,
) -> torch.Tensor:
    """gather (+ folded norm + activation) -> conv on tiles -> scatter (+ bias + residual).

    Padding is realised by the gather (corners may lie outside the map), so the conv on the tile
    batch uses padding 0; reads outside the map are zeros, or with ``pad_mode`` what a folded
    reflection / replicate pad puts there. ``x`` may be a list of maps: their channel
    concatenation, which is then only ever built tile by tile. ``kernel`` is
    ``SparseConfig.conv_kernel``: "fused" runs all of it as one ``tile_conv`` launch (Triton
    implicit GEMM; groups = 1 and at most two concatenated inputs, else the cuDNN path),
    "tiles" gathers the windows with the prologue and runs the rest as one ``tile_conv``, "auto"
    picks per conv (``conv_path``). ``transposed`` (a transposed conv): ``(pad_h, pad_w,
    off_h, off_w)``: each gathered input window's transposed conv with that padding holds the
    output tile at that offset (``program.transposed_window`` / ``transposed_crop``: cuDNN
    computes little past the tile); always the cuDNN path. ``upsample`` (``convs.fold_upsamples``):
    ``x`` is read as its nearest upsampling by this factor, which is never built.
    """
    ts = tiles[tile_key]
    out = state.work(name)
    parts = list(x) if isinstance(x, list | tuple) else [x]  # a channel concat, never built
    if parts[0].dtype != weight.dtype:
        raise TypeError(
            f"{name}: input dtype {parts[0].dtype} differs from the weights' {weight.dtype}; "
            "compile the model in the dtype you run it in"
        )
    path = conv_path(kernel, scale, shift, act, weight, groups, len(parts), transposed)
    if path in ("fused", "window"):  # one launch reading the maps
        tile_conv(out, parts, weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile,
                  list(stride), list(dilation), scale, shift, act, slope, residual,
                  ts.num_active, check_values=False, pad_mode=pad_mode, upsample=upsample,
                  split_k=0, stage_windows=path == "window")  # fmt: skip
        state.note_written(name, ts)
        return out
    if path == "tiles":  # the prologue once per window (gather), the rest in one launch
        windows = gather_parts(gather, parts, ts.in_corners, *ts.in_tile, scale, shift, act,
                               slope, ts.num_active, pad_mode, upsample, concat=False)  # fmt: skip
        if len(windows) > 2:
            windows = [torch.cat(windows, dim=1)]
        tile_conv(out, windows, weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile,
                  list(stride), list(dilation), None, None, "identity", slope, residual,
                  ts.num_active, check_values=False, input_tiles=True, split_k=0)  # fmt: skip
        state.note_written(name, ts)
        return out
    batch = gather_parts(gather, parts, ts.in_corners, *ts.in_tile, scale, shift, act, slope,
                         ts.num_active, pad_mode, upsample)  # fmt: skip
    if transposed is not None:  # the window's transposed conv, cut to the output tile
        ph, pw, oh, ow = transposed
        y = F.conv_transpose2d(batch, weight, None, stride, (ph, pw), 0, groups, dilation)
        y = y[:, :, oh : oh + ts.out_tile[0], ow : ow + ts.out_tile[1]]
    else:
        y = F.conv2d(batch, weight, None, stride, 0, dilation, groups)  # bias: in the scatter
    scatter(out, y.contiguous(memory_format=_fmt(out)), ts.out_corners, residual, ts.num_active,
            check_values=False, bias=bias)  # fmt: skip
    state.note_written(name, ts)
    return out


FUSED_MAX_K = 2048  # "auto": longest reduction (C_in * kh * kw) the fused kernel takes
TILES_MAX_COUT = 320  # "auto": most output channels the conv on gathered windows takes


def conv_path(kernel: str, scale, shift, act: str, weight: torch.Tensor, groups: int,
              num_parts: int, transposed) -> str:  # fmt: skip
    """How a sparse conv runs on the GPU (``SparseConfig.conv_kernel``): "fused" (one
    ``tile_conv`` launch, prologue applied per tap), "window" (one ``tile_conv`` launch that
    stages each program's input windows with the prologue once per pixel, then the taps),
    "tiles" (gather with the prologue, then ``tile_conv`` on the gathered windows) or "cudnn"
    (gather -> cuDNN on the tile batch -> scatter). Transposed and grouped convs always take
    cuDNN; "fused" and "window" take at most two concatenated inputs. The Triton paths split
    the reduction of small launches over several programs (``split_k_for``).

    "auto" follows ``benchmarks/conv_kernels.py --splits`` (H200, docs/results.md): the fused
    kernel for convs without a norm/activation prologue and a short reduction; the conv on
    gathered windows for the others with at most ``TILES_MAX_COUT`` output channels (it beat
    cuDNN by 7-29 % on those DDPM / SD layers at 1.2 % edits, lost at 640 and 1280); cuDNN for
    the rest.
    """
    if transposed is not None or groups != 1:
        return "cudnn"
    plain = scale is None and shift is None and act == "identity"
    if kernel == "auto":
        if plain and weight[0].numel() <= FUSED_MAX_K:
            kernel = "fused"
        else:
            kernel = "tiles" if weight.shape[0] <= TILES_MAX_COUT else "cudnn"
    if kernel in ("fused", "window") and num_parts > 2:
        return "tiles"  # the windows of the parts concatenated, one input of the kernel
    return kernel


TILES = "tiles"  # a ``tile_op`` flag: the operand already is this tile list's tile batch


def tile_op(state, tiles, fn, args, kwargs, flags, *, name: str, tile_key: str,
            compiled: bool = False, as_tiles: torch.dtype | None = None,
            batch: int | None = None) -> torch.Tensor:  # fmt: skip
    """Run ``fn`` on tiles: gather every map operand (``flags`` marks them), scatter the result.

    ``fn`` is an ATen op, the name of a function of this module (``TILE_FUNCTIONS``) or an
    expression (a GraphModule). Non-map tensor operands that carry the batch (``[N, ...]`` with
    N > 1) are repeated per tile. ``compiled``: on CUDA, run ``fn`` compiled by inductor.

    Scatter -> gather fusion on one tile list (``pipeline.pass_tiles``): an operand flagged
    ``TILES`` is the tile batch its producer returned instead of scattering it, and with
    ``as_tiles`` (the map's dtype) this op returns its own tile batch ``[N*M, C, th, tw]`` in that
    dtype: no working map, no scatter, no gather. ``batch`` (N) is set whenever either is used.
    """
    fn = TILE_FUNCTIONS.get(fn, fn) if isinstance(fn, str) else fn
    if as_tiles is not None and batch is None:
        raise ValueError(f"{name}: a tile op returning its tile batch needs batch= (N)")
    ts = tiles[tile_key]
    out = None if as_tiles is not None else state.work(name)
    if compiled and ts.out_corners.is_cuda:
        fn = _compiled_expression(fn)
    n = out.shape[0] if out is not None else batch
    m = ts.out_corners.shape[0]
    th, tw = ts.out_tile

    def to_tiles(value, is_map):
        if not isinstance(value, torch.Tensor):
            return value
        if is_map == TILES:
            return value
        if is_map:
            t = gather(value, ts.out_corners, th, tw, num_active=ts.num_active, check_values=False)
            return t.repeat(n, 1, 1, 1) if t.shape[0] != n * m else t
        if value.dim() >= 2 and value.shape[0] == n and n > 1:
            return value.repeat_interleave(m, dim=0)
        return value

    targs = pytree.tree_map(to_tiles, args, flags[0])
    tkwargs = pytree.tree_map(to_tiles, kwargs, flags[1])
    y = fn(*targs, **tkwargs)
    if as_tiles is not None:
        return y.to(as_tiles)
    scatter(out, y.to(out.dtype).contiguous(memory_format=_fmt(out)), ts.out_corners,
            num_active=ts.num_active, check_values=False)  # fmt: skip
    state.note_written(name, ts)
    return out


def _compiled_expression(fn):
    """``fn`` compiled by inductor, kept on the expression module (compiled on first use; a new
    tile count recompiles once, after which the count is a dynamic dimension). If inductor fails
    on it, the expression runs eagerly from then on, with a warning."""
    runner = fn.__dict__.get("_sigec_runner")
    if runner is None:
        runner = CompiledOrEager(fn, "a tile expression", "tile_expressions")
        object.__setattr__(fn, "_sigec_runner", runner)  # not a registered submodule
    return runner


def tile_upsample(state, tiles, x: torch.Tensor, factor: int, *, name: str, tile_key: str):
    """Nearest upsampling by an integer factor on tiles (input tiles at the lower resolution)."""
    ts = tiles[tile_key]
    out = state.work(name)
    t = gather(x, ts.in_corners, ts.in_tile[0], ts.in_tile[1], num_active=ts.num_active,
               check_values=False)  # fmt: skip
    y = F.interpolate(t, scale_factor=factor, mode="nearest")
    scatter(out, y.contiguous(memory_format=_fmt(out)), ts.out_corners, num_active=ts.num_active,
            check_values=False)  # fmt: skip
    state.note_written(name, ts)
    return out


# --- token regions: maps in other layouts (transformer blocks) ---------------------------------
#
# A token tensor [B, H*W, C] is a map [B, C, H, W] in another layout: token n is pixel
# (n // W, n % W). The passes rewrite token-wise ops to the functions below, which take and return
# maps (or tile batches: every one of them is per pixel, except attention's keys and values).


def channel_operand(t: torch.Tensor) -> torch.Tensor:
    """A per-channel operand of a token-wise op (``[C]``, ``[1, 1, C]``) as ``[1, C, 1, 1]``."""
    return t.reshape(1, -1, 1, 1)


def layer_norm_channels(x, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of every pixel (a token LayerNorm), on maps or tiles."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
    return y.permute(0, 3, 1, 2)


def linear_channels(x, weight, bias=None) -> torch.Tensor:
    """A Linear on the channels of every pixel (a token Linear), on maps or tiles."""
    return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return map_to_layout(t, "tokens") if t.dim() == 4 else t


def attention_rows(q, k, v, heads: int, scale: float | None) -> torch.Tensor:
    """Multi-head attention of query rows ``[B, L, C]`` over keys/values ``[B, N, C]``.

    Rows are independent: any subset of the queries gives the same rows as all of them.
    """
    b, rows, c = q.shape
    n = k.shape[1]
    qh = q.reshape(b, rows, heads, c // heads).transpose(1, 2)
    kh = k.reshape(b, n, heads, k.shape[-1] // heads).transpose(1, 2)
    vh = v.reshape(b, n, heads, v.shape[-1] // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return o.transpose(1, 2).reshape(b, rows, v.shape[-1])


def attention_channels(q, k, v, heads: int, scale: float | None) -> torch.Tensor:
    """Attention with every pixel of map ``q`` as a query; ``k``/``v`` are maps or token tensors.

    Returns a map ``[B, Cv, H, W]`` (channels-last strides).
    """
    b, _, h, w = q.shape
    o = attention_rows(_tokens(q), _tokens(k), _tokens(v), heads, scale)
    return layout_to_map(o, "tokens", (h, w))


def sparse_attention(state, tiles, q, k, v, *, heads: int, scale: float | None, name: str,
                     tile_key: str, q_tiles: bool = False, as_tiles: torch.dtype | None = None,
                     batch: int | None = None) -> torch.Tensor:  # fmt: skip
    """Attention for the queries of the active tiles only, against all keys and values.

    ``k``/``v`` are the full key/value maps (self-attention: the edit updated them at its active
    tiles) or cached token tensors (cross-attention: computed at record). The result is scattered
    into the working map of ``name``. Scatter -> gather fusion (``pipeline.pass_tiles``):
    ``q_tiles``: ``q`` already is the queries' tile batch; ``as_tiles``: return the output tile
    batch in that dtype instead of scattering it; ``batch``: N, set whenever either is.
    """
    if (q_tiles or as_tiles is not None) and batch is None:
        raise ValueError(f"{name}: attention on passed tile batches needs batch= (N)")
    ts = tiles[tile_key]
    th, tw = ts.out_tile
    qt = q if q_tiles else gather(q, ts.out_corners, th, tw, num_active=ts.num_active,
                                  check_values=False)  # fmt: skip
    b = batch if batch is not None else q.shape[0]
    m, c = qt.shape[0] // b, qt.shape[1]
    out = None
    if as_tiles is None:
        out = state.work(name)
        state.note_written(name, ts)
    if m == 0:  # nothing active (an exact list can be empty): no attention on zero rows
        if out is not None:
            return out
        return qt.new_empty((0, _tokens(v).shape[-1], th, tw), dtype=as_tiles)
    rows = qt.reshape(b, m, c, th, tw).permute(0, 1, 3, 4, 2).reshape(b, m * th * tw, c)
    o = attention_rows(rows, _tokens(k), _tokens(v), heads, scale)
    y = o.reshape(b * m, th, tw, o.shape[-1]).permute(0, 3, 1, 2)  # channels-last tiles: a view
    if out is None:
        return y.to(as_tiles)
    scatter(out, y.to(out.dtype).contiguous(memory_format=_fmt(out)), ts.out_corners,
            num_active=ts.num_active, check_values=False)  # fmt: skip
    return out


def _fmt(t: torch.Tensor) -> torch.memory_format:
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


# Python functions that edit graphs run on tiles, by name (FX code generation prints names).
TILE_FUNCTIONS = {
    "sigec.affine": affine,
    "sigec.layer_norm_channels": layer_norm_channels,
    "sigec.linear_channels": linear_channels,
}
TILE_FUNCTIONS_BY_FN = {fn: name for name, fn in TILE_FUNCTIONS.items()}
