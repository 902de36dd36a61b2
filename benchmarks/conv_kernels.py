"""Sparse conv kernels per layer shape: gather -> cuDNN -> scatter against the fused Triton conv.

    python benchmarks/conv_kernels.py --out benchmarks/results/conv_kernels.json
    python benchmarks/conv_kernels.py --no-search   # the runtime's paths only, no block search

For conv shapes of DDPM church-256 (b1) and the SD 1.5 UNet (b2, 512x512), and edits of 1.2 / 5 /
30 / 100 % of the map (one blob, the runtime's tile sizes: 6 for 3x3, 4 for 1x1), each variant is
captured in a CUDA graph (10 calls) and its replay timed (median of 20, per call): "cudnn" is the
runtime's cuDNN path (gather with the folded GroupNorm + SiLU prologue per input part, ``cat``,
``F.conv2d`` on the tile batch, scatter with the residual), "fused" is ``tile_conv`` with the
launch heuristic's blocks (the prologue applied per tap), "tiles" is gather with the prologue ->
``tile_conv(input_tiles=True)`` on the gathered windows; where the split-K heuristic splits
the reduction (``split_k`` > 1), "fused_split" and "tiles_split" are the two with it, and
``--splits`` times "tiles" with each given split factor; "window" / "window_t3" are the
window conv (``stage_windows=True``: the prologue once per staged window pixel, one launch)
with the runtime's blocks / about three tiles per program. Unless ``--no-search``, every entry
of ``CONFIGS`` is tried to find the best blocks of "fused" for the shape. fp16, channels-last
maps and weights. Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sigec.kernels import gather, gather_parts, scatter, tile_conv_triton
from sigec.kernels.conv import _sm_count, block_config, split_k_for
from sigec.runtime.masks import active_tiles, blob_mask

# (model, N, input channels per part, C_out, kernel, stride, resolution, prologue, residual)
SHAPES = [
    ("ddpm", 1, (128,), 128, 3, 1, 256, True, True),
    ("ddpm", 1, (128,), 128, 3, 2, 256, False, False),
    ("ddpm", 1, (256,), 256, 3, 1, 64, True, True),
    ("ddpm", 1, (256, 128), 128, 3, 1, 128, True, False),
    ("ddpm", 1, (256, 128), 128, 1, 1, 128, False, True),
    ("sd", 2, (320,), 320, 3, 1, 64, True, True),
    ("sd", 2, (640,), 640, 3, 1, 32, True, True),
    ("sd", 2, (1280,), 1280, 3, 1, 16, True, True),
    ("sd", 2, (640, 320), 320, 3, 1, 64, True, False),
    ("sd", 2, (640, 320), 320, 1, 1, 64, False, True),
]
FRACTIONS = (0.012, 0.05, 0.30, 1.0)
CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
    (128, 128, 64, 8, 3), (64, 64, 32, 4, 4), (128, 128, 32, 8, 4), (64, 256, 64, 8, 3),
]  # fmt: skip


# the window conv's blocks: the runtime's (whole tiles in BLOCK_M = 32 rows, at least one),
# and ~3 tiles of 6x6 per program with narrower output blocks (so split-K still fits)
WINDOW_BLOCKS = {"window_ms": None, "window_t3_ms": (128, 32, 64, 4, 3)}


def graph_ms(fn, calls: int = 10, reps: int = 20) -> float:
    """Median per-call time of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return sorted(times)[len(times) // 2]


def run_shape(shape, fractions, search: bool = True, splits=()) -> list[dict]:
    model, n, parts_c, co, k, stride, res, prologue, residual = shape
    dev, dt, cl = "cuda", torch.float16, torch.channels_last
    cin = sum(parts_c)
    parts = [torch.randn(n, c, res, res, device=dev, dtype=dt).contiguous(memory_format=cl)
             for c in parts_c]  # fmt: skip
    weight = (torch.randn(co, cin, k, k, device=dev, dtype=dt) / (cin * k * k) ** 0.5).contiguous(
        memory_format=cl
    )
    bias = torch.randn(co, device=dev, dtype=dt)
    pad = k // 2
    ho = (res + 2 * pad - k) // stride + 1
    scale = torch.rand(n, cin, device=dev) + 0.5 if prologue else None
    shift = torch.randn(n, cin, device=dev) if prologue else None
    act = "silu" if prologue else "identity"
    res_map = torch.randn(n, co, ho, ho, device=dev, dtype=dt).contiguous(memory_format=cl)
    res_map = res_map if residual else None
    out = torch.zeros(n, co, ho, ho, device=dev, dtype=dt).contiguous(memory_format=cl)
    rows = []
    for fraction in fractions:
        mask = blob_mask(ho, ho, fraction, seed=0, num_blobs=1, device=dev)
        count = int(active_tiles(mask, k, stride, pad, 6 if k == 3 else 4).out_corners.shape[0])
        cap = 1 << max(count - 1, 0).bit_length()  # the runtime's power-of-two capacity
        ts = active_tiles(mask, k, stride, pad, 6 if k == 3 else 4, capacity=cap)

        def cudnn(ts=ts):
            batches, off = [], 0
            for p in parts:
                c = p.shape[1]
                batches.append(gather(p, ts.in_corners, *ts.in_tile,
                                      scale[:, off:off + c] if prologue else None,
                                      shift[:, off:off + c] if prologue else None, act, 0.01,
                                      False, ts.num_active, check_values=False))  # fmt: skip
                off += c
            batch = batches[0] if len(batches) == 1 else torch.cat(batches, 1)
            y = F.conv2d(batch, weight, bias, stride)
            scatter(out, y.contiguous(memory_format=cl), ts.out_corners, res_map, ts.num_active,
                    check_values=False)  # fmt: skip

        def fused(blocks=None, ts=ts, split=1, window=False):
            return lambda: tile_conv_triton(
                out, parts, weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile,
                [stride] * 2, [1, 1], scale, shift, act, 0.01, res_map, ts.num_active,
                check_values=False, blocks=blocks, split_k=split, stage_windows=window,
            )  # fmt: skip

        def tiles(ts=ts, split=1):
            def run():
                windows = gather_parts(gather, parts, ts.in_corners, *ts.in_tile, scale, shift,
                                       act, 0.01, ts.num_active, concat=False)  # fmt: skip
                tile_conv_triton(out, windows, weight, bias, ts.in_corners, ts.out_corners,
                                 *ts.out_tile, [stride] * 2, [1, 1], residual=res_map,
                                 num_active=ts.num_active, check_values=False, input_tiles=True,
                                 split_k=split)  # fmt: skip

            return run

        row = {"model": model, "n": n, "c_in": list(parts_c), "c_out": co, "kernel": k,
               "stride": stride, "res": res, "prologue": prologue, "residual": residual,
               "fraction": fraction, "tiles": count, "capacity": cap}  # fmt: skip
        row["cudnn_ms"] = round(graph_ms(cudnn), 4)
        row["fused_ms"] = round(graph_ms(fused()), 4)
        row["tiles_ms"] = round(graph_ms(tiles()), 4)
        if len(parts) <= 2:  # the window conv, split-K by the heuristic; 1 or ~3 tiles/program
            for key, blocks in WINDOW_BLOCKS.items():
                row[key] = round(graph_ms(fused(blocks, split=0, window=True)), 4)
        bm, bn, bk, _, _ = blocks = block_config(cin, co, cap * ts.out_tile[0] ** 2)
        row["fused_blocks"] = list(blocks)
        programs = -(-cap * ts.out_tile[0] * ts.out_tile[1] // bm) * -(-co // bn) * n
        steps = k * k * sum(-(-c // bk) for c in parts_c)
        row["split_k"] = split = split_k_for(programs, steps, bm * bn, _sm_count(out.device))
        if split > 1:
            row["fused_split_ms"] = round(graph_ms(fused(split=split)), 4)
            row["tiles_split_ms"] = round(graph_ms(tiles(split=split)), 4)
        if splits:
            row["programs"], row["steps"] = programs, steps
            row["tiles_splits_ms"] = {s: round(graph_ms(tiles(split=s)), 4) for s in splits
                                      if s <= steps}  # fmt: skip
        if not search:
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        tried = {}
        for cfg in CONFIGS:
            try:
                tried[str(list(cfg))] = round(graph_ms(fused(cfg)), 4)
            except Exception as e:  # e.g. out of shared memory
                tried[str(list(cfg))] = f"{type(e).__name__}"
        ok = {c: t for c, t in tried.items() if isinstance(t, float)}
        best = min(ok, key=ok.get)
        row["fused_best_ms"], row["fused_best_blocks"], row["fused_tried"] = ok[best], best, tried
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "fused_tried"}), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--no-search", action="store_true", help="skip the block search")
    p.add_argument(
        "--splits",
        type=int,
        nargs="*",
        default=[],
        help="also time the tiles path with each of these split-K factors",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/conv_kernels.json"))
    args = p.parse_args()
    rows = []
    with torch.no_grad():
        for shape in SHAPES:
            rows += run_shape(shape, args.fractions, search=not args.no_search, splits=args.splits)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
