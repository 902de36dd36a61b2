"""Which CUDA-graph nodes make a replay start late? Graphs of one node kind against the edit's
own graphs.

    python benchmarks/graph_nodes.py --out benchmarks/results/graph_nodes.json

For graphs of N nodes of one kind (ATen pointwise kernels, a Triton kernel, device-to-device
``copy_`` (memcpy nodes), ``zero_`` (memset nodes), and Triton kernels with a memcpy every 10th
node), and for the count graph and the 1.2 % edit graph of a real engine (``--model``): the
median wall time of ``replay(); synchronize()`` from an idle GPU against the GPU time of the same
replay queued behind a sleep kernel (launch cost hidden). ``wall - gpu`` is what the launch adds.
Never asserts; never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.suite import gpu_ms  # noqa: E402


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


def _node(kind: str, i: int, y: torch.Tensor, z: torch.Tensor) -> None:
    if kind == "aten":
        y.add_(1.0)
    elif kind == "triton" or (kind == "triton+memcpy" and i % 10):
        _add_one[(4,)](y, y.numel(), BLOCK=1024)
    elif kind in ("memcpy", "triton+memcpy"):
        z.copy_(y)
    elif kind == "memset":
        z.zero_()


def timed(replay) -> dict:
    """wall from an idle GPU, and GPU time with the launch hidden behind a sleep."""
    replay()
    torch.cuda.synchronize()
    wall = []
    for _ in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        replay()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
    w, g = statistics.median(wall), gpu_ms(replay, sleep_cycles=5_000_000)
    return {"wall_ms": round(w, 4), "gpu_ms": round(g, 4), "launch_adds_ms": round(w - g, 4)}


def kinds(nodes: int) -> list[dict]:
    y = torch.zeros(4096, device="cuda")
    z = torch.zeros(4096, device="cuda")
    rows = []
    for kind in ("aten", "triton", "memcpy", "memset", "triton+memcpy"):
        for i in range(3):
            _node(kind, i, y, z)  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(nodes):
                _node(kind, i, y, z)
        rows.append({"kind": kind, "nodes": nodes, **timed(g.replay)})
        print(rows[-1], flush=True)
    return rows


def engine_graphs(model: str) -> list[dict]:
    import sigec
    from sigec.models.configs import MODELS, build_on
    from sigec.runtime.masks import blob_mask

    net, inputs, kwargs = build_on(model, "cuda", torch.float16)
    x, rest = inputs[0], inputs[1:]
    config = sigec.SparseConfig(cuda_graphs=True, cost_model=False, **MODELS[model].sige_config)
    engine = sigec.compile(net, inputs, kwargs, config=config)
    engine.record(*inputs, **kwargs)
    mask = blob_mask(*x.shape[-2:], 0.012, seed=0, num_blobs=1, device="cuda")
    xe = torch.where(mask, torch.randn_like(x), x)
    with torch.no_grad():
        for _ in range(3):
            engine.edit(xe, *rest, mask=mask, **kwargs)
        path = engine.path
        rows = [{"kind": f"{model} count graph", **timed(path.count_graph.graph.replay)},
                {"kind": f"{model} edit graph 1.2 %",
                 **timed(path.entries[path.last.size_class].graph.replay)},
                {"kind": f"{model} whole edit", **timed(
                    lambda: engine.edit(xe, *rest, mask=mask, **kwargs))}]  # fmt: skip
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=300)
    p.add_argument("--model", default="ddpm-church-256")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/graph_nodes.json"))
    args = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rows": kinds(args.nodes)}  # fmt: skip
    if args.model:
        res["rows"] += engine_graphs(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
