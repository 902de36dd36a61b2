"""Window conv: the tile conv that applies its prologue once per loaded input pixel, one launch.

``tile_conv(..., stage_windows=True)``. Each program owns ``T`` consecutive active tiles (its
``BLOCK_M`` rows are their output pixels) and ``BLOCK_N`` output channels. For each channel
block of the reduction it

1. *stages* the input windows of its tiles: reads every window pixel once from the full map
   (through the tile's input corner; a folded pad or nearest upsampling is read as in
   ``gather``), applies the folded norm and activation in fp32, rounds once to the dtype and
   writes the block into a program-private scratch (L1/L2-resident: a few KiB per program);
2. then runs every tap of the conv on tensor cores, reading the ``BLOCK_M`` rows of each tap as
   shifted rows of that scratch.

So the prologue costs one evaluation per input pixel (as in ``gather``), not one per tap (the
map-reading path of ``tile_conv``), and no tile batch leaves the program: gather + conv + write
are one launch. A barrier separates staging from the taps (and the taps from the next staging).
Split-K slices the flat (channel block, tap) steps into contiguous ranges, one per program of an
output block, and reduces as ``tile_conv`` does (``_tile_epilogue``). The contract and the
reference are ``tile_conv``'s (``tile_conv_reference``): the result equals the map-reading path
up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigec.kernels._common import CAPACITY, launch
from sigec.kernels._tile_epilogue import _finish_block
from sigec.kernels.gather import _activate, _source_pixel


@triton.jit
def _stage(
    scr, x_ptr, in_c_ptr, scale_ptr, shift_ptr, n, x_off, m0, active, cb,
    C, H, W, C_OFF, T, WQ, WW,
    stride_xc, stride_xh, stride_xw, stride_sn, stride_sc, stride_bn, stride_bc, slope,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    PAD_MODE: tl.constexpr, UP: tl.constexpr, BLOCK_K: tl.constexpr, STAGE: tl.constexpr,
):  # fmt: skip
    """Write channel block ``cb`` of the ``T`` windows (``WQ`` pixels, ``WW`` wide) of tiles
    ``m0 ..`` into ``scr`` (rows = window pixels, ``BLOCK_K`` channels), prologue applied;
    pixels outside the map, past the channel count or of padding tiles are zero."""
    offs_k = tl.arange(0, BLOCK_K)
    c = cb * BLOCK_K + offs_k
    c_ok = c < C
    if HAS_SCALE:  # one sample per program: channel vectors, loaded once per block
        s = tl.load(scale_ptr + n * stride_sn + (C_OFF + c) * stride_sc, mask=c_ok, other=0.0)
        s = s.to(tl.float32)
    if HAS_SHIFT:
        b = tl.load(shift_ptr + n * stride_bn + (C_OFF + c) * stride_bc, mask=c_ok, other=0.0)
        b = b.to(tl.float32)
    for j in range(0, T * WQ, STAGE):
        q = j + tl.arange(0, STAGE)
        t = q // WQ
        wq = q % WQ
        m = m0 + t
        real = (q < T * WQ) & (m < active)
        y = tl.load(in_c_ptr + 2 * m, mask=real, other=0) + wq // WW
        x = tl.load(in_c_ptr + 2 * m + 1, mask=real, other=0) + wq % WW
        y, x, inside = _source_pixel(y, x, real, H, W, PAD_MODE, UP)
        ok = inside[:, None] & c_ok[None, :]
        base = x_ptr + x_off + y.to(tl.int64) * stride_xh + x.to(tl.int64) * stride_xw
        a = tl.load(base[:, None] + c[None, :] * stride_xc, mask=ok, other=0.0)
        if HAS_SCALE or HAS_SHIFT or ACT != 0:
            v = a.to(tl.float32)
            if HAS_SCALE:
                v = v * s[None, :]
            if HAS_SHIFT:
                v = v + b[None, :]
            v = _activate(v, slope, ACT)
            a = tl.where(ok, v, 0.0).to(x_ptr.dtype.element_ty)
        tl.store(scr + q[:, None] * BLOCK_K + offs_k[None, :], a, mask=(q < T * WQ)[:, None])


@triton.jit
def _window_part(
    acc, scr, x_ptr, w_ptr, in_c_ptr, scale_ptr, shift_ptr, n, x_off, m0, active,
    t, dy, dx, row_ok, offs_n, n_ok, lo, hi, base,
    C, H, W, C_OFF, T, WQ, WW, KH, KW, STRIDE_H, STRIDE_W, DIL_H, DIL_W,
    stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_sn, stride_sc, stride_bn, stride_bc, slope,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
    PAD_MODE: tl.constexpr, UP: tl.constexpr, BLOCK_K: tl.constexpr, STAGE: tl.constexpr,
):  # fmt: skip
    """acc += the steps ``[lo, hi)`` of the flat (channel block, tap) order that fall in this
    part (its steps start at ``base``): stage each channel block's windows once, then its
    taps."""
    kk = KH * KW
    first = tl.maximum(lo - base, 0)
    last = tl.minimum(hi - base, tl.cdiv(C, BLOCK_K) * kk)
    offs_k = tl.arange(0, BLOCK_K)
    for cb in range(first // kk, tl.cdiv(last, kk)):
        tl.debug_barrier()  # the previous block's taps have read the scratch
        _stage(scr, x_ptr, in_c_ptr, scale_ptr, shift_ptr, n, x_off, m0, active, cb,
               C, H, W, C_OFF, T, WQ, WW,
               stride_xc, stride_xh, stride_xw, stride_sn, stride_sc, stride_bn, stride_bc,
               slope, HAS_SCALE, HAS_SHIFT, ACT, PAD_MODE, UP, BLOCK_K, STAGE)  # fmt: skip
        tl.debug_barrier()  # the staged block is visible to every thread of the program
        c = cb * BLOCK_K + offs_k
        c_ok = c < C
        w_rows = (C_OFF + c)[:, None] * stride_wc + offs_n[None, :] * stride_wo
        w_ok = c_ok[:, None] & n_ok[None, :]
        for tap in range(tl.maximum(first - cb * kk, 0), tl.minimum(last - cb * kk, kk)):
            ky = tap // KW
            kx = tap % KW
            q = t * WQ + (dy * STRIDE_H + ky * DIL_H) * WW + dx * STRIDE_W + kx * DIL_W
            a = tl.load(scr + q[:, None] * BLOCK_K + offs_k[None, :], mask=row_ok[:, None],
                        other=0.0)  # fmt: skip
            wt = tl.load(w_ptr + ky * stride_wh + kx * stride_ww + w_rows, mask=w_ok, other=0.0)
            if IEEE:
                acc += tl.dot(a, wt, input_precision="ieee")
            else:
                acc += tl.dot(a, wt)
    return acc


@triton.jit(do_not_specialize=CAPACITY)
def _window_conv_kernel(
    # pointers
    out_ptr, x1_ptr, x2_ptr, w_ptr, bias_ptr, res_ptr, in_c_ptr, out_c_ptr, count_ptr,
    scale_ptr, shift_ptr, ws_ptr, lock_ptr, scratch_ptr,
    # sizes
    M, C1, C2, H, W, CO, HO, WO, TILE_H, TILE_W, KH, KW,
    STRIDE_H, STRIDE_W, DIL_H, DIL_W, T, WQ, WW,
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
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGE: tl.constexpr,
):  # fmt: skip
    # -- this program: tiles m0 .. m0 + T of sample n (rows = their output pixels)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)  # = n * SPLIT + the reduction slice of this program
    n = (pid_z // SPLIT).to(tl.int64)
    split = pid_z % SPLIT
    active = M
    if HAS_COUNT:
        active = tl.load(count_ptr)
    m0 = pid_m * T
    if m0 >= active:
        return  # capacity padding: nothing to compute
    P = TILE_H * TILE_W
    r = tl.arange(0, BLOCK_M)
    t = r // P
    p = r % P
    m = m0 + t
    row_ok = (t < T) & (m < active)
    dy = p // TILE_W
    dx = p % TILE_W
    oy = tl.load(out_c_ptr + 2 * m, mask=row_ok, other=0) + dy
    ox = tl.load(out_c_ptr + 2 * m + 1, mask=row_ok, other=0) + dx
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CO
    prog = (pid_z * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
    scr = scratch_ptr + prog.to(tl.int64) * (T * WQ * BLOCK_K)

    # -- this program's contiguous slice of the flat (part, channel block, tap) steps
    steps1 = KH * KW * tl.cdiv(C1, BLOCK_K)
    steps = steps1 + KH * KW * tl.cdiv(C2, BLOCK_K)
    chunk = tl.cdiv(steps, SPLIT)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _window_part(
        acc, scr, x1_ptr, w_ptr, in_c_ptr, scale_ptr, shift_ptr, n, n * stride_x1n, m0, active,
        t, dy, dx, row_ok, offs_n, n_ok, lo, hi, 0,
        C1, H, W, 0, T, WQ, WW, KH, KW, STRIDE_H, STRIDE_W, DIL_H, DIL_W,
        stride_x1c, stride_x1h, stride_x1w,
        stride_wo, stride_wc, stride_wh, stride_ww,
        stride_sn, stride_sc, stride_bn, stride_bc, slope,
        HAS_SCALE, HAS_SHIFT, ACT, IEEE, PAD_MODE, UP, BLOCK_K, STAGE,
    )  # fmt: skip
    if HAS_X2:
        acc = _window_part(
            acc, scr, x2_ptr, w_ptr, in_c_ptr, scale_ptr, shift_ptr, n, n * stride_x2n, m0,
            active, t, dy, dx, row_ok, offs_n, n_ok, lo, hi, steps1,
            C2, H, W, C1, T, WQ, WW, KH, KW, STRIDE_H, STRIDE_W, DIL_H, DIL_W,
            stride_x2c, stride_x2h, stride_x2w,
            stride_wo, stride_wc, stride_wh, stride_ww,
            stride_sn, stride_sc, stride_bn, stride_bc, slope,
            HAS_SCALE, HAS_SHIFT, ACT, IEEE, PAD_MODE, UP, BLOCK_K, STAGE,
        )  # fmt: skip

    _finish_block(acc, out_ptr, bias_ptr, res_ptr, ws_ptr, lock_ptr, n, pid_m, pid_n, oy, ox,
                  row_ok, offs_n, n_ok, HO, WO,
                  stride_on, stride_oc, stride_oh, stride_ow,
                  stride_rn, stride_rc, stride_rh, stride_rw,
                  HAS_BIAS, HAS_RESIDUAL, SPLIT, BLOCK_M, BLOCK_N)  # fmt: skip


def window_rows(tile_h: int, tile_w: int, block_m: int) -> tuple[int, int]:
    """(tiles per program T, BLOCK_M): as many whole tiles as ``block_m`` rows hold (at least
    one), rounded up to a power of two of rows."""
    pixels = tile_h * tile_w
    tiles = max(1, block_m // pixels)
    return tiles, triton.next_power_of_2(tiles * pixels)


def launch_window_conv(
    out, x1, x2, weight, bias, residual, in_corners, out_corners, num_active, scale, shift,
    ws, locks, m, c1, c2, h, w, tile_h, tile_w, in_h, in_w, stride, dilation, slope, flags,
    split_k, blocks,
) -> None:  # fmt: skip
    """Launch ``_window_conv_kernel`` (``tile_conv_triton`` checked the arguments); ``flags``
    are the kernel's meta-parameters shared with ``tile_conv`` (HAS_X2 .. UP)."""
    nb, co, ho, wo = out.shape
    bm, bn, bk, warps, stages = blocks
    tiles, block_m = window_rows(tile_h, tile_w, bm)
    grid = (triton.cdiv(m, tiles), triton.cdiv(co, bn), nb * split_k)
    wq = in_h * in_w
    scratch = torch.empty(grid[0] * grid[1] * grid[2] * tiles * wq * bk, dtype=out.dtype,
                          device=out.device)  # fmt: skip
    dummy = in_corners
    launch(
        _window_conv_kernel, grid,
        out, x1, x2, weight, bias if bias is not None else dummy,
        residual if residual is not None else dummy, in_corners.contiguous(),
        out_corners.contiguous(), num_active if num_active is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, ws, locks,
        scratch,
        m, c1, c2, h, w, co, ho, wo, tile_h, tile_w, weight.shape[2], weight.shape[3],
        stride[0], stride[1], dilation[0], dilation[1], tiles, wq, in_w,
        *out.stride(), *x1.stride(), *x2.stride(), *weight.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        *(scale.stride() if scale is not None else (0, 0)),
        *(shift.stride() if shift is not None else (0, 0)),
        float(slope), **flags, SPLIT=split_k, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        STAGE=min(64, triton.next_power_of_2(tiles * wq)), num_warps=warps, num_stages=stages,
    )  # fmt: skip
