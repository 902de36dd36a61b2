"""Scatter: write a batch of output tiles into a feature map in place, with a fused bias and
residual add.

Contract:
    out:      ``[N, C, H, W]`` fp32 / fp16 / bf16, any strides (NCHW or channels-last); mutated.
    tiles:    ``[N*M, C, tile_h, tile_w]``, same dtype; row ``n*M + m`` is tile ``m`` of sample
              ``n`` (the layout ``gather`` produces and a conv on the gathered batch keeps).
    corners:  int32 ``[M, 2]``, rows ``(y, x)`` = top-left output pixel of each tile. Pixels of a
              tile that fall outside the map are dropped (tiles may hang off the right/bottom).
    bias:     optional ``[C]``: a conv's bias, added here instead of by the conv (one kernel
              less per conv on tiles).
    residual: optional ``[N, C, H, W]``: ``out[p] = tile[p] + bias[c] + residual[p]`` on the
              written pixels only, added in fp32 and rounded once. ``residual`` may be ``out``
              itself.
    num_active (optional int32 ``[1]``): rows ``m >= num_active`` are capacity padding, skipped.

Tiles must not overlap (the tile grid of a conv never does); where they do, which value lands is
unspecified. Nothing outside the written pixels is touched: no clone of the full map happens.
Offsets are 64-bit. Tested under the Triton CPU interpreter (fp32, fp16, bit-exact against
``scatter_reference``) and on an NVIDIA H100/H200 (see docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigec.kernels._common import (
    CAPACITY,
    block_sizes,
    check_corners,
    check_tensor,
    check_tile_size,
    compute_dtype,
    launch,
    reject_float64,
    tile_pixel_index,
)


@triton.jit(do_not_specialize=CAPACITY)
def _scatter_kernel(
    # pointers
    tiles_ptr, out_ptr, res_ptr, bias_ptr, corners_ptr, count_ptr,
    # sizes
    M, C, H, W, TILE_H, TILE_W,
    # strides (elements)
    stride_tn, stride_tc, stride_th, stride_tw,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    # meta-parameters
    HAS_COUNT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # -- which tile, which channels, which pixels of the tile
    pid_t = tl.program_id(0)  # = n * M + m
    pid_c = tl.program_id(1)
    pid_p = tl.program_id(2)
    n = (pid_t // M).to(tl.int64)
    m = pid_t % M
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    dy = offs_p // TILE_W
    dx = offs_p % TILE_W
    c_ok = offs_c < C
    p_ok = offs_p < TILE_H * TILE_W

    # -- destination pixels that exist (and belong to a real tile)
    y = tl.load(corners_ptr + 2 * m) + dy
    x = tl.load(corners_ptr + 2 * m + 1) + dx
    inside = p_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    if HAS_COUNT:
        inside = inside & (m < tl.load(count_ptr))
    mask = c_ok[:, None] & inside[None, :]

    # -- load the tile values
    src = (
        tiles_ptr
        + pid_t.to(tl.int64) * stride_tn
        + offs_c[:, None].to(tl.int64) * stride_tc
        + dy[None, :].to(tl.int64) * stride_th
        + dx[None, :].to(tl.int64) * stride_tw
    )
    v = tl.load(src, mask=mask, other=0.0)

    # -- fused bias and residual add, in fp32
    c64 = offs_c[:, None].to(tl.int64)
    y64 = y[None, :].to(tl.int64)
    x64 = x[None, :].to(tl.int64)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0)
        v = v.to(tl.float32) + b.to(tl.float32)[:, None]
    if HAS_RESIDUAL:
        r_src = res_ptr + n * stride_rn + c64 * stride_rc + y64 * stride_rh + x64 * stride_rw
        r = tl.load(r_src, mask=mask, other=0.0)
        v = v.to(tl.float32) + r.to(tl.float32)

    # -- store into the map
    dst = out_ptr + n * stride_on + c64 * stride_oc + y64 * stride_oh + x64 * stride_ow
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=mask)


def scatter_reference(
    out: torch.Tensor,
    tiles: torch.Tensor,
    corners: torch.Tensor,
    residual: torch.Tensor | None = None,
    num_active: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Plain PyTorch scatter: the definition of correctness and the CPU path. Same contract."""
    n, c, h, w = out.shape
    m, th, tw = corners.shape[0], tiles.shape[2], tiles.shape[3]
    ys, xs, valid = tile_pixel_index(corners, num_active, th, tw, h, w)
    ys, xs = ys[valid], xs[valid]  # [K] destination pixels
    # vals: [N, C, K]
    vals = tiles.reshape(n, m, c, th, tw).permute(0, 2, 1, 3, 4)[:, :, valid]
    cd = compute_dtype(out)
    if bias is not None:
        vals = vals.to(cd) + bias.to(cd)[None, :, None]
    if residual is not None:
        vals = vals.to(cd) + residual[:, :, ys, xs].to(cd)
    out[:, :, ys, xs] = vals.to(out.dtype)


def scatter_triton(
    out: torch.Tensor,
    tiles: torch.Tensor,
    corners: torch.Tensor,
    residual: torch.Tensor | None = None,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
    bias: torch.Tensor | None = None,
) -> None:
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check(out, tiles, corners, residual, num_active, check_values, bias)
    reject_float64("out", out)
    n, c, h, w = out.shape
    m, th, tw = corners.shape[0], tiles.shape[2], tiles.shape[3]
    if tiles.numel() == 0:
        return
    block_c, block_p, num_warps = block_sizes(c, th * tw)
    grid = (n * m, triton.cdiv(c, block_c), triton.cdiv(th * tw, block_p))
    dummy = corners  # stands in for absent optional pointers (never read)
    launch(
        _scatter_kernel, grid,
        tiles, out, residual if residual is not None else dummy,
        bias if bias is not None else dummy, corners.contiguous(),
        num_active if num_active is not None else dummy,
        m, c, h, w, th, tw,
        *tiles.stride(), *out.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        HAS_COUNT=num_active is not None, HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip


def _check(out, tiles, corners, residual, num_active, check_values=True, bias=None) -> None:
    check_tensor("out", out, rank=4)
    check_tensor("tiles", tiles, rank=4, dtypes=(out.dtype,), device=out.device)
    n, c, h, w = out.shape
    th, tw = tiles.shape[2], tiles.shape[3]
    check_tile_size(th, tw)
    check_corners(
        corners,
        num_active,
        height=h,
        width=w,
        tile_h=th,
        tile_w=tw,
        device=out.device,
        values=check_values,
    )
    if tiles.shape[:2] != (n * corners.shape[0], c):
        raise ValueError(
            f"tiles: expected [N*M, C, th, tw] with N*M = {n}*{corners.shape[0]} and C = {c} "
            f"(from out and corners), got {tuple(tiles.shape)}"
        )
    if residual is not None:
        check_tensor("residual", residual, rank=4, dtypes=(out.dtype,), device=out.device)
        if residual.shape != out.shape:
            raise ValueError(
                f"residual: expected the shape of out {tuple(out.shape)}, "
                f"got {tuple(residual.shape)}"
            )
    if bias is not None:
        check_tensor("bias", bias, rank=1, device=out.device)
        if bias.shape[0] != c or bias.stride(0) != 1:
            raise ValueError(
                f"bias: expected a contiguous [C] = [{c}] (one value per channel of out), "
                f"got shape {tuple(bias.shape)} stride {bias.stride()}"
            )


@torch.library.custom_op("sigec::scatter", mutates_args=("out",))
def scatter(
    out: torch.Tensor,
    tiles: torch.Tensor,
    corners: torch.Tensor,
    residual: torch.Tensor | None = None,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
    bias: torch.Tensor | None = None,
) -> None:
    """Write ``tiles`` into ``out`` at ``corners`` (in place), adding ``bias`` and ``residual``.

    Args:
        out: feature map ``[N, C, H, W]``, mutated.
        tiles: ``[N*M, C, th, tw]`` output tiles.
        corners: int32 ``[M, 2]`` top-left ``(y, x)`` of each tile in out's pixels.
        residual: optional ``[N, C, H, W]`` added on the written pixels.
        num_active: optional int32 ``[1]``: only the first ``num_active`` tiles are written.
        check_values: range-check the corners (one host sync on CUDA).
        bias: optional ``[C]`` per-channel bias added to every written pixel.
    """
    if out.is_cuda:
        scatter_triton(out, tiles, corners, residual, num_active, check_values, bias)
        return
    _check(out, tiles, corners, residual, num_active, check_values, bias)
    scatter_reference(out, tiles, corners, residual, num_active, bias)


@scatter.register_fake
def _scatter_fake(out, tiles, corners, residual=None, num_active=None, check_values=True,
                  bias=None):  # fmt: skip
    _check(out, tiles, corners, residual, num_active, check_values, bias)
