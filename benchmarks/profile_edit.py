"""Where an edit's time goes on the GPU: kernel launches, GPU busy time vs wall time, op classes.

    python benchmarks/profile_edit.py --model ddpm-church-256 --fraction 0.012 --out prof.json
    python benchmarks/profile_edit.py --graphs --also conv_kernel=cudnn   # another path, A/B

Profiles one edit (after warm-up) with torch.profiler and reports the number of GPU kernels, the
summed kernel time, the wall time, the top kernels by GPU time and the kernels and GPU time per
op class (``op_class``: gather, scatter, Triton conv, cuDNN conv, attention, restore, inductor
expressions, other ATen ops, copies). ``--graphs``: the engine runs its edits as CUDA graphs (as
the interactive benchmark does; the profiler still sees every kernel of a replay). Never asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigec  # noqa: E402
from benchmarks.edit_latency import config_override, sige_config_with  # noqa: E402
from sigec.models.configs import MODELS, build_on  # noqa: E402
from sigec.runtime.masks import blob_mask  # noqa: E402

# (op class, substrings of a kernel's name that put it there), first match wins
OP_CLASSES = [
    ("tile_conv (Triton)", ("_tile_conv_kernel",)),
    ("gather", ("_gather",)),
    ("scatter", ("_scatter",)),
    ("restore", ("_restore",)),
    ("inductor expression", ("triton_",)),  # before "conv": inductor names them by their ops
    ("conv (cuDNN)", ("fprop", "xmma", "implicit_gemm", "nchwToNhwc", "nhwcToNchw", "conv")),
    ("attention", ("fmha", "flash", "attention", "softmax")),
    ("matmul", ("gemm", "nvjet", "sm90_", "sm80_", "cutlass", "cublas")),
    ("norm", ("Moments", "norm", "Norm")),
    ("copy / fill", ("copy", "Memcpy", "Memset", "fill", "CatArray")),
]


def op_class(kernel_name: str) -> str:
    for cls, keys in OP_CLASSES:
        if any(k in kernel_name for k in keys):
            return cls
    return "other ATen / elementwise"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm-church-256", choices=sorted(MODELS))
    p.add_argument("--fraction", type=float, default=0.012)
    p.add_argument("--graphs", action="store_true", help="edits as CUDA graphs")
    p.add_argument("--also", type=config_override, action="append", default=[], metavar="KEY=VALUE",
                   help="a SparseConfig field changed")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    model, inputs, kwargs = build_on(args.model, device, dtype)
    x, rest = inputs[0], inputs[1:]
    config = sigec.SparseConfig(cuda_graphs=args.graphs,
                                **sige_config_with(args.model, dict(args.also)))  # fmt: skip
    engine = sigec.compile(model, (x, *rest), kwargs, config=config)
    engine.record(x, *rest, **kwargs)
    mask = blob_mask(*x.shape[-2:], args.fraction, seed=0, num_blobs=1, device=device)
    x_edit = torch.where(mask, torch.randn_like(x), x)
    for _ in range(3):
        engine.edit(x_edit, *rest, mask=mask, **kwargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.edit(x_edit, *rest, mask=mask, **kwargs)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    by_name, by_class, count_by_class = (collections.Counter() for _ in range(3))
    for e in kernels:
        by_name[e.name[:60]] += e.device_time / 1e3
        by_class[op_class(e.name)] += e.device_time / 1e3
        count_by_class[op_class(e.name)] += 1
    ops = prof.key_averages()
    syncs = sum(o.count for o in ops if o.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    result = {
        "model": args.model, "fraction": args.fraction, "graphs": args.graphs,
        "config_changes": dict(args.also),
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "wall_ms": round(wall_ms, 2), "gpu_busy_ms": round(busy_ms, 2),
        "kernels": len(kernels), "host_syncs": syncs,
        "top_kernels_ms": {k: round(v, 3) for k, v in by_name.most_common(12)},
        "op_classes": {c: {"kernels": count_by_class[c], "ms": round(t, 3)}
                       for c, t in by_class.most_common()},
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
