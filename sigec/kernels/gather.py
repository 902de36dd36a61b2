"""Gather: copy the active tiles of a map into a batch, with a fused folded norm + activation.

Contract:
    x:        ``[N, C, H, W]`` fp32 / fp16 / bf16, NCHW or channels-last (any strides work).
    corners:  int32 ``[M, 2]``, rows ``(y, x)`` = top-left input pixel of each tile (may be
              negative: that is how conv padding is realised; ``_common`` has the range rule).
    returns:  ``[N*M, C, tile_h, tile_w]`` in x's dtype and memory format; row ``n*M + m`` is tile
              ``m`` of sample ``n``.
    Fused prologue (optional), computed in fp32 and rounded once to x's dtype:
        ``v = act(x * scale[n, c] + shift[n, c])`` (``act_first=False``, a folded GroupNorm or
        BatchNorm followed by its activation), or ``v = act(x) * scale + shift``
        (``act_first=True``).
        ``scale``/``shift`` are ``[N, C]`` (expanded views with stride 0 are fine).
    Pixels outside the map are zero *after* the prologue: in the model, padding is applied to the
    normalised and activated map. With ``pad_mode`` "reflect" or "replicate" (a reflection or
    replicate pad folded into the read) they are the reflected / nearest border pixel instead,
    with the prologue applied to it like to any other.
    num_active (optional int32 ``[1]``): rows ``m >= num_active`` are capacity padding, zero.
    upsample (int, default 1): read ``x`` as its nearest upsampling by this factor (a virtual
        ``[N, C, H*f, W*f]`` map whose pixel ``(y, x)`` is ``x[y // f, x // f]``); corners and
        padding are in the virtual map's pixels. A conv after a nearest upsampling reads the
        upsampling's input this way, so the upsampled map is never built or cached.

Offsets are computed in 64-bit, so maps larger than 2**31 elements are fine. Tested under the Triton
CPU interpreter (fp32, fp16) against ``gather_reference`` and on an NVIDIA H100/H200 (see
docs/kernels.md). Pure copies (no prologue) are bit-exact; with a prologue the kernel may contract
``x*scale+shift`` into one FMA, so it agrees with the reference to fp32 rounding before the cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sigec.kernels._common import (
    CAPACITY,
    apply_activation,
    block_sizes,
    check_activation,
    check_corners,
    check_pad_mode,
    check_tensor,
    check_tile_size,
    check_upsample,
    compute_dtype,
    launch,
    reject_float64,
    tile_pixel_index,
)


@triton.jit
def _activate(v, slope, ACT: tl.constexpr):
    """Activation on fp32 values; codes from ``_common.ACTIVATIONS``."""
    if ACT == 1:  # silu
        v = v * tl.sigmoid(v)
    elif ACT == 2:  # relu
        v = tl.maximum(v, 0.0)
    elif ACT == 3:  # leaky_relu
        v = tl.where(v >= 0.0, v, v * slope)
    elif ACT == 4:  # gelu (erf)
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 5:  # gelu (tanh approximation); tanh(z) = 2*sigmoid(2z) - 1
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
    return v


@triton.jit
def _remap(i, n, PAD_MODE: tl.constexpr):
    """A map index read through a folded pad (``_common.remap_index``): reflected or clamped."""
    if PAD_MODE == 1:
        i = tl.abs(i)
        i = tl.where(i >= n, 2 * (n - 1) - i, i)
    return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _source_pixel(y, x, ok, H, W, PAD_MODE: tl.constexpr, UP: tl.constexpr):
    """``(y, x, inside)``: the pixel of the map that window pixel ``(y, x)`` (of rows ``ok``)
    reads. Outside the map it reads zero (``inside`` False), or with a folded reflection /
    replicate pad the reflected / nearest pixel; with ``UP > 1``, ``H, W`` are the nearest
    upsampling's and the source pixel is returned."""
    if PAD_MODE == 0:
        inside = ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    else:  # a folded pad: every pixel reads one of the map
        inside = ok
        y = _remap(y, H, PAD_MODE)
        x = _remap(x, W, PAD_MODE)
    if UP > 1:
        y = tl.maximum(y, 0) // UP
        x = tl.maximum(x, 0) // UP
    return y, x, inside


@triton.jit(do_not_specialize=CAPACITY)
def _gather_kernel(
    # pointers
    x_ptr, out_ptr, corners_ptr, count_ptr, scale_ptr, shift_ptr,
    # sizes
    M, C, H, W, TILE_H, TILE_W,
    # strides (elements)
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_sn, stride_sc, stride_bn, stride_bc,
    # scalars
    slope,
    # meta-parameters
    HAS_COUNT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr, ACT_FIRST: tl.constexpr, PAD_MODE: tl.constexpr, UP: tl.constexpr,
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

    # -- tile position; pixels outside the map (or of a padding tile) read as zero
    y = tl.load(corners_ptr + 2 * m) + dy
    x = tl.load(corners_ptr + 2 * m + 1) + dx
    y, x, inside = _source_pixel(y, x, p_ok, H, W, PAD_MODE, UP)
    if HAS_COUNT:
        inside = inside & (m < tl.load(count_ptr))

    # -- load [BLOCK_C, BLOCK_P]
    src = (
        x_ptr
        + n * stride_xn
        + offs_c[:, None].to(tl.int64) * stride_xc
        + y[None, :].to(tl.int64) * stride_xh
        + x[None, :].to(tl.int64) * stride_xw
    )
    v = tl.load(src, mask=c_ok[:, None] & inside[None, :], other=0.0).to(tl.float32)

    # -- fused prologue: folded norm and activation, in fp32
    if ACT_FIRST:
        v = _activate(v, slope, ACT)
    if HAS_SCALE:
        s = tl.load(scale_ptr + n * stride_sn + offs_c * stride_sc, mask=c_ok, other=0.0)
        v = v * s.to(tl.float32)[:, None]
    if HAS_SHIFT:
        b = tl.load(shift_ptr + n * stride_bn + offs_c * stride_bc, mask=c_ok, other=0.0)
        v = v + b.to(tl.float32)[:, None]
    if not ACT_FIRST:
        v = _activate(v, slope, ACT)
    v = tl.where(inside[None, :], v, 0.0)  # padding stays zero after the prologue

    # -- store the tile row
    dst = (
        out_ptr
        + pid_t.to(tl.int64) * stride_on
        + offs_c[:, None].to(tl.int64) * stride_oc
        + dy[None, :].to(tl.int64) * stride_oh
        + dx[None, :].to(tl.int64) * stride_ow
    )
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & p_ok[None, :])


def gather_reference(
    x: torch.Tensor,
    corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str = "identity",
    slope: float = 0.01,
    act_first: bool = False,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
    pad_mode: str = "zeros",
    upsample: int = 1,
) -> torch.Tensor:
    """Plain PyTorch gather: the definition of correctness and the CPU path. Same contract."""
    n, c, h, w = x.shape
    m = corners.shape[0]
    ys, xs, valid = tile_pixel_index(corners, num_active, tile_h, tile_w, h * upsample,
                                     w * upsample, check_pad_mode(pad_mode))  # fmt: skip
    ys, xs = ys // upsample, xs // upsample
    # tiles: [N, C, M, th, tw]
    cd = compute_dtype(x)
    v = x[:, :, ys, xs].to(cd)
    if act_first:
        v = apply_activation(v, activation, slope)
    if scale is not None:
        v = v * scale.to(cd)[:, :, None, None, None]
    if shift is not None:
        v = v + shift.to(cd)[:, :, None, None, None]
    if not act_first:
        v = apply_activation(v, activation, slope)
    v = torch.where(valid, v, 0.0).to(x.dtype)
    out = v.permute(0, 2, 1, 3, 4).reshape(n * m, c, tile_h, tile_w)
    return out.contiguous(memory_format=_memory_format(x))


def gather_triton(
    x: torch.Tensor,
    corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str = "identity",
    slope: float = 0.01,
    act_first: bool = False,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
    pad_mode: str = "zeros",
    upsample: int = 1,
) -> torch.Tensor:
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    act = _check(x, corners, tile_h, tile_w, scale, shift, activation, slope, num_active,
                 check_values, upsample)  # fmt: skip
    reject_float64("x", x)
    n, c, h, w = x.shape
    m = corners.shape[0]
    # allocated in x's memory format directly (a ``.contiguous(memory_format=)`` of a fresh
    # tensor would launch a copy of the whole uninitialised batch)
    out = torch.empty((n * m, c, tile_h, tile_w), device=x.device, dtype=x.dtype,
                      memory_format=_memory_format(x))  # fmt: skip
    if out.numel() == 0:
        return out
    block_c, block_p, num_warps = block_sizes(c, tile_h * tile_w)
    grid = (n * m, triton.cdiv(c, block_c), triton.cdiv(tile_h * tile_w, block_p))
    dummy = corners  # stands in for absent optional pointers (never read)
    launch(
        _gather_kernel, grid,
        x, out, corners.contiguous(), num_active if num_active is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        m, c, h * upsample, w * upsample, tile_h, tile_w,
        *x.stride(), *out.stride(),
        *(scale.stride() if scale is not None else (0, 0)),
        *(shift.stride() if shift is not None else (0, 0)),
        float(slope),
        HAS_COUNT=num_active is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, ACT=act, ACT_FIRST=act_first,
        PAD_MODE=check_pad_mode(pad_mode), UP=upsample, BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=num_warps,
    )  # fmt: skip
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _check(x, corners, tile_h, tile_w, scale, shift, activation, slope, num_active,
           check_values=True, upsample=1) -> int:  # fmt: skip
    check_tensor("x", x, rank=4)
    check_tile_size(tile_h, tile_w)
    check_upsample(upsample)
    n, c, h, w = x.shape
    check_corners(
        corners,
        num_active,
        height=h * upsample,
        width=w * upsample,
        tile_h=tile_h,
        tile_w=tile_w,
        device=x.device,
        values=check_values,
    )
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        check_tensor(name, t, rank=2, device=x.device)
        if tuple(t.shape) != (n, c):
            raise ValueError(
                f"{name}: expected shape [N, C] = [{n}, {c}] (per-sample per-channel), "
                f"got {tuple(t.shape)}"
            )
    return check_activation(activation, slope)


@torch.library.custom_op("sigec::gather", mutates_args=())
def gather(
    x: torch.Tensor,
    corners: torch.Tensor,
    tile_h: int,
    tile_w: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    activation: str = "identity",
    slope: float = 0.01,
    act_first: bool = False,
    num_active: torch.Tensor | None = None,
    check_values: bool = True,
    pad_mode: str = "zeros",
    upsample: int = 1,
) -> torch.Tensor:
    """Gather active tiles of ``x`` into ``[N*M, C, tile_h, tile_w]`` (see the module docstring).

    Args:
        x: feature map ``[N, C, H, W]``.
        corners: int32 ``[M, 2]`` top-left ``(y, x)`` of each tile, in x's pixels.
        tile_h, tile_w: tile size in pixels.
        scale, shift: optional ``[N, C]`` folded normalisation applied to every gathered pixel.
        activation: one of identity, silu, relu, leaky_relu, gelu, gelu_tanh.
        slope: negative slope of leaky_relu.
        act_first: apply the activation before the affine instead of after.
        num_active: optional int32 ``[1]``: only the first ``num_active`` tiles are real.
        check_values: range-check the corners (one host sync on CUDA).
        pad_mode: what reads outside the map give: "zeros", or the pixel of a folded "reflect"
            / "replicate" pad.
        upsample: read ``x`` as its nearest upsampling by this integer factor (corners in the
            upsampled map's pixels).

    Returns:
        The tile batch, in x's dtype and memory format.
    """
    args = (x, corners, tile_h, tile_w, scale, shift, activation, slope, act_first, num_active)
    if x.is_cuda:
        return gather_triton(*args, check_values, pad_mode, upsample)
    _check(x, corners, tile_h, tile_w, scale, shift, activation, slope, num_active, check_values,
           upsample)  # fmt: skip
    return gather_reference(*args, pad_mode=pad_mode, upsample=upsample)


@gather.register_fake
def _gather_fake(
    x, corners, tile_h, tile_w, scale=None, shift=None, activation="identity", slope=0.01,
    act_first=False, num_active=None, check_values=True, pad_mode="zeros", upsample=1,
):  # fmt: skip
    _check(x, corners, tile_h, tile_w, scale, shift, activation, slope, num_active, check_values,
           upsample)  # fmt: skip
    check_pad_mode(pad_mode)
    n, c = x.shape[:2]
    return torch.empty((n * corners.shape[0], c, tile_h, tile_w), device=x.device, dtype=x.dtype,
                       memory_format=_memory_format(x))  # fmt: skip


def gather_parts(gather_fn, parts: list[torch.Tensor], corners: torch.Tensor, tile_h: int,
                 tile_w: int, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 activation: str, slope: float, num_active: torch.Tensor | None,
                 pad_mode: str = "zeros", upsample: int = 1,
                 concat: bool = True) -> torch.Tensor | list[torch.Tensor]:  # fmt: skip
    """The tile batch of the channel concatenation of ``parts`` (which is never built): each part
    gathered with its channels' slice of the folded norm's ``scale`` / ``shift``, the batches
    concatenated. ``gather_fn`` is ``gather`` (the runtime's cuDNN conv path) or
    ``gather_reference`` (the conv reference): one definition of the per-part gather for both.
    ``upsample``: every part is read as its nearest upsampling by this factor. ``concat=False``
    returns the per-part batches (for a conv that reads them as parts)."""
    batches, offset = [], 0
    for part in parts:
        c = part.shape[1]
        sc = scale[:, offset : offset + c] if scale is not None else None
        sh = shift[:, offset : offset + c] if shift is not None else None
        batches.append(gather_fn(part, corners, tile_h, tile_w, sc, sh, activation, slope, False,
                                 num_active, check_values=False, pad_mode=pad_mode,
                                 upsample=upsample))  # fmt: skip
        offset += c
    if not concat:
        return batches
    return batches[0] if len(batches) == 1 else torch.cat(batches, dim=1)
