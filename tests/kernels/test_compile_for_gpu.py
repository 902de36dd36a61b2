"""The conv and gather kernels compile for a Hopper GPU (sm_90), on a machine without one.

The interpreter runs a kernel's Python; only the compiler sees what a GPU build rejects (a
construct the code generator does not take, a shape the layouts cannot hold, too much shared
memory). Triton compiles ahead of time for a named target with the ptxas its wheel ships, so this
runs in CI: in a subprocess, because the test session imported the kernels for the interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

POINTERS = {"in_c_ptr": "*i32", "out_c_ptr": "*i32", "corners_ptr": "*i32",
            "count_ptr": "*i32", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "ws_ptr": "*fp32",
            "lock_ptr": "*i32"}  # fmt: skip
CONV = dict(HAS_X2=True, HAS_BIAS=True, HAS_RESIDUAL=True, HAS_COUNT=True, HAS_SCALE=True,
            HAS_SHIFT=True, ACT=1, IEEE=False, PAD_MODE=0, UP=1)  # fmt: skip
BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
# (kernel, data type of the maps, meta-parameters): the runtime's launches and the variants
CASES = [
    ("window_conv", "fp16", {**CONV, **BLOCKS, "SPLIT": 1, "STAGE": 64}),
    ("window_conv", "fp16", {**CONV, **BLOCKS, "SPLIT": 4, "STAGE": 64, "PAD_MODE": 1, "UP": 2}),
    ("window_conv", "fp32", {**CONV, **BLOCKS, "SPLIT": 2, "STAGE": 32, "IEEE": True}),
    ("tile_conv", "fp16", {**CONV, **BLOCKS, "BLOCK_M": 32, "TILED_IN": False, "SPLIT": 4}),
    (
        "tile_conv",
        "fp16",
        {
            **CONV,
            **BLOCKS,
            "TILED_IN": True,
            "SPLIT": 1,
            "HAS_SCALE": False,
            "HAS_SHIFT": False,
            "ACT": 0,
        },
    ),  # fmt: skip
    (
        "gather",
        "fp16",
        dict(
            HAS_COUNT=True,
            HAS_SCALE=True,
            HAS_SHIFT=True,
            ACT=1,
            ACT_FIRST=False,
            PAD_MODE=2,
            UP=2,
            BLOCK_C=64,
            BLOCK_P=64,
        ),
    ),  # fmt: skip
]


def _kernels():
    from sigec.kernels.conv import _tile_conv_kernel
    from sigec.kernels.gather import _gather_kernel
    from sigec.kernels.window_conv import _window_conv_kernel

    return {"window_conv": _window_conv_kernel, "tile_conv": _tile_conv_kernel,
            "gather": _gather_kernel}  # fmt: skip


def compile_all() -> None:
    """Compile every case for sm_90 (run without TRITON_INTERPRET); raises on the first failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = _kernels()
    for name, dtype, consts in CASES:
        kernel = kernels[name]
        sig = {}
        for arg in kernel.arg_names:
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = POINTERS.get(arg, f"*{dtype}")
            else:
                sig[arg] = "fp32" if arg == "slope" else "i32"
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4, "num_stages": 3})  # fmt: skip
        assert out.asm["cubin"], name
        print("compiled", name, dtype, consts.get("SPLIT", ""), flush=True)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", "from tests.kernels.test_compile_for_gpu "
                           "import compile_all; compile_all()"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == len(CASES), proc.stdout
