"""Which code launches an edit's GPU time: kernels by the op chain that launched them, and the
ops each line of sigec dispatches.

    python benchmarks/profile_sites.py --models sd15-unet-512 --out sites.json

CUDA-graph replays hide who launched what, so this profiles one edit of the same static-shape
configuration run *without* graphs (``tile_lists="grid"``, the kernels a graph replays):
``by_op`` charges every kernel's CUDA time to the chain of ops above its launch
(``sigec::gather > aten::contiguous > aten::clone > aten::copy_``); ``dispatched`` counts the
ATen / sigec ops each ``sigec/`` line dispatches in one more edit (``file:line:function [op]``).
Never asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import sigec
from sigec.models.configs import MODELS, build_on
from sigec.runtime.masks import blob_mask


def op_of(ev, depth: int = 4) -> str:
    """The op chain above a launch, outermost first (``aten::cudnn_convolution > aten::copy_``):
    runtime / driver API events (``cudaLaunchKernel``, ``cuLaunch...``) are left out, and so are
    Python frames."""
    chain = []
    while ev is not None and len(chain) < depth:
        if not ev.name.startswith("cu") and ".py(" not in ev.name:
            chain.append(ev.name)
        ev = ev.cpu_parent
    return " > ".join(reversed(chain))


class _Sites(TorchDispatchMode):
    """Counts the ATen / sigec ops an edit dispatches, by the innermost ``sigec/`` frame."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        site = "(outside)"
        for f in reversed(traceback.extract_stack()):
            if "/sigec/" in f.filename and "benchmarks" not in f.filename:
                site = f"{f.filename.split('/sigec/')[-1]}:{f.lineno}:{f.name}"
                break
        self.count[f"{site} [{func}]"] += 1
        return func(*args, **(kwargs or {}))


def profile_sites(name: str, fraction: float, overrides: dict) -> dict:
    device, dtype = torch.device("cuda"), torch.float16
    model, inputs, kwargs = build_on(name, device, dtype)
    x, rest = inputs[0], inputs[1:]
    cfg = {**MODELS[name].sige_config, "tile_lists": "grid", **overrides}
    engine = sigec.compile(model, (x, *rest), kwargs, config=sigec.SparseConfig(**cfg))
    engine.record(x, *rest, **kwargs)
    mask = blob_mask(*x.shape[-2:], fraction, seed=0, num_blobs=1, device=device)
    x_edit = torch.where(mask, torch.randn_like(x), x)
    for _ in range(3):  # compiles regions and expressions
        engine.edit(x_edit, *rest, mask=mask, **kwargs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.edit(x_edit, *rest, mask=mask, **kwargs)
        torch.cuda.synchronize()
    with _Sites() as sites:  # the ops each line dispatches (this works on any profiler version)
        engine.edit(x_edit, *rest, mask=mask, **kwargs)
        torch.cuda.synchronize()
    by_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU or not ev.kernels:
            continue
        # kernels belong to the innermost op that launched them: skip ops whose child did
        if any(child.kernels for child in ev.cpu_children):
            continue
        ms = sum(k.duration for k in ev.kernels) / 1e3
        op = op_of(ev)
        by_op[op][0] += ms
        by_op[op][1] += len(ev.kernels)

    def top(d, n):
        rows = sorted(d.items(), key=lambda kv: -kv[1][0])[:n]
        return [{"where": k, "ms": round(v[0], 4), "kernels": v[1]} for k, v in rows]

    return {
        "model": name, "fraction": fraction, "config": {k: str(v) for k, v in cfg.items()},
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "kernels": sum(v[1] for v in by_op.values()),
        "gpu_ms": round(sum(v[0] for v in by_op.values()), 3),
        "by_op": top(by_op, 40),
        "dispatched": dict(sites.count.most_common(80)),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sd15-unet-512"], choices=sorted(MODELS))
    p.add_argument("--fraction", type=float, default=0.012)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = [profile_sites(m, args.fraction, {}) for m in args.models]
    for r in results:
        print(r["model"], r["kernels"], "kernels", r["gpu_ms"], "ms")
        for row in r["by_op"][:25]:
            print(f"  {row['ms']:8.3f} ms {row['kernels']:5d}  {row['where']}")
        for where, n in list(r["dispatched"].items())[:40]:
            print(f"  {n:5d}  {where}")
    if args.out:
        args.out.write_text(json.dumps({"results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
