"""Tile conv: gather (+ folded norm + activation) -> conv -> scatter (+ residual) in one launch.

An implicit-GEMM convolution on the active tiles only. Each program computes ``BLOCK_M`` output
pixels of the active tiles times ``BLOCK_N`` output channels: it reads the input pixels each
output pixel needs straight from the full map (through the tile's input corner, zeros outside the
map), applies the fused prologue in fp32, multiplies with the weights on tensor cores (fp32
accumulation), adds the bias and the residual, and writes the result straight into the output map
at the tile's output corner. No tile batch is ever materialised; one launch replaces gather (one
per concatenated input), ``torch.cat``, the cuDNN conv and the scatter.

Contract:
    out:        ``[N, Co, Ho, Wo]`` fp32 / fp16 / bf16, any strides (channels-last is fastest);
                mutated at the pixels of the active output tiles (inside the map) only.
    parts:      one or two input maps ``[N, Ci_k, H, W]`` in out's dtype; their channel
                concatenation is the conv's input (never built).
    weight:     ``[Co, sum Ci_k, kh, kw]`` in out's dtype, groups = 1, any strides (channels-last
                weights load fastest).
    bias:       optional ``[Co]``.
    in_corners, out_corners: int32 ``[M, 2]``: tile ``m`` reads the input window at
                ``in_corners[m]`` and writes the ``tile_h x tile_w`` output tile at
                ``out_corners[m]`` (the ``TileSet`` of a conv: ``in = out * stride - padding``).
    stride, dilation: of the conv (its padding is in the corners).
    scale, shift, activation, slope: the gather prologue ``act(x * scale[n, c] + shift[n, c])``
                over the concatenated input channels, in fp32, rounded to the dtype once; pixels
                outside the input map are zero after it (padding of the normalised map).
    residual:   optional ``[N, Co, Ho, Wo]`` added on the written pixels (may be ``out``).
    pad_mode:   "zeros" (reads outside the input map are zero), or "reflect" / "replicate" (a
                reflection / replicate pad folded into the read: the reflected / nearest pixel).
    num_active: optional int32 ``[1]``: tiles ``m >= num_active`` are capacity padding (programs
                past the real tiles exit at once).
    upsample:   int, default 1: the parts are read as their nearest upsampling by this factor
                (``gather``'s ``upsample``: the conv of an upsampled map that is never built);
                ``in_corners`` are in the upsampled map's pixels.

Matches ``tile_conv_reference`` (gather -> ``F.conv2d`` -> scatter) to the accumulation order and
one rounding (the reference rounds the conv output before adding the residual). Tested under the
Triton CPU interpreter (fp32, fp16) and on an NVIDIA H100/H200 (see docs/kernels.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sigec.kernels._common import (
    CAPACITY,
    check_activation,
    check_corners,
    check_pad_mode,
    check_tensor,
    check_tile_size,
    check_upsample,
    launch,
    reject_float64,
)
from sigec.kernels._tile_epilogue import (  # noqa: F401  (split_k_*: the public names here)
    SPLIT_K_BLOCK_ELEMS,
    SPLIT_K_BLOCKS,
    SPLIT_K_MAX,
    _finish_block,
    split_k_for,
    split_k_workspace,
)
from sigec.kernels.gather import _activate, _source_pixel, gather_parts, gather_reference
from sigec.kernels.scatter import scatter_reference
from sigec.kernels.window_conv import launch_window_conv, window_rows


@triton.jit
def _accumulate_part(
    acc, x_ptr, w_ptr, scale_ptr, shift_ptr,
    n, x_off, iy, ix, row_ok, offs_n, n_ok, start,
    C, H, W, C_OFF, KH, KW, DIL_H, DIL_W,
    stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_sn, stride_sc, stride_bn, stride_bc,
    slope,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_K: tl.constexpr, PAD_MODE: tl.constexpr, UP: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """acc += conv taps of one input part (channels ``C_OFF .. C_OFF + C`` of the weight).

    ``x_off``: element offset of each row's sample in ``x`` (a scalar for a map, per row for a
    tile batch). With ``SPLIT > 1`` this program takes every SPLIT-th step from ``start``."""
    offs_k = tl.arange(0, BLOCK_K)
    ncb = tl.cdiv(C, BLOCK_K)
    # one flat loop over (tap, channel block), so the compiler pipelines all of it
    for i in range(start, KH * KW * ncb, SPLIT):
        tap = i // ncb
        c = (i % ncb) * BLOCK_K + offs_k
        ky = tap // KW
        kx = tap % KW
        y = iy + ky * DIL_H
        x = ix + kx * DIL_W
        y, x, inside = _source_pixel(y, x, row_ok, H, W, PAD_MODE, UP)
        c_ok = c < C
        base = x_ptr + x_off + y.to(tl.int64) * stride_xh + x.to(tl.int64) * stride_xw
        a = tl.load(base[:, None] + c[None, :] * stride_xc,
                    mask=inside[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        if HAS_SCALE or HAS_SHIFT or ACT != 0:
            v = a.to(tl.float32)
            cc = C_OFF + c
            if HAS_SCALE:  # one sample per program: a channel vector
                s = tl.load(scale_ptr + n * stride_sn + cc * stride_sc, mask=c_ok, other=0.0)
                v = v * s.to(tl.float32)[None, :]
            if HAS_SHIFT:
                b = tl.load(shift_ptr + n * stride_bn + cc * stride_bc, mask=c_ok, other=0.0)
                v = v + b.to(tl.float32)[None, :]
            v = _activate(v, slope, ACT)
            v = tl.where(inside[:, None] & c_ok[None, :], v, 0.0)
            a = v.to(x_ptr.dtype.element_ty)
        w_base = w_ptr + ky * stride_wh + kx * stride_ww
        wt = tl.load(w_base + (C_OFF + c)[:, None] * stride_wc + offs_n[None, :] * stride_wo,
                     mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
        if IEEE:
            acc += tl.dot(a, wt, input_precision="ieee")
        else:
            acc += tl.dot(a, wt)
    return acc


@triton.jit(do_not_specialize=CAPACITY)
def _tile_conv_kernel(
    # pointers
    out_ptr, x1_ptr, x2_ptr, w_ptr, bias_ptr, res_ptr, in_c_ptr, out_c_ptr, count_ptr,
    scale_ptr, shift_ptr, ws_ptr, lock_ptr,
    # sizes
    M, C1, C2, H, W, CO, HO, WO, TILE_H, TILE_W, KH, KW,
    STRIDE_H, STRIDE_W, DIL_H, DIL_W,
    # strides (elements)
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_x1n, stride_x1c, stride_x1h, stride_x1w,
    stride_x2n, stride_x2c, stride_x2h, stride_x2w,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_rn, stride_rc, stride_rh, stride_rw,
    stride_sn, stride_sc, stride_bn, stride_bc,
    # scalars
    slope,
    # meta-parameters
    HAS_X2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_COUNT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr, IEEE: tl.constexpr, PAD_MODE: tl.constexpr, UP: tl.constexpr,
    TILED_IN: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # -- rows are the output pixels (tile m, pixel p) of sample n: real tiles come first
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)  # = n * SPLIT + the reduction slice of this program
    n = (pid_z // SPLIT).to(tl.int64)
    split = pid_z % SPLIT
    P = TILE_H * TILE_W
    active = M
    if HAS_COUNT:
        active = tl.load(count_ptr)
    rows = active * P
    if pid_m * BLOCK_M >= rows:
        return  # capacity padding: nothing to compute
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    m = r // P
    p = r % P
    dy = p // TILE_W
    dx = p % TILE_W
    oy = tl.load(out_c_ptr + 2 * m, mask=row_ok, other=0) + dy
    ox = tl.load(out_c_ptr + 2 * m + 1, mask=row_ok, other=0) + dx
    if TILED_IN:  # the parts are gathered tile batches: row (m, p) reads sample n * M + m
        iy = dy * STRIDE_H
        ix = dx * STRIDE_W
        sample = n * M + m.to(tl.int64)
        x1_off = sample * stride_x1n
        x2_off = sample * stride_x2n
    else:
        iy = tl.load(in_c_ptr + 2 * m, mask=row_ok, other=0) + dy * STRIDE_H
        ix = tl.load(in_c_ptr + 2 * m + 1, mask=row_ok, other=0) + dx * STRIDE_W
        x1_off = n * stride_x1n
        x2_off = n * stride_x2n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CO

    # -- implicit GEMM over (part, ky, kx, channel block); split-K: every SPLIT-th step
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_part(
        acc, x1_ptr, w_ptr, scale_ptr, shift_ptr, n, x1_off, iy, ix, row_ok, offs_n, n_ok, split,
        C1, H, W, 0, KH, KW, DIL_H, DIL_W,
        stride_x1c, stride_x1h, stride_x1w,
        stride_wo, stride_wc, stride_wh, stride_ww,
        stride_sn, stride_sc, stride_bn, stride_bc, slope,
        HAS_SCALE, HAS_SHIFT, ACT, IEEE, BLOCK_K, PAD_MODE, UP, SPLIT,
    )  # fmt: skip
    if HAS_X2:
        steps1 = KH * KW * tl.cdiv(C1, BLOCK_K)  # part 2 continues part 1's step count
        acc = _accumulate_part(
            acc, x2_ptr, w_ptr, scale_ptr, shift_ptr, n, x2_off, iy, ix, row_ok, offs_n, n_ok,
            (split + SPLIT - steps1 % SPLIT) % SPLIT,
            C2, H, W, C1, KH, KW, DIL_H, DIL_W,
            stride_x2c, stride_x2h, stride_x2w,
            stride_wo, stride_wc, stride_wh, stride_ww,
            stride_sn, stride_sc, stride_bn, stride_bc, slope,
            HAS_SCALE, HAS_SHIFT, ACT, IEEE, BLOCK_K, PAD_MODE, UP, SPLIT,
        )  # fmt: skip

    _finish_block(acc, out_ptr, bias_ptr, res_ptr, ws_ptr, lock_ptr, n, pid_m, pid_n, oy, ox,
                  row_ok, offs_n, n_ok, HO, WO,
                  stride_on, stride_oc, stride_oh, stride_ow,
                  stride_rn, stride_rc, stride_rh, stride_rw,
                  HAS_BIAS, HAS_RESIDUAL, SPLIT, BLOCK_M, BLOCK_N)  # fmt: skip


def tile_conv_reference(
    out: torch.Tensor,
    parts: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_corners: torch.Tensor,
    out_corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    stride: list[int],
    dilation: list[int],
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str = "identity",
    slope: float = 0.01,
    residual: torch.Tensor | None = None,
    num_active: torch.Tensor | None = None,
    pad_mode: str = "zeros",
    upsample: int = 1,
    input_tiles: bool = False,
) -> None:
    """gather -> ``F.conv2d`` -> scatter: the definition of correctness and the CPU path."""
    if input_tiles:  # the parts are the gathered windows already
        batch = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)
    else:
        in_h, in_w = _window(tile_h, tile_w, stride, dilation, weight)
        batch = gather_parts(gather_reference, parts, in_corners, in_h, in_w, scale, shift,
                             activation, slope, num_active, pad_mode, upsample)  # fmt: skip
    y = F.conv2d(batch, weight, bias, tuple(stride), 0, tuple(dilation))
    scatter_reference(out, y.contiguous(), out_corners, residual, num_active)


def _window(tile_h, tile_w, stride, dilation, weight) -> tuple[int, int]:
    """The input window a ``tile_h x tile_w`` output tile reads."""
    in_h = (tile_h - 1) * stride[0] + dilation[0] * (weight.shape[2] - 1) + 1
    in_w = (tile_w - 1) * stride[1] + dilation[1] * (weight.shape[3] - 1) + 1
    return in_h, in_w


def block_config(c_in: int, c_out: int, rows: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a tile conv; ``rows`` per sample.

    From the block search of ``benchmarks/conv_kernels.py`` (NVIDIA H100, fp16; results in
    docs/results.md): BLOCK_N 64, BLOCK_M growing with the rows (few rows: small blocks, so more
    programs share the SMs); the channel block follows the channel count.
    """
    del c_out
    block_k = 64 if c_in >= 64 else max(16, triton.next_power_of_2(c_in))
    block_m = 32 if rows < 512 else 64 if rows < 16384 else 128
    return block_m, 64, block_k, 4, 3


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # the interpreter: no automatic split (tests ask for one explicitly)
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_conv_triton(
    out, parts, weight, bias, in_corners, out_corners, tile_h, tile_w, stride, dilation,
    scale=None, shift=None, activation="identity", slope=0.01, residual=None, num_active=None,
    check_values=True, pad_mode: str = "zeros", upsample: int = 1, input_tiles: bool = False,
    split_k: int = 1, blocks: tuple[int, int, int, int, int] | None = None,
    stage_windows: bool = False,
) -> None:  # fmt: skip
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    ``split_k``: programs per output block's reduction, 0 = ``split_k_for``'s choice (the
    interpreter has no SM count: 0 means no split there).
    ``blocks`` overrides ``block_config`` (tests use large blocks under the interpreter).
    ``stage_windows``: the window conv (``sigec.kernels.window_conv``): the input windows are
    read from the maps and their prologue applied once per pixel, then the taps, in one launch.
    """
    act = _check(out, parts, weight, bias, in_corners, out_corners, tile_h, tile_w, stride,
                 dilation, scale, shift, activation, slope, residual, num_active,
                 check_values, upsample, input_tiles, pad_mode, stage_windows)  # fmt: skip
    reject_float64("out", out)
    nb, co, ho, wo = out.shape
    m = in_corners.shape[0]
    x1 = parts[0]
    x2 = parts[1] if len(parts) > 1 else parts[0]
    c1, c2 = x1.shape[1], (parts[1].shape[1] if len(parts) > 1 else 0)
    h, w = x1.shape[2:] if input_tiles else (x1.shape[2] * upsample, x1.shape[3] * upsample)
    rows = m * tile_h * tile_w  # per sample
    if rows == 0 or co == 0 or nb == 0:
        return
    bm, bn, bk, warps, stages = blocks or block_config(c1 + c2, co, rows)
    if stage_windows:  # whole tiles per program
        tiles, block_m = window_rows(tile_h, tile_w, bm)
        grid_m = triton.cdiv(m, tiles)
    else:
        block_m, grid_m = bm, triton.cdiv(rows, bm)
    grid_mn = grid_m * triton.cdiv(co, bn)
    steps = weight.shape[2] * weight.shape[3] * (triton.cdiv(c1, bk) + triton.cdiv(c2, bk))
    if split_k == 0:
        split_k = split_k_for(grid_mn * nb, steps, block_m * bn, _sm_count(out.device))
    if split_k > 1 and (grid_mn * nb > SPLIT_K_BLOCKS or block_m * bn > SPLIT_K_BLOCK_ELEMS):
        raise ValueError(
            f"split_k={split_k}: the launch has {grid_mn * nb} output blocks of {block_m}x{bn}; "
            f"the split-K workspace holds {SPLIT_K_BLOCKS} blocks of {SPLIT_K_BLOCK_ELEMS} "
            "values (use split_k=1 or smaller blocks)"
        )
    ws, locks = split_k_workspace(out.device) if split_k > 1 else (in_corners, in_corners)
    flags = dict(HAS_X2=len(parts) > 1, HAS_BIAS=bias is not None,
                 HAS_RESIDUAL=residual is not None, HAS_COUNT=num_active is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT=act,
                 IEEE=out.dtype == torch.float32, PAD_MODE=check_pad_mode(pad_mode),
                 UP=upsample)  # fmt: skip
    if stage_windows:
        in_h, in_w = _window(tile_h, tile_w, stride, dilation, weight)
        launch_window_conv(out, x1, x2, weight, bias, residual, in_corners, out_corners,
                           num_active, scale, shift, ws, locks, m, c1, c2, h, w, tile_h,
                           tile_w, in_h, in_w, stride, dilation, slope, flags, split_k,
                           (bm, bn, bk, warps, stages))  # fmt: skip
        return
    grid = (grid_m, triton.cdiv(co, bn), nb * split_k)
    dummy = in_corners  # stands in for absent optional pointers (never read)
    launch(
        _tile_conv_kernel, grid,
        out, x1, x2, weight, bias if bias is not None else dummy,
        residual if residual is not None else dummy, in_corners.contiguous(),
        out_corners.contiguous(), num_active if num_active is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, ws, locks,
        m, c1, c2, h, w, co, ho, wo, tile_h, tile_w, weight.shape[2], weight.shape[3],
        stride[0], stride[1], dilation[0], dilation[1],
        *out.stride(), *x1.stride(), *x2.stride(), *weight.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        *(scale.stride() if scale is not None else (0, 0)),
        *(shift.stride() if shift is not None else (0, 0)),
        float(slope), **flags, TILED_IN=input_tiles, SPLIT=split_k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _check(
    out, parts, weight, bias, in_corners, out_corners, tile_h, tile_w, stride, dilation,
    scale, shift, activation, slope, residual, num_active, check_values=True, upsample=1,
    input_tiles=False, pad_mode="zeros", stage_windows=False,
) -> int:  # fmt: skip
    check_tensor("out", out, rank=4)
    if stage_windows and input_tiles:
        raise ValueError("stage_windows: the window conv reads the maps; pass input_tiles=False")
    check_tile_size(tile_h, tile_w)
    check_upsample(upsample)
    if not isinstance(parts, list | tuple) or not 1 <= len(parts) <= 2:
        raise ValueError("parts: expected a list of one or two input maps (a channel concat)")
    nb = out.shape[0]
    if input_tiles:
        _check_tile_batches(parts, out, weight, in_corners, tile_h, tile_w, stride, dilation,
                            scale, shift, activation, upsample, pad_mode)  # fmt: skip
    for i, part in enumerate(parts):
        check_tensor(f"parts[{i}]", part, rank=4, dtypes=(out.dtype,), device=out.device)
        if not input_tiles and (part.shape[0] != nb or part.shape[2:] != parts[0].shape[2:]):
            raise ValueError(
                f"parts[{i}]: expected [N={nb}, C, H, W] with the H, W of parts[0], "
                f"got {tuple(part.shape)}"
            )
    c_in = sum(int(p.shape[1]) for p in parts)
    check_tensor("weight", weight, rank=4, dtypes=(out.dtype,), device=out.device)
    if weight.shape[0] != out.shape[1] or weight.shape[1] != c_in:
        raise ValueError(
            f"weight: expected [Co={out.shape[1]}, Ci={c_in}, kh, kw] (groups = 1), "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, rank=1, dtypes=(out.dtype,), device=out.device)
        if bias.shape[0] != out.shape[1]:
            raise ValueError(f"bias: expected [{out.shape[1]}], got {tuple(bias.shape)}")
    for name, pair in (("stride", stride), ("dilation", dilation)):
        if len(pair) != 2 or any(int(v) < 1 for v in pair):
            raise ValueError(f"{name}: expected two positive ints, got {pair!r}")
    in_h, in_w = _window(tile_h, tile_w, stride, dilation, weight)
    if not input_tiles:  # a tile batch's windows are not read through the corners
        h, w = (int(v) * upsample for v in parts[0].shape[2:])
        check_corners(in_corners, num_active, height=h, width=w, tile_h=in_h, tile_w=in_w,
                      device=out.device, values=check_values)  # fmt: skip
    check_corners(out_corners, num_active, height=out.shape[2], width=out.shape[3],
                  tile_h=tile_h, tile_w=tile_w, device=out.device, values=check_values)  # fmt: skip
    if in_corners.shape != out_corners.shape:
        raise ValueError(
            f"corners: in_corners {tuple(in_corners.shape)} and out_corners "
            f"{tuple(out_corners.shape)} must list the same tiles"
        )
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        check_tensor(name, t, rank=2, device=out.device)
        if tuple(t.shape) != (nb, c_in):
            raise ValueError(
                f"{name}: expected shape [N, C_in] = [{nb}, {c_in}], got {tuple(t.shape)}"
            )
    if residual is not None:
        check_tensor("residual", residual, rank=4, dtypes=(out.dtype,), device=out.device)
        if residual.shape != out.shape:
            raise ValueError(
                f"residual: expected the shape of out {tuple(out.shape)}, got "
                f"{tuple(residual.shape)}"
            )
    return check_activation(activation, slope)


def _check_tile_batches(parts, out, weight, in_corners, tile_h, tile_w, stride, dilation,
                        scale, shift, activation, upsample, pad_mode) -> None:  # fmt: skip
    """``input_tiles``: the parts are ``gather``'s windows ``[N*M, C_k, in_h, in_w]``, their
    prologue, padding and upsampling already applied."""
    if scale is not None or shift is not None or activation != "identity":
        raise ValueError("input_tiles: the prologue belongs to the gather that built the tiles; "
                         "pass scale=shift=None and activation='identity'")  # fmt: skip
    if upsample != 1 or pad_mode != "zeros":
        raise ValueError("input_tiles: upsampling and folded pads belong to the gather; pass "
                         "upsample=1 and pad_mode='zeros'")  # fmt: skip
    window = (out.shape[0] * in_corners.shape[0], *_window(tile_h, tile_w, stride, dilation,
                                                           weight))  # fmt: skip
    for i, part in enumerate(parts):
        if not isinstance(part, torch.Tensor) or part.dim() != 4:
            continue  # check_tensor names it
        if (part.shape[0], *part.shape[2:]) != window:
            raise ValueError(
                f"parts[{i}]: expected a tile batch [N*M={window[0]}, C, {window[1]}, "
                f"{window[2]}] (the windows of {tile_h}x{tile_w} output tiles), got "
                f"{tuple(part.shape)}"
            )


@torch.library.custom_op("sigec::tile_conv", mutates_args=("out",))
def tile_conv(
    out: torch.Tensor,
    parts: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_corners: torch.Tensor,
    out_corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    stride: list[int],
    dilation: list[int],
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str = "identity",
    slope: float = 0.01,
    residual: torch.Tensor | None = None,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
    pad_mode: str = "zeros",
    upsample: int = 1,
    input_tiles: bool = False,
    split_k: int = 1,
    stage_windows: bool = False,
) -> None:
    """Conv on the active tiles, written into ``out`` in place (see the module docstring).

    Args:
        out: output map ``[N, Co, Ho, Wo]``, mutated at the active output tiles.
        parts: one or two input maps whose channel concatenation the conv reads.
        weight, bias: the conv's parameters (groups = 1).
        in_corners, out_corners: int32 ``[M, 2]`` input window / output tile of each tile.
        tile_h, tile_w: output tile size.
        stride, dilation: the conv's (its padding is in ``in_corners``).
        scale, shift, activation, slope: fused prologue on the input channels.
        residual: optional map added on the written pixels.
        num_active: optional int32 ``[1]``: only the first ``num_active`` tiles are real.
        check_values: range-check the corners (one host sync on CUDA).
        pad_mode: what reads outside the input map give: "zeros", or the pixel of a folded
            "reflect" / "replicate" pad.
        upsample: read the parts as their nearest upsampling by this integer factor.
        input_tiles: the parts are ``gather``'s tile batches ``[N*M, C_k, in_h, in_w]`` of the
            input windows (their prologue applied there), not maps; ``in_corners`` is not read.
        split_k: programs sharing each output block's reduction (0: chosen from the launch's
            size, ``split_k_for``); the result does not depend on it beyond fp32 summation
            order.
        stage_windows: on CUDA, run the window conv (``sigec.kernels.window_conv``): each
            program applies the prologue once per input pixel of its tiles' windows, then the
            taps, in one launch (the same result up to fp32 summation order).
    """
    args = (out, parts, weight, bias, in_corners, out_corners, tile_h, tile_w, stride, dilation,
            scale, shift, activation, slope, residual, num_active)  # fmt: skip
    check_pad_mode(pad_mode)
    if split_k < 0:
        raise ValueError(f"split_k: expected 0 (automatic) or a positive count, got {split_k}")
    if out.is_cuda:
        tile_conv_triton(*args, check_values, pad_mode, upsample, input_tiles, split_k,
                         stage_windows=stage_windows)  # fmt: skip
        return
    _check(*args, check_values, upsample, input_tiles, pad_mode, stage_windows)
    tile_conv_reference(*args, pad_mode=pad_mode, upsample=upsample, input_tiles=input_tiles)


@tile_conv.register_fake
def _tile_conv_fake(
    out, parts, weight, bias, in_corners, out_corners, tile_h, tile_w, stride, dilation,
    scale=None, shift=None, activation="identity", slope=0.01, residual=None, num_active=None,
    check_values=True, pad_mode="zeros", upsample=1, input_tiles=False, split_k=1,
    stage_windows=False,
):  # fmt: skip
    _check(out, parts, weight, bias, in_corners, out_corners, tile_h, tile_w, stride, dilation,
           scale, shift, activation, slope, residual, num_active, check_values,
           upsample, input_tiles, pad_mode, stage_windows)  # fmt: skip
    check_pad_mode(pad_mode)
