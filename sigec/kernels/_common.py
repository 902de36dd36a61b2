"""Shared pieces of the tile kernels: argument checks, activation codes, launch heuristics.

Every public op in this package validates its arguments with these helpers inside the op body
*and* inside its fake (meta) implementation, so a wrong call fails the same way on CPU, on CUDA and
while tracing. Errors name the argument and say what was expected.

Tile contract shared by gather / scatter / restore:
    corners: int32 ``[M, 2]`` with rows ``(y, x)``: the top-left pixel of each tile in the map.
        A corner may be negative or reach past the bottom/right edge: pixels outside the map read
        as zero and are never written. A tile may even lie wholly in the padding (a 1x1 conv with
        padding 1 has such output tiles), but it must overlap the map grown by one tile on every
        side (``-2*tile_h < y < H + tile_h``, same for x); anything further out is a caller's bug.
    check_values: range-check the corner values (one host sync on CUDA; default True). sigec's
        runtime passes False for corner lists it built itself, so its edit path never syncs.
    num_active: optional int32 ``[1]`` tensor on the same device. Only rows ``m < num_active`` are
        real tiles; the rest are capacity padding (static shapes for CUDA graphs): gather writes
        zeros for them, scatter and restore skip them, and their corners are not checked.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted on the CPU (the reference path), e.g. for precision checks; not by Triton.
CPU_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reject_float64(name: str, t: torch.Tensor) -> None:
    if t.dtype == torch.float64:
        raise TypeError(f"{name}: float64 runs on the CPU reference only, not in the Triton kernel")


# Activation names accepted by the fused ops, and the integer code the kernels switch on.
ACTIVATIONS = {"identity": 0, "silu": 1, "relu": 2, "leaky_relu": 3, "gelu": 4, "gelu_tanh": 5}


def check_tensor(name: str, t, *, rank: int, dtypes=FLOAT_DTYPES, device=None) -> None:
    """Raise TypeError / ValueError unless ``t`` is a tensor of the given rank, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is FLOAT_DTYPES and t.device.type in ("cpu", "meta"):
        dtypes = CPU_FLOAT_DTYPES
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (like the feature map), got {t.device}"
        )


def check_tile_size(tile_h: int, tile_w: int) -> None:
    ints = (int, torch.SymInt)  # SymInt: tile sizes read off a tile batch while tracing
    if not (isinstance(tile_h, ints) and isinstance(tile_w, ints)) or tile_h < 1 or tile_w < 1:
        raise ValueError(f"tile size: expected two positive ints, got ({tile_h!r}, {tile_w!r})")


def check_corners(
    corners,
    num_active,
    *,
    height: int,
    width: int,
    tile_h: int,
    tile_w: int,
    device,
    values: bool = True,
) -> None:
    """Check the corner list, and with ``values`` (where possible) the corner values.

    Reading values costs one host sync on CUDA; the ops take ``check_values=False`` for corner
    lists sigec built itself (the runtime's edit path, which must not sync). Values are never read
    from fake tensors, in compiled code or during CUDA-graph capture.
    """
    check_tensor("corners", corners, rank=2, dtypes=(torch.int32,), device=device)
    if corners.shape[1] != 2:
        raise ValueError(f"corners: expected shape [M, 2] (rows y, x), got {tuple(corners.shape)}")
    if num_active is not None:
        check_tensor("num_active", num_active, rank=1, dtypes=(torch.int32,), device=device)
        if num_active.shape[0] != 1:
            raise ValueError(f"num_active: expected shape [1], got {tuple(num_active.shape)}")
    if not values or not _can_read_values(corners):
        return
    count = corners.shape[0]
    if num_active is not None:
        active = int(num_active.item())
        if not 0 <= active <= count:
            raise ValueError(f"num_active: expected a count in [0, {count}], got {active}")
        count = active
    if count == 0:
        return
    c = corners[:count]
    lo = torch.tensor([-2 * tile_h, -2 * tile_w], device=c.device, dtype=torch.int32)
    hi = torch.tensor([height + tile_h, width + tile_w], device=c.device, dtype=torch.int32)
    bad = ((c <= lo) | (c >= hi)).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        y, x = (int(v) for v in c[row].tolist())
        raise ValueError(
            f"corners: row {row} = (y={y}, x={x}) is out of range for a {tile_h}x{tile_w} tile "
            f"on a {height}x{width} map; each tile must overlap the map grown by one tile per side "
            f"({-2 * tile_h} < y < {height + tile_h}, {-2 * tile_w} < x < {width + tile_w})"
        )


def _can_read_values(t: torch.Tensor) -> bool:
    """Whether corner values may be inspected: not for fake tensors, compiled or captured code."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    if isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_activation(activation: str, slope: float) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(slope, float | int):
        raise TypeError(f"slope: expected a float, got {type(slope).__name__}")
    return ACTIVATIONS[activation]


def apply_activation(x: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    """Reference activations (the definition the Triton kernels must match)."""
    if activation == "identity":
        return x
    if activation == "silu":
        return torch.nn.functional.silu(x)
    if activation == "relu":
        return torch.relu(x)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(x, slope)
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")


# How reads outside the map are answered (gather and tile conv): zeros (a zero pad, and conv
# padding), or the pixel a reflection / replicate pad folded into the read would give.
PAD_MODES = {"zeros": 0, "reflect": 1, "replicate": 2}


def check_pad_mode(mode: str) -> int:
    if mode not in PAD_MODES:
        raise ValueError(f"pad_mode: expected one of {sorted(PAD_MODES)}, got {mode!r}")
    return PAD_MODES[mode]


def remap_index(i: torch.Tensor, n: int, mode: int) -> torch.Tensor:
    """Index ``i`` (any int tensor) of a map axis of ``n`` pixels read through a folded pad:
    reflected (``-1 -> 1``, ``n -> n - 2``) or clamped; clamped into the map after it (reads
    past a reflection's reach land on the border and only feed pixels no one writes)."""
    if mode == PAD_MODES["reflect"]:
        i = i.abs()
        i = torch.where(i >= n, 2 * (n - 1) - i, i)
    return i.clamp(0, n - 1)


def check_upsample(upsample) -> None:
    """``upsample`` (a kernel's read of its input through a nearest upsampling): an int >= 1."""
    if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
        raise ValueError(f"upsample: expected an integer factor >= 1, got {upsample!r}")


def tile_pixel_index(
    corners: torch.Tensor, num_active, tile_h: int, tile_w: int, height: int, width: int,
    pad_mode: int = 0,
):  # fmt: skip
    """Per tile pixel coordinates and validity, for the reference implementations.

    Returns:
        ys: [M, th, tw] int64 row of each tile pixel, clamped into the map (or remapped through
            the folded pad of ``pad_mode``).
        xs: [M, th, tw] int64 column, likewise.
        valid: [M, th, tw] bool, True where the pixel is read from the map (in zeros mode: lies
            in it) and the tile is active.
    """
    dev = corners.device
    oy = corners[:, 0].long()[:, None, None] + torch.arange(tile_h, device=dev)[None, :, None]
    ox = corners[:, 1].long()[:, None, None] + torch.arange(tile_w, device=dev)[None, None, :]
    oy, ox = torch.broadcast_tensors(oy, ox)
    if pad_mode:
        valid = torch.ones_like(oy, dtype=torch.bool)
    else:
        valid = (oy >= 0) & (oy < height) & (ox >= 0) & (ox < width)
    if num_active is not None:
        m = torch.arange(corners.shape[0], device=dev)[:, None, None]
        valid = valid & (m < num_active.to(dev).long())
    return remap_index(oy, height, pad_mode), remap_index(ox, width, pad_mode), valid


# Kernel arguments that change with the edit's size class, not with the layer: the tile capacity
# ``M``. Triton specializes integer arguments (== 1, divisible by 16), so a specialized ``M`` would
# compile each kernel again for classes whose capacity differs only in divisibility; these are
# passed as plain integers (``triton.jit(do_not_specialize=CAPACITY)``).
CAPACITY = ["M"]


def block_sizes(channels: int, pixels: int) -> tuple[int, int, int]:
    """Pick (BLOCK_C, BLOCK_P, num_warps) for a tile kernel: ~4K elements per program.

    A fixed heuristic rather than ``triton.autotune``: the tile kernels are memory-bound copies
    whose best block shape follows from the tile size, and autotuning under the CPU interpreter
    would run every config. The GPU performance work may replace this with measured configs.
    """
    import triton

    block_p = min(triton.next_power_of_2(max(pixels, 1)), 1024)
    block_c = max(1, min(triton.next_power_of_2(max(channels, 1)), 4096 // block_p))
    num_warps = 4 if block_c * block_p >= 2048 else 2
    return block_c, block_p, num_warps


# -- launches ------------------------------------------------------------------------------------

# inside ``precompiling``: the set of launch signatures already submitted (else None)
_PRECOMPILING = contextvars.ContextVar("sigec_precompiling", default=None)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``precompiling()`` only the kernel's compile for
    these arguments is started (nothing runs, nothing is written), once per signature."""
    seen = _PRECOMPILING.get()
    if seen is None:
        kernel[grid](*args, **kwargs)
        return
    key = _signature(kernel, args, kwargs)
    if key not in seen:  # Triton hashes the kernel's source on every submit: skip repeats
        seen.add(key)
        kernel.warmup(*args, grid=grid, **kwargs)


def _signature(kernel, args, kwargs) -> tuple:
    """What Triton may specialize a launch on, kept finer than Triton does (a repeat is only
    skipped where Triton would find the same kernel): tensors by dtype and 16-byte alignment,
    other arguments by value, except the unspecialized ones (``CAPACITY``), which never matter."""
    names = getattr(kernel, "arg_names", ())
    free = {n for n in CAPACITY if n in names}
    sig = []
    for i, a in enumerate(args):
        if i < len(names) and names[i] in free:
            sig.append(type(a).__name__)
        elif isinstance(a, torch.Tensor):
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            sig.append(a)
    return (id(kernel), tuple(sig), tuple(sorted(kwargs.items())))


def can_precompile() -> bool:
    """Whether this Triton compiles kernels on a thread pool (``AsyncCompileMode``, Triton >= 3.4;
    never under the CPU interpreter, which compiles nothing)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def precompiling(workers: int):
    """Inside: every tile-kernel launch (``launch``) only submits its compile to ``workers``
    threads; on exit all of them are compiled (a failed compile raises here). For a dry run of
    the edit graphs during warm-up: the kernels' outputs are not written, so whatever the dry run
    computes is garbage, and the real runs that follow find every kernel compiled (Triton's
    compiles are independent, so they overlap instead of running one after another at each
    kernel's first launch). Yields False (and changes nothing) where ``can_precompile()`` is
    False or ``workers < 1``."""
    if workers < 1 or not can_precompile():
        yield False
        return
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    with ThreadPoolExecutor(max_workers=workers) as pool, AsyncCompileMode(pool):
        token = _PRECOMPILING.set(set())
        try:
            yield True
        finally:
            _PRECOMPILING.reset(token)
