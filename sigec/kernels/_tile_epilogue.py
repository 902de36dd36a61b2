"""The end of a tile conv program, shared by its kernels: split-K reduction and the write.

A split launch adds each program's fp32 partial sum into a per-block workspace; the program that
arrives last takes the sum (leaving workspace and counter zero) and writes the block: bias,
residual, and the pixels of the output tiles that lie inside the map.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Split-K: the fp32 workspace and arrival counters all split-K launches on a device share (they
# run one after another on the engine's stream and leave both zero; two split-K launches running
# at once on two streams of one device would mix their sums: sigec never does that). Sized for
# the launches that split: few output blocks (a few waves of SMs at most) of at most 64 x 64.
SPLIT_K_BLOCKS = 2048
SPLIT_K_BLOCK_ELEMS = 64 * 64
SPLIT_K_MAX = 16
_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace, int32 counters) of ``device``, allocated zero once and never freed (a
    captured CUDA graph keeps their addresses)."""
    device = torch.device(device)
    if device not in _WORKSPACES:
        _WORKSPACES[device] = (
            torch.zeros(SPLIT_K_BLOCKS * SPLIT_K_BLOCK_ELEMS, device=device, dtype=torch.float32),
            torch.zeros(SPLIT_K_BLOCKS, device=device, dtype=torch.int32),
        )
    return _WORKSPACES[device]


def split_k_for(programs: int, steps: int, block_elems: int, sms: int) -> int:
    """How many programs share each output block's reduction (1 = no split).

    From ``benchmarks/conv_kernels.py --splits`` on an H200 (docs/results.md): a split pays where
    the launch has fewer programs than SMs and the reduction has at least 12 (tap, channel
    block) steps; about sqrt(steps) slices was within 12 % of the best factor on every DDPM and
    SD shape, and the split launch keeps to at most 8 programs per SM."""
    if programs >= sms or steps < 12 or block_elems > SPLIT_K_BLOCK_ELEMS:
        return 1
    if programs > SPLIT_K_BLOCKS:
        return 1
    return max(1, min(SPLIT_K_MAX, round(steps**0.5), 8 * sms // programs))


@triton.jit
def _split_k_add(acc, ws_ptr, lock_ptr, block, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K: add this program's partial sum into the block's fp32 workspace; returns how many
    programs of the block had arrived before it (the last one takes the sum)."""
    cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.atomic_add(ws_ptr + block * (BLOCK_M * BLOCK_N) + cell, acc, sem="relaxed")
    tl.debug_barrier()  # every thread's partial is in before the arrival is counted
    return tl.atomic_add(lock_ptr + block, 1)  # acq_rel: orders the partials


@triton.jit
def _split_k_take(ws_ptr, lock_ptr, block, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K, the last program of a block: the summed block, leaving the workspace and the
    counter zero for the next launch."""
    cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    ws = ws_ptr + block * (BLOCK_M * BLOCK_N) + cell
    # read the sum and leave zeros in one atomic (at L2, where the adds landed): plain loads of
    # it, even .cg or volatile, missed partials on an H200; as int32 bits because the
    # interpreter exchanges integers only; relaxed: the counter's acquire orders it
    bits = tl.atomic_xchg(ws.to(tl.pointer_type(tl.int32)),
                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), sem="relaxed")  # fmt: skip
    tl.atomic_xchg(lock_ptr + block, 0)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _write_tile(
    acc, out_ptr, bias_ptr, res_ptr, n, oy, ox, row_ok, offs_n, n_ok, HO, WO,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """The epilogue: bias, residual, write into the map (only pixels inside it)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    keep = row_ok & (oy >= 0) & (oy < HO) & (ox >= 0) & (ox < WO)
    mask = keep[:, None] & n_ok[None, :]
    oy64 = oy.to(tl.int64)[:, None]
    ox64 = ox.to(tl.int64)[:, None]
    co64 = offs_n.to(tl.int64)[None, :]
    if HAS_RESIDUAL:
        r_src = res_ptr + n * stride_rn + co64 * stride_rc + oy64 * stride_rh
        res = tl.load(r_src + ox64 * stride_rw, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    dst = out_ptr + n * stride_on + co64 * stride_oc + oy64 * stride_oh
    tl.store(dst + ox64 * stride_ow, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_block(
    acc, out_ptr, bias_ptr, res_ptr, ws_ptr, lock_ptr, n, pid_m, pid_n, oy, ox, row_ok, offs_n,
    n_ok, HO, WO,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The end of a program: with split-K its partial sum goes into the block's workspace and
    the program that adds the last one writes the block; without, the program writes it."""
    if SPLIT > 1:
        block = (n * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
        arrived = _split_k_add(acc, ws_ptr, lock_ptr, block, BLOCK_M, BLOCK_N)
        if arrived == SPLIT - 1:
            acc = _split_k_take(ws_ptr, lock_ptr, block, BLOCK_M, BLOCK_N)
            _write_tile(acc, out_ptr, bias_ptr, res_ptr, n, oy, ox, row_ok, offs_n, n_ok, HO,
                        WO, stride_on, stride_oc, stride_oh, stride_ow,
                        stride_rn, stride_rc, stride_rh, stride_rw,
                        HAS_BIAS, HAS_RESIDUAL)  # fmt: skip
    else:
        _write_tile(acc, out_ptr, bias_ptr, res_ptr, n, oy, ox, row_ok, offs_n, n_ok, HO, WO,
                    stride_on, stride_oc, stride_oh, stride_ow,
                    stride_rn, stride_rc, stride_rh, stride_rw,
                    HAS_BIAS, HAS_RESIDUAL)  # fmt: skip
