"""Does a CUDA graph start running before ``cudaGraphLaunch`` returns? One graph of N small
kernels against the same kernels captured as K graphs replayed back to back.

    python benchmarks/graph_launch.py --out graph_launch.json

For each split: host time of the replay calls, and wall time from just before the first replay
(GPU idle, as after an edit's count sync) to the end of the last kernel (median of 50). If the GPU
waits for the whole launch, splitting hides most of the launch cost behind execution. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def measure(nodes: int, splits: int, reps: int = 50) -> dict:
    y = torch.zeros(64, 1024, device="cuda")  # in-place ops: no allocation inside the graphs
    graphs = []
    per = nodes // splits
    torch.cuda.synchronize()
    for _ in range(splits):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(per):
                y.mul_(0.5).add_(1.0)
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for g in graphs:
            g.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    # GPU time alone: events around a replay that was queued behind a long kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu = []
    for _ in range(10):
        torch.cuda._sleep(2_000_000)  # the launches below finish before the GPU gets to them
        start.record()
        for g in graphs:
            g.replay()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    med = {k: round(statistics.median(v), 3) for k, v in
           (("host_ms", host), ("wall_ms", wall), ("gpu_ms", gpu))}  # fmt: skip
    return {"nodes": 2 * per * splits, "graphs": splits, **med}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = [measure(n, k) for n in (100, 400, 800) for k in (1, 2, 4, 8, 16)]
    for r in rows:
        print(r)
    if args.out:
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
