"""Restore: copy given tiles of a cached map back into a working map, in place.

The O(active) way to undo the previous edit before applying the next one: only the tiles that edit
dirtied are copied, never the whole map.

Contract:
    work:    ``[N, C, H, W]`` fp32 / fp16 / bf16, any strides; mutated in place.
    cache:   same shape and dtype as ``work`` (strides may differ); read only.
    corners: int32 ``[M, 2]``, rows ``(y, x)`` = top-left pixel of each tile; pixels outside the map
             are skipped (see ``_common`` for the range rule).
    num_active (optional int32 ``[1]``): rows ``m >= num_active`` are capacity padding, skipped.

Bit-exact (a copy). Overlapping tiles are fine (they copy the same values). Offsets are 64-bit.
Tested under the Triton CPU interpreter (fp32, fp16) against ``restore_reference`` and on an NVIDIA
H100/H200 (see docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigec.kernels._common import (
    block_sizes,
    check_corners,
    check_tensor,
    check_tile_size,
    reject_float64,
    tile_pixel_index,
)


@triton.jit
def _restore_kernel(
    # pointers
    cache_ptr, work_ptr, corners_ptr, count_ptr,
    # sizes
    C, H, W, TILE_H, TILE_W,
    # strides (elements)
    stride_cn, stride_cc, stride_ch, stride_cw,
    stride_wn, stride_wc, stride_wh, stride_ww,
    # meta-parameters
    HAS_COUNT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # -- which tile, which sample, which channels and pixels
    m = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    pid_cp = tl.program_id(2)
    num_p_blocks = tl.cdiv(TILE_H * TILE_W, BLOCK_P)
    pid_c = pid_cp // num_p_blocks
    pid_p = pid_cp % num_p_blocks
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = offs_c < C
    p_ok = offs_p < TILE_H * TILE_W

    # -- pixels of the tile that exist (and belong to a real tile)
    y = tl.load(corners_ptr + 2 * m) + offs_p // TILE_W
    x = tl.load(corners_ptr + 2 * m + 1) + offs_p % TILE_W
    inside = p_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    if HAS_COUNT:
        inside = inside & (m < tl.load(count_ptr))
    mask = c_ok[:, None] & inside[None, :]

    # -- copy cache -> work
    c64 = offs_c[:, None].to(tl.int64)
    y64 = y[None, :].to(tl.int64)
    x64 = x[None, :].to(tl.int64)
    src = cache_ptr + n * stride_cn + c64 * stride_cc + y64 * stride_ch + x64 * stride_cw
    dst = work_ptr + n * stride_wn + c64 * stride_wc + y64 * stride_wh + x64 * stride_ww
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


def restore_reference(
    work: torch.Tensor,
    cache: torch.Tensor,
    corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    num_active: torch.Tensor | None = None,
) -> None:
    """Plain PyTorch restore: the definition of correctness and the CPU path. Same contract."""
    h, w = work.shape[2:]
    ys, xs, valid = tile_pixel_index(corners, num_active, tile_h, tile_w, h, w)
    ys, xs = ys[valid], xs[valid]
    work[:, :, ys, xs] = cache[:, :, ys, xs]


def restore_triton(
    work: torch.Tensor,
    cache: torch.Tensor,
    corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
) -> None:
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check(work, cache, corners, tile_h, tile_w, num_active, check_values)
    reject_float64("work", work)
    n, c, h, w = work.shape
    m = corners.shape[0]
    if m == 0 or work.numel() == 0:
        return
    block_c, block_p, num_warps = block_sizes(c, tile_h * tile_w)
    grid = (m, n, triton.cdiv(c, block_c) * triton.cdiv(tile_h * tile_w, block_p))
    _restore_kernel[grid](
        cache, work, corners.contiguous(), num_active if num_active is not None else corners,
        c, h, w, tile_h, tile_w,
        *cache.stride(), *work.stride(),
        HAS_COUNT=num_active is not None, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip


def _check(work, cache, corners, tile_h, tile_w, num_active, check_values=True) -> None:
    check_tensor("work", work, rank=4)
    check_tensor("cache", cache, rank=4, dtypes=(work.dtype,), device=work.device)
    if cache.shape != work.shape:
        raise ValueError(
            f"cache: expected the shape of work {tuple(work.shape)}, got {tuple(cache.shape)}"
        )
    check_tile_size(tile_h, tile_w)
    h, w = work.shape[2:]
    check_corners(
        corners,
        num_active,
        height=h,
        width=w,
        tile_h=tile_h,
        tile_w=tile_w,
        device=work.device,
        values=check_values,
    )


@torch.library.custom_op("sigec::restore", mutates_args=("work",))
def restore(
    work: torch.Tensor,
    cache: torch.Tensor,
    corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
) -> None:
    """Copy the tiles at ``corners`` from ``cache`` into ``work`` (in place).

    Args:
        work: working map ``[N, C, H, W]``, mutated.
        cache: recorded map of the same shape and dtype.
        corners: int32 ``[M, 2]`` top-left ``(y, x)`` of each tile.
        tile_h, tile_w: tile size in pixels.
        num_active: optional int32 ``[1]``: only the first ``num_active`` tiles are copied.
        check_values: range-check the corners (one host sync on CUDA).
    """
    if work.is_cuda:
        restore_triton(work, cache, corners, tile_h, tile_w, num_active, check_values)
        return
    _check(work, cache, corners, tile_h, tile_w, num_active, check_values)
    restore_reference(work, cache, corners, tile_h, tile_w, num_active)


@restore.register_fake
def _restore_fake(work, cache, corners, tile_h, tile_w, num_active=None, check_values=True):
    _check(work, cache, corners, tile_h, tile_w, num_active, check_values)
