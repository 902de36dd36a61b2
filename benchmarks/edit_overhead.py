"""Where an edit's wall time goes on the CUDA-graph path, beyond the sparse graph itself.

    python benchmarks/edit_overhead.py --model sd15-unet-512 --out benchmarks/results/overhead.json

Times (median of 20, ms, synchronised around each stage) of: the whole ``engine.edit``; its
input checks (flatten, mask, stale flags); the count graph with its host sync; the host work that
picks the capacity bucket; the edit graph's replay; and the output copy. Also a CPU-side profile
of one edit (top ops by self CPU time). fp16, 1.2 % one-blob edit, cost model off (the sparse
graph always runs). Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import sigec
from sigec.models.configs import MODELS, build_on
from sigec.runtime.masks import blob_mask


def wall_ms(fn, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm-church-256", choices=sorted(MODELS))
    p.add_argument("--fraction", type=float, default=0.012)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = p.parse_args()
    model, inputs, kwargs = build_on(args.model, "cuda", torch.float16)
    x, rest = inputs[0], inputs[1:]
    config = sigec.SparseConfig(cuda_graphs=True, cost_model=False,
                                **MODELS[args.model].sige_config)  # fmt: skip
    engine = sigec.compile(model, inputs, kwargs, config=config)
    engine.record(*inputs, **kwargs)
    mask = blob_mask(*x.shape[-2:], args.fraction, seed=0, num_blobs=1, device="cuda")
    xe = torch.where(mask, torch.randn_like(x), x)
    with torch.no_grad():
        for _ in range(3):
            engine.edit(xe, *rest, mask=mask, **kwargs)
        state = engine.slots["0"]
        runner = state.graphs
        flat = engine._flatten((xe, *rest), kwargs)
        res = {"model": args.model, "device": torch.cuda.get_device_name(),
               "fraction": args.fraction}  # fmt: skip
        res["edit_ms"] = wall_ms(lambda: engine.edit(xe, *rest, mask=mask, **kwargs))
        res["checks_ms"] = wall_ms(lambda: (engine._flatten((xe, *rest), kwargs),
                                            engine._edit_mask(state, flat, mask),
                                            engine._stale_flags(state, flat)))  # fmt: skip
        res["count_graph_and_sync_ms"] = wall_ms(lambda: runner._counts().tolist())
        res["edit_graph_replay_ms"] = wall_ms(lambda: runner.last.graph.replay())
        outs = runner.last.outs
        res["output_clone_ms"] = wall_ms(lambda: [o.clone() for o in outs])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.edit(xe, *rest, mask=mask, **kwargs)
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
        res["cpu_top_self_ms"] = {e.key[:80]: round(e.self_cpu_time_total / 1e3, 3) for e in top}
        res["cpu_ops_per_edit"] = sum(e.count for e in prof.key_averages())
    print(json.dumps(res, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
