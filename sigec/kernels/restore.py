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
    launch,
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
    launch(
        _restore_kernel, grid,
        cache, work, corners.contiguous(), num_active if num_active is not None else corners,
        c, h, w, tile_h, tile_w,
        *cache.stride(), *work.stride(),
        HAS_COUNT=num_active is not None, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip


def _check(work, cache, corners, tile_h, tile_w, num_active, check_values=True,
           pinned_ok=False) -> None:  # fmt: skip
    check_tensor("work", work, rank=4)
    host_side = pinned_ok and _pinned_pair(work, cache)
    check_tensor("cache", cache, rank=4, dtypes=(work.dtype,),
                 device=None if host_side else work.device)  # fmt: skip
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
        device=cache.device if host_side and cache.is_cuda else work.device,
        values=check_values,
    )


def _pinned_pair(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One CUDA tensor and one in pinned host memory (which CUDA kernels address directly)."""
    return (a.is_cuda and b.device.type == "cpu" and b.is_pinned()) or (
        b.is_cuda and a.device.type == "cpu" and a.is_pinned())  # fmt: skip


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


# --- many maps in one launch --------------------------------------------------------------------
#
# An edit first undoes the previous one in every working map: one restore per map is ~150
# launches for SD 1.5. ``RestoreBatch`` does them all in one launch per group: a device table holds
# each map's pointers, sizes, strides and tile list, and program (k, p, n) copies tiles
# p, p + P, p + 2P, ... (up to the tile list's device-side count) of sample n of map k. The grid
# depends on no count, so one captured launch serves every edit, whatever its number of tiles.
#
# Strides read from a table are unknown to the compiler, so a plain copy moves one element per
# thread with strided addresses (H100: ~10x below bandwidth for channels-last fp16 maps). Maps
# whose channels are contiguous (channels-last), whose addresses and other strides are multiples
# of 16 bytes and whose channel count a power of two ``VEC`` divides get a launch of their own:
# addresses are element offsets from the launch's first tensor (a kernel argument, so aligned),
# hinted as multiples of 16 bytes, and each pixel's channels are copied as unmasked vectors.

_F = 22  # table fields per map (the order of ``RestoreBatch._row``)
PROGRAMS = 64  # programs per map and sample: each loops over every P-th tile of its list


@triton.jit
def _restore_batch_kernel(
    table_ptr, proto_ptr,
    F: tl.constexpr, P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    VEC: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    k = tl.program_id(0)
    p = tl.program_id(1)
    n = tl.program_id(2)
    d = table_ptr + k * F
    corners_ptr = tl.load(d + 2).to(tl.pointer_type(tl.int32))
    count_ptr = tl.load(d + 3).to(tl.pointer_type(tl.int32))
    has_count = tl.load(d + 4) != 0
    N = tl.load(d + 5)
    C = tl.load(d + 6)
    H = tl.load(d + 7)
    W = tl.load(d + 8)
    TILE_H = tl.load(d + 9)
    TILE_W = tl.load(d + 10)
    rows = tl.load(d + 11)
    # -- the tiles to copy: the list's rows up to its device-side count, none for samples >= N
    count = tl.load(count_ptr, mask=has_count, other=0).to(tl.int64)
    limit = tl.where(has_count, tl.minimum(count, rows), rows)
    limit = tl.where(n < N, limit, 0)
    n64 = n.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    for m in range(p, limit, P):
        y = tl.load(corners_ptr + 2 * m) + offs_p // TILE_W
        x = tl.load(corners_ptr + 2 * m + 1) + offs_p % TILE_W
        inside = (offs_p < TILE_H * TILE_W) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        if VEC > 0:  # channels contiguous: [BLOCK_P, BLOCK_C], channel vectors per pixel
            y64 = y.to(tl.int64)
            x64 = x.to(tl.int64)
            src0 = tl.load(d + 21) + n64 * tl.load(d + 16) + y64 * tl.load(d + 18) + x64 * tl.load(
                d + 19)  # fmt: skip
            dst0 = tl.load(d + 20) + n64 * tl.load(d + 12) + y64 * tl.load(d + 14) + x64 * tl.load(
                d + 15)  # fmt: skip
            src0 = tl.multiple_of(src0, ALIGN)[:, None]
            dst0 = tl.multiple_of(dst0, ALIGN)[:, None]
            offs_c = tl.arange(0, BLOCK_C)[None, :]
            mask = inside[:, None]
            for c0 in range(0, C, BLOCK_C):
                v = tl.load(proto_ptr + (src0 + c0) + offs_c, mask=mask)
                tl.store(proto_ptr + (dst0 + c0) + offs_c, v, mask=mask)
        else:
            work_ptr = tl.load(d + 0).to(proto_ptr.dtype)
            cache_ptr = tl.load(d + 1).to(proto_ptr.dtype)
            y64 = y[None, :].to(tl.int64)
            x64 = x[None, :].to(tl.int64)
            src0 = cache_ptr + n64 * tl.load(d + 16) + y64 * tl.load(d + 18) + x64 * tl.load(
                d + 19)  # fmt: skip
            dst0 = work_ptr + n64 * tl.load(d + 12) + y64 * tl.load(d + 14) + x64 * tl.load(
                d + 15)  # fmt: skip
            stride_cc = tl.load(d + 17)
            stride_wc = tl.load(d + 13)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c64 = offs_c[:, None].to(tl.int64)
                mask = (offs_c < C)[:, None] & inside[None, :]
                v = tl.load(src0 + c64 * stride_cc, mask=mask)
                tl.store(dst0 + c64 * stride_wc, v, mask=mask)


def vector_width(work: torch.Tensor, cache: torch.Tensor, most: int = 64) -> int:
    """The largest power of two ``v <= most`` dividing the channel count, with ``v`` elements at
    least 16 bytes, if both tensors keep their channels contiguous and every address and other
    stride is a multiple of 16 bytes (what vector copies need); 0 otherwise (the generic copy)."""
    size = work.element_size()
    align = max(1, 16 // size)  # elements per 16 bytes
    for t in (work, cache):
        if (
            t.stride(1) != 1
            or t.data_ptr() % 16
            or any(s % align for i, s in enumerate(t.stride()) if i != 1)
        ):
            return 0
    v = most
    while v >= align:
        if work.shape[1] % v == 0:
            return v
        v //= 2
    return 0


class RestoreBatch:
    """``restore`` of many maps at once: ``items`` are ``(work, cache, corners, num_active,
    tile_h, tile_w)`` (``num_active`` may be None), checked like ``restore`` (shapes, dtypes,
    devices; corner values are not range-checked: they come from this edit's tile lists). One
    of ``work`` and ``cache`` may be in pinned host memory while the other is on CUDA (a slot
    kept on the host): the launch reads or writes its tiles there directly.

    Calling it copies every item's tiles from its cache into its work map (swap the two for the
    other direction): one Triton launch per dtype and vector width on CUDA (``use_triton=True``
    forces the kernel, e.g. under the CPU interpreter), one ``restore_reference`` per item
    otherwise. The launch reads the tensors through a device table of their addresses, built
    here once: the tensors must stay alive and in place. Its grid depends on no count (each
    program loops over its share of the tiles up to the device-side count), so a CUDA graph that
    captured the launch serves any number of tiles, and ``load_tables`` points it at other
    tensors of the same layout (another slot's caches) without capturing again.
    """

    def __init__(self, items, use_triton: bool | None = None, programs: int = PROGRAMS):
        # the table holds addresses: corners must be contiguous [M, 2] (kept alive here)
        self.items = [(w, c, co.contiguous(), n, th, tw) for w, c, co, n, th, tw in items]
        for work, cache, corners, count, th, tw in self.items:
            _check(work, cache, corners, th, tw, count, check_values=False, pinned_ok=True)
        cuda = bool(self.items) and (self.items[0][0].is_cuda or self.items[0][1].is_cuda)
        self.use_triton = cuda if use_triton is None else use_triton
        self.launches = []
        if not self.use_triton:
            return
        groups: dict = {}
        for item in self.items:
            if item[2].shape[0] and item[0].numel():
                key = (item[0].dtype, vector_width(item[0], item[1]))
                groups.setdefault(key, []).append(item)
        for (_, vec), group in groups.items():
            reject_float64("work", group[0][0])
            first, second = group[0][:2]
            proto = second if second.is_cuda and not first.is_cuda else first  # CUDA if any
            table = torch.tensor([self._row(it, proto) for it in group], dtype=torch.int64)
            rows = max(it[2].shape[0] for it in group)
            n = max(it[0].shape[0] for it in group)
            block_p = triton.next_power_of_2(max(it[4] * it[5] for it in group))
            block_c = max(1, min(64, 4096 // block_p))
            if vec:  # a divisor of every C of the group: no channel mask
                block_c = max(min(vec, block_c), 16 // proto.element_size())
            grid = (len(group), min(rows, programs), n)
            self.launches.append((table.to(proto.device), proto, grid, block_c, block_p, vec))

    @staticmethod
    def _row(item, proto: torch.Tensor) -> list[int]:
        work, cache, corners, count, th, tw = item
        n, c, h, w = work.shape
        size = proto.element_size()
        return [work.data_ptr(), cache.data_ptr(), corners.data_ptr(),
                count.data_ptr() if count is not None else 0, int(count is not None),
                n, c, h, w, th, tw, corners.shape[0], *work.stride(), *cache.stride(),
                (work.data_ptr() - proto.data_ptr()) // size,
                (cache.data_ptr() - proto.data_ptr()) // size]  # fmt: skip

    def load_tables(self, other: RestoreBatch) -> None:
        """Copy ``other``'s targets into this batch, in place: launches (also captured ones) then
        copy ``other``'s tensors. ``other`` must have this batch's layout: the same number of
        items, with the same shapes, dtypes, strides and tile sizes, grouped alike."""
        if len(other.items) != len(self.items) or any(
            (a[0].shape, a[0].dtype, a[0].stride(), a[1].stride(), a[4:])
            != (b[0].shape, b[0].dtype, b[0].stride(), b[1].stride(), b[4:])
            for a, b in zip(self.items, other.items, strict=True)
        ):
            raise ValueError("load_tables: the other batch has another layout")
        if [launch[2:] for launch in self.launches] != [launch[2:] for launch in other.launches]:
            raise ValueError("load_tables: the other batch groups its items differently")
        self.items = list(other.items)
        for mine, theirs in zip(self.launches, other.launches, strict=True):
            if theirs[1].data_ptr() != mine[1].data_ptr():  # offsets are from each proto
                raise ValueError("load_tables: the batches' first tensors differ")
            mine[0].copy_(theirs[0])

    def __call__(self) -> None:
        if not self.use_triton:
            for work, cache, corners, count, th, tw in self.items:
                restore_reference(work, cache, corners, th, tw, count)
            return
        for table, proto, grid, block_c, block_p, vec in self.launches:
            launch(_restore_batch_kernel, grid, table, proto, F=_F, P=grid[1], BLOCK_C=block_c,
                   BLOCK_P=block_p, VEC=vec, ALIGN=max(1, 16 // proto.element_size()),
                   num_warps=4)  # fmt: skip
