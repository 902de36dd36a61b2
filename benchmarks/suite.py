"""The standard benchmark (../shared/DESIGN.md): sigec edits against the strongest dense baselines.

One mask per size, repeated: this measures the steady state of one static edit shape and its
profile. Speed claims come from ``benchmarks/interactive.py`` (a new mask every edit).

    python benchmarks/suite.py --models ddpm-church-256 --out benchmarks/results/suite.json
    python benchmarks/plot_suite.py benchmarks/results/suite*.json   # speedup vs edit size

Per model, in one process on one card: dense eager and dense ``torch.compile(mode=
"reduce-overhead")`` (median CUDA-event time after warm-up, compile time), and sigec edits for
compact one-blob masks of 1.2 / 5 / 15 / 30 / 100 %, run from CUDA graphs (``--eager``: also
without; ``--bf16``: also in bf16; ``--conv-ab``: also with the other conv kernel; ``--also
KEY=VALUE``: also with a SparseConfig field changed): median edit time, ratios to both dense
baselines, PSNR against the dense model on the edited input (same dtype), max abs error outside
the mask, executed MACs, cache bytes per slot, capture counts. At 1.2 % one edit of each variant
(and at ``--profile-at``: 30 and 100 %) is profiled: kernels launched, GPU busy time vs wall
time, time per op class; and every graph-path edit's time is split into the replayed graph alone,
the count graph with its sync, and the host rest. Results are merged
into ``--out`` (one entry per model), so models can run in separate processes. Never asserts;
never run by the tests.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigec  # noqa: E402
from benchmarks.edit_latency import psnr, time_ms  # noqa: E402
from sigec.models.configs import MODELS, build_on  # noqa: E402
from sigec.runtime.masks import blob_mask  # noqa: E402

STANDARD = ("ddpm-church-256", "sd15-unet-512", "sd15-unet-512x1024", "gaugan-cityscapes")
FRACTIONS = (0.012, 0.05, 0.15, 0.30, 1.0)

# kernel name fragment -> op class (first match wins)
OP_CLASSES = (
    ("sigec gather", ("gather_kernel",)),
    ("sigec scatter", ("scatter_kernel",)),
    ("sigec restore", ("restore_kernel",)),
    ("sigec tile conv (fused)", ("tile_conv_kernel",)),
    ("layout (NCHW<->NHWC)", ("nchwtonhwc", "nhwctonchw")),
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("conv (cuDNN)", ("conv", "xmma_fprop", "implicit", "cudnn", "fprop")),
    ("gemm", ("gemm", "cutlass", "xmma", "matmul", "splitk", "nvjet")),
    ("triton (compiled)", ("triton_",)),
    ("copy / index", ("copy", "index", "gather", "scatter", "cat", "fill")),
    ("elementwise / reduce", ("elementwise", "vectorized", "reduce", "norm")),
)


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


def op_class(name: str) -> str:
    low = name.lower()
    for cls, frags in OP_CLASSES:
        if any(f.lower() in low for f in frags):
            return cls
    return "other"


def profile_call(fn) -> dict:
    """Kernels, GPU busy time and wall time of one call, with time per op class."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_class, by_name = collections.Counter(), collections.Counter()
    for e in kernels:
        by_class[op_class(e.name)] += e.device_time / 1e3
        by_name[e.name[:80]] += e.device_time / 1e3
    syncs = sum(o.count for o in prof.key_averages()
                if o.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))  # fmt: skip
    try:  # a profiler without GPU timestamps must not cost the model's results
        when = timeline(prof.events(), kernels)
    except Exception as e:
        when = {"error": repr(e)}
    return {
        "timeline": when,
        "kernels": len(kernels),
        "gpu_busy_ms": round(sum(e.device_time for e in kernels) / 1e3, 3),
        "wall_ms_profiled": round(wall, 3),
        "host_syncs": syncs,
        "ms_by_op_class": {k: round(v, 3) for k, v in by_class.most_common()},
        "top_kernels_ms": {k: round(v, 3) for k, v in by_name.most_common(15)},
    }


def cache_by_kind(slot) -> dict:
    """Bytes of a slot's buffers by kind: cache__ / work__ maps, static__ values, norm__
    statistics, input__ records, anything else."""
    kinds = collections.Counter()
    for key, buf in slot.named_buffers():
        kind = key.split("__")[0] if "__" in key else "other"
        kinds[kind] += buf.numel() * buf.element_size()
    return dict(kinds)


def timeline(events, kernels) -> dict:
    """When the GPU worked during one profiled call: from the call's first host op to the last
    kernel's end, the GPU gaps over 20 us (where, after which kernel), and the host time of the
    runtime calls (graph launches, syncs, copies)."""
    if not kernels:
        return {}
    t0 = min(e.time_range.start for e in events)
    ks = sorted(kernels, key=lambda e: e.time_range.start)
    gaps, end = [], ks[0].time_range.end
    for prev, k in zip(ks, ks[1:], strict=False):
        end = max(end, prev.time_range.end)
        if k.time_range.start - end > 20:
            gaps.append((round((end - t0) / 1e3, 3), round((k.time_range.start - end) / 1e3, 3),
                         prev.name[:60]))  # fmt: skip
    api = collections.defaultdict(list)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
            api[e.name].append(((e.time_range.start - t0) / 1e3, e.cpu_time_total / 1e3))
    return {
        "first_kernel_ms": round((ks[0].time_range.start - t0) / 1e3, 3),
        "last_kernel_end_ms": round((max(k.time_range.end for k in ks) - t0) / 1e3, 3),
        "gpu_gaps_over_20us": {
            "count": len(gaps),
            "ms": round(sum(g[1] for g in gaps), 3),
            "largest (at ms, gap ms, after)": sorted(gaps, key=lambda g: -g[1])[:8],
        },  # fmt: skip
        "runtime_calls (at ms, host ms)": {
            k: [(round(a, 3), round(b, 3)) for a, b in v[:6]] for k, v in api.items()
        },
    }


def host_breakdown(fn, path, device, rep: int) -> dict:
    """Where one static-path edit's time goes (CUDA events, same process, same edit): the whole
    edit, the graph the edit replayed alone, the count graph with its host sync alone; "host"
    is the rest (checks, input copies, output copy, launch gaps)."""
    last = path.last
    graph = path.dense_graph.graph if last.ran_dense else path.entries[last.size_class].graph
    edit = time_ms(fn, 3, rep, device)
    replay = time_ms(graph.replay, 3, rep, device)
    count = time_ms(lambda: (path.count_graph(), path.reader(path.head)), 3, rep, device)
    count_gpu = gpu_ms(path.count_graph.graph.replay)
    fn()  # leave the engine as the edit left it
    compiled = getattr(path._count_fn, "compiled", None)
    return {"edit": round(edit, 4), "graph_replay": round(replay, 4),
            "count_graph_and_sync": round(count, 4),
            "count_graph_gpu": round(count_gpu, 4) if count_gpu is not None else None,
            "count_graph_compiled": compiled not in (None, False),
            "host_rest": round(edit - replay - count, 4)}  # fmt: skip


def gpu_ms(replay, reps: int = 10, sleep_cycles: int = 2_000_000) -> float:
    """GPU time of ``replay`` alone: queued behind a sleep kernel, so its launch is hidden."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda._sleep(sleep_cycles)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_model(name: str, args) -> dict:
    device = torch.device("cuda")
    dtype = torch.float16
    model, inputs, kwargs = build_on(name, device, dtype)
    x, rest = inputs[0], inputs[1:]
    out = {"model": name, "dtype": "fp16", "device": torch.cuda.get_device_name(device),
           "torch": torch.__version__, "batch": int(x.shape[0]),
           "input": list(x.shape), "variants": {}}  # fmt: skip
    rep = args.repeat
    with torch.no_grad():
        out["dense_eager_ms"] = time_ms(lambda: model(x, *rest, **kwargs), 3, rep, device)
        t0 = time.perf_counter()
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):
            compiled(x, *rest, **kwargs)
        torch.cuda.synchronize()
        out["dense_compiled_compile_s"] = round(time.perf_counter() - t0, 1)
        out["dense_compiled_ms"] = time_ms(lambda: compiled(x, *rest, **kwargs), 3, rep, device)
        out["dense_compiled_profile"] = profile_call(lambda: compiled(x, *rest, **kwargs))
        print(name, {k: v for k, v in out.items() if "profile" not in k}, flush=True)

        h, w = x.shape[-2:]
        g = torch.Generator().manual_seed(10_000)
        new = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
        edits = []
        for fraction in args.fractions:
            mask = blob_mask(h, w, fraction, seed=0, num_blobs=1, device=device)
            x_edit = torch.where(mask, new, x)
            edits.append((fraction, mask, x_edit, _sample(model(x_edit, *rest, **kwargs))))

        variants = [("sigec-graphs", dtype, True, args.channels_last)]
        if args.eager:
            variants.insert(0, ("sigec-eager", dtype, False, args.channels_last))
        if args.layout_ab:  # the other memory format too
            variants.append(("sigec-graphs-" + ("nchw" if args.channels_last else "nhwc"), dtype,
                             True, not args.channels_last))  # fmt: skip
        if args.bf16:
            variants.append(("sigec-graphs-bf16", torch.bfloat16, True, args.channels_last))
        other = "cudnn" if args.conv_kernel != "cudnn" else "auto"
        variants = [(*v, args.conv_kernel) for v in variants]
        variants = [(*v, {}) for v in variants]
        if args.conv_ab:  # the other conv kernel too
            variants.append((f"sigec-graphs-{other}", dtype, True, args.channels_last, other, {}))
        for extra in args.also:  # a SparseConfig override, e.g. dense_regions=eager
            key, _, text = extra.partition("=")
            try:  # True / False / numbers; anything else is a string
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            variants.append((f"sigec-graphs-{key}={text}", dtype, True, args.channels_last,
                             args.conv_kernel, {key: value}))  # fmt: skip
        for vname, vdtype, graphs, cl, conv_kernel, override in variants:
            m, vin, vkw = (model, inputs, kwargs) if vdtype == dtype else build_on(
                name, device, vdtype)  # fmt: skip
            config = sigec.SparseConfig(cuda_graphs=graphs, norm_stats=args.norm_stats,
                                        channels_last=cl, conv_kernel=conv_kernel,
                                        **{**MODELS[name].sige_config, **override})  # fmt: skip
            t0 = time.perf_counter()
            engine = sigec.compile(m, vin, vkw, config=config)
            compile_s = time.perf_counter() - t0
            engine.record(*vin, **vkw)
            v = {"compile_s": round(compile_s, 1), "norm_stats": args.norm_stats,
                 "channels_last": cl, "conv_kernel": conv_kernel, "override": override,
                 "rows": []}  # fmt: skip
            vrest = vin[1:]
            for fraction, mask, x_edit, want in edits:
                xe = x_edit.to(vdtype)
                fn = lambda xe=xe, mask=mask, e=engine, r=vrest, kw=vkw: e.edit(
                    xe, *r, mask=mask, **kw
                )
                t0 = time.perf_counter()
                got = _sample(fn())
                first_s = time.perf_counter() - t0  # includes capture for a new bucket
                st = engine.stats()
                outside = torch.nn.functional.interpolate(
                    mask[None, None].float(), size=got.shape[-2:]
                )[0, 0] == 0  # fmt: skip
                diff = got.float() - want.float()
                row = {
                    "fraction": fraction,
                    "edit_ms": time_ms(fn, 3, rep, device),
                    "first_edit_s": round(first_s, 2),
                    "psnr_db": round(psnr(got.float(), want.float()), 2),
                    "max_err_outside_mask": diff[..., outside].abs().max().item()
                    if outside.any() else 0.0,
                    "macs_ratio": round(st["dense_macs"] / st["sparse_macs"], 2),
                    "ran_dense": st["ran_dense"],
                }  # fmt: skip
                row["speedup_vs_eager"] = round(out["dense_eager_ms"] / row["edit_ms"], 2)
                row["speedup_vs_compiled"] = round(out["dense_compiled_ms"] / row["edit_ms"], 2)
                path = engine.path
                if getattr(path, "count_graph", None) is not None and graphs:
                    row["breakdown_ms"] = host_breakdown(fn, path, device, rep)
                    row["size_class"] = st["size_class"]
                if fraction in args.profile_at or fraction == args.fractions[0]:
                    row["profile"] = profile_call(fn)
                v["rows"].append(row)
                print(name, vname, {k: r for k, r in row.items() if k != "profile"}, flush=True)
            v["cache_bytes"] = st["cache_bytes"]
            v["live_bytes"] = st["live_bytes"]
            v["cache_bytes_by_kind"] = cache_by_kind(engine.slots["0"])
            v["graphs"] = st["graphs"]
            v["warmup"] = st["warmup"]
            out["variants"][vname] = v
            del engine
            torch.cuda.empty_cache()
    out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(STANDARD), choices=sorted(MODELS))
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--norm-stats", default="cached", choices=["cached", "incremental"])
    p.add_argument("--bf16", action="store_true", help="also run sigec in bf16")
    p.add_argument("--eager", action="store_true", help="also run sigec without CUDA graphs")
    p.add_argument("--nchw", dest="channels_last", action="store_false",
                   help="NCHW maps (default: channels-last, SparseConfig's default)")  # fmt: skip
    p.add_argument("--layout-ab", action="store_true", help="also run the other memory format")
    p.add_argument(
        "--conv-kernel",
        default="auto",
        choices=["auto", "fused", "cudnn"],
        help="SparseConfig.conv_kernel of the main variant",
    )
    p.add_argument("--conv-ab", action="store_true", help="also run the other conv kernel")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also run a variant with this string SparseConfig field changed",
    )
    p.add_argument("--profile-at", type=float, nargs="*", default=[0.30, 1.0],
                   help="also profile an edit at these fractions")  # fmt: skip
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/suite.json"))
    args = p.parse_args()
    for name in args.models:
        try:
            result = run_model(name, args)
        except Exception as e:  # keep the other models' results
            result = {"model": name, "error": f"{type(e).__name__}: {e}"}
            print(name, "failed:", result["error"], flush=True)
        merged = json.loads(args.out.read_text()) if args.out.exists() else {"results": []}
        merged["results"] = [r for r in merged["results"] if r["model"] != name] + [result]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=1) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
