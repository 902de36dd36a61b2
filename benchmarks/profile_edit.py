"""Where an edit's time goes on the GPU: kernel launches, GPU busy time vs wall time, op classes.

    python benchmarks/profile_edit.py --model ddpm-church-256 --fraction 0.012 --out prof.json

Profiles one edit (after warm-up) with torch.profiler and reports the number of GPU kernels, the
summed kernel time, the wall time, and the top ops by self CUDA time. Never asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import sigec
from sigec.models.configs import MODELS, build_on
from sigec.runtime.masks import blob_mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm-church-256", choices=sorted(MODELS))
    p.add_argument("--fraction", type=float, default=0.012)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    model, inputs, kwargs = build_on(args.model, device, dtype)
    x, rest = inputs[0], inputs[1:]
    engine = sigec.compile(model, (x, *rest), kwargs,
                           config=sigec.SparseConfig(**MODELS[args.model].sige_config))  # fmt: skip
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
    by_name = collections.Counter()
    for e in kernels:
        by_name[e.name[:60]] += e.device_time / 1e3
    ops = prof.key_averages()
    syncs = sum(o.count for o in ops if o.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    result = {
        "model": args.model, "fraction": args.fraction,
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "wall_ms": round(wall_ms, 2), "gpu_busy_ms": round(busy_ms, 2),
        "kernels": len(kernels), "host_syncs": syncs,
        "top_kernels_ms": {k: round(v, 3) for k, v in by_name.most_common(12)},
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
