"""The interactive benchmark: a painting session, every edit a new mask, beside the dense model.

    python -m benchmarks.interactive --models ddpm-church-256 gaugan-cityscapes \\
        --slots 1 10 50 --warm-process --out benchmarks/results/interactive_H200.json
    python -m benchmarks.plot_interactive benchmarks/results/interactive_H200.json

Per model, in one process on one card (fp16): dense eager and dense ``torch.compile(mode=
"reduce-overhead")`` (compile time, median call), then sigec with ``cuda_graphs=True``: compile
time, record time with its warm-up (and warm-up's own breakdown: size classes, count graph,
dense graph, class graphs and cost model), the first edit after it, then a seeded session
(``sigec.runtime.masks.edit_sequence``: strokes and blobs of 0.5-5 % of the image at random
places, most edits committed, some not; GauGAN's edits change the label of the masked region).
Every edit is timed on the host around a synchronize (what a user waits for), and the compiled
dense model is timed on the same edited input right after it. Reported: per-edit wall time
p50 / p95 / max of both, the speedup at p50, each edit against its size class's repeated-mask
time (the same edit replayed: what the suite measures), graphs held and captured during edits,
commit time, peak memory, cache bytes, PSNR of the last edit against the dense model on the
final image. ``--variant KEY=VALUE[,KEY=VALUE]`` runs the same session again on other
SparseConfig changes in the same process, beside the same dense baseline (results under
"variants": a comparison free of the few % the baseline moves between processes and cards).
``--slots`` records more slots on the warmed engine (per-slot set-up time), and a second
process repeats compile + warm-up with the disk caches this one filled (``--warm-only``).
Never asserts; never run by the tests. Runs on the CPU too (tiny models, no compiled baseline),
for a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigec  # noqa: E402
from benchmarks.edit_latency import config_override, psnr, sige_config_with, time_ms  # noqa: E402
from sigec.models.configs import MODELS, build_on  # noqa: E402
from sigec.runtime.masks import edit_sequence  # noqa: E402

STANDARD = ("ddpm-church-256", "sd15-unet-512", "sd15-unet-512x1024", "gaugan-cityscapes")


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def pct(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summary(values) -> dict:
    return {"p50": round(pct(values, 0.5), 4), "p95": round(pct(values, 0.95), 4),
            "max": round(max(values), 4), "mean": round(statistics.fmean(values), 4)}  # fmt: skip


def is_label_map(name: str) -> bool:
    return name.startswith("gaugan")


def edited(name: str, x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """The session's edit of ``x`` inside ``mask``: new noise (diffusion inputs) or, for a label
    map, the region set to one random class."""
    g = torch.Generator().manual_seed(seed)
    m = mask.to(x.device)
    if is_label_map(name):
        c = int(torch.randint(x.shape[1], (1,), generator=g))
        onehot = torch.zeros_like(x)
        onehot[:, c] = 1
        return torch.where(m, onehot, x)
    noise = torch.randn(x.shape, generator=g).to(x)
    return torch.where(m, noise, x)


def build_engine(name, model, inputs, kwargs, overrides):
    config = sigec.SparseConfig(cuda_graphs=True, **sige_config_with(name, overrides))
    t0 = time.perf_counter()
    engine = sigec.compile(model, inputs, kwargs, config=config)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.record(*inputs, **kwargs)
    record_s = time.perf_counter() - t0
    return engine, compile_s, record_s


def warm_only(name: str, device, dtype, overrides) -> dict:
    """Compile + record (with warm-up) + one edit, nothing else: run in a second process, it
    measures start-up with the disk caches (inductor, Triton) the first process filled."""
    model, inputs, kwargs = build_on(name, device, dtype)
    engine, compile_s, record_s = build_engine(name, model, inputs, kwargs, overrides)
    x = inputs[0]
    mask = edit_sequence(*x.shape[-2:], 1, seed=99)[0]["mask"].to(device)
    xe = edited(name, x, mask, 1)
    first_ms, _ = wall_ms(lambda: engine.edit(xe, *inputs[1:], mask=mask, **kwargs), device)
    st = engine.stats()
    return {"compile_s": round(compile_s, 2), "record_with_warmup_s": round(record_s, 2),
            "warmup": st["warmup"], "first_edit_ms": round(first_ms, 3)}  # fmt: skip


def run_model(name: str, args) -> dict:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, inputs, kwargs = build_on(name, device, dtype)
    x0, rest = inputs[0], inputs[1:]
    out = {"model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "input": list(x0.shape), "edits": args.edits, "seed": args.seed,
           "overrides": args.also}  # fmt: skip
    overrides = dict(args.also)
    with torch.no_grad():
        dense = lambda x: model(x, *rest, **kwargs)  # noqa: E731
        out["dense_eager_ms"] = time_ms(lambda: dense(x0), 2, 10, device)
        compiled = None
        if device.type == "cuda":
            t0 = time.perf_counter()
            compiled = torch.compile(model, mode="reduce-overhead")
            for _ in range(3):
                compiled(x0, *rest, **kwargs)
            _sync(device)
            out["dense_compiled_compile_s"] = round(time.perf_counter() - t0, 2)
            out["dense_compiled_ms"] = time_ms(lambda: compiled(x0, *rest, **kwargs), 3, 20,
                                               device)  # fmt: skip
        print(name, {k: v for k, v in out.items() if k.startswith("dense")}, flush=True)

        info, res, engine, record_s = sigec_session(name, model, inputs, kwargs, overrides, args,
                                                    device, dense, compiled)  # fmt: skip
        out["sigec"], out["session"] = info, res
        for variant in args.variant:  # the same session on other configurations, same baseline
            changes = {**overrides, **dict(variant)}
            v_info, v_res, v_engine, _ = sigec_session(name, model, inputs, kwargs, changes, args,
                                                       device, dense, compiled)  # fmt: skip
            out.setdefault("variants", []).append({"overrides": sorted(changes.items()),
                                                   "sigec": v_info, "session": v_res})  # fmt: skip
            del v_engine
            if device.type == "cuda":
                torch.cuda.empty_cache()

        # per-slot set-up on the warmed engine (one slot per timestep of a trajectory)
        if args.slots:
            slots = {"warmup_and_first_record_s": round(record_s, 3), "record_s": []}
            n = max(args.slots)
            for i in range(1, n):
                t = time.perf_counter()
                engine.record(*_slot_inputs(inputs, i), slot=i, **kwargs)
                _sync(device)
                slots["record_s"].append(round(time.perf_counter() - t, 4))
            for k in sorted(set(args.slots)):
                slots[f"total_s_{k}_slots"] = round(record_s + sum(slots["record_s"][: k - 1]),
                                                    3)  # fmt: skip
            slots["cache_bytes_per_slot"] = engine.stats(slot=n - 1)["cache_bytes"]
            slots["graphs_after"] = engine.stats()["graphs"]
            out["slots"] = slots
            print(name, "slots", {k: v for k, v in slots.items() if k != "record_s"}, flush=True)
        if device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def sigec_session(name, model, inputs, kwargs, overrides, args, device, dense, compiled):
    """Compile, record (with warm-up) and run the seeded session on one sigec configuration,
    timing the compiled dense model on every edited input beside it; returns (compile and
    warm-up report, session results, engine, record seconds)."""
    x0, rest = inputs[0], inputs[1:]
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    engine, compile_s, record_s = build_engine(name, model, inputs, kwargs, overrides)
    st = engine.stats()
    info = {"compile_s": round(compile_s, 2),
                    "record_with_warmup_s": round(record_s, 2), "warmup": st["warmup"],
                    "cache_bytes": st["cache_bytes"],
                    "live_bytes": st["live_bytes"]}  # fmt: skip
    print(name, "sigec", info["compile_s"], record_s, flush=True)

    # the session
    h, w = x0.shape[-2:]
    session = edit_sequence(h, w, args.edits, seed=args.seed, fractions=tuple(args.area))
    current = x0
    rows, sig, den = [], [], []
    first = None
    for e in session:
        mask = e["mask"].to(device)
        xe = edited(name, current, mask, args.seed * 1000 + e["index"])
        ms, got = wall_ms(lambda xe=xe, mask=mask: engine.edit(xe, *rest, mask=mask,
                                                               **kwargs), device)  # fmt: skip
        st = engine.stats()
        row = {"index": e["index"], "kind": e["kind"], "fraction": round(e["fraction"], 5),
               "area": round(float(mask.float().mean()), 5), "edit_ms": round(ms, 4),
               "size_class": st["size_class"], "ran_dense": st["ran_dense"],
               "macs_ratio": round(st["macs_ratio"], 3) if st["macs_ratio"] else None,
               "commit": e["commit"]}  # fmt: skip
        if first is None:
            first = row["edit_ms"]
        if compiled is not None:
            row["dense_compiled_ms"] = round(wall_ms(lambda xe=xe: compiled(xe, *rest,
                                             **kwargs), device)[0], 4)  # fmt: skip
            den.append(row["dense_compiled_ms"])
        if e["commit"]:
            row["commit_ms"] = round(wall_ms(engine.commit, device)[0], 4)
            current = xe
        last_got, last_x = _sample(got), xe
        sig.append(row["edit_ms"])
        rows.append(row)
    res = {"first_edit_ms": first, "edit_ms": summary(sig), "rows": rows}
    commits = [r["commit_ms"] for r in rows if "commit_ms" in r]
    res["commit_ms"] = summary(commits) if commits else None
    if den:
        res["dense_compiled_per_edit_ms"] = summary(den)
        res["speedup_p50"] = round(pct(den, 0.5) / pct(sig, 0.5), 3)
        ratios = [d / s for d, s in zip(den, sig, strict=True)]
        res["speedup_per_edit"] = {"min": round(min(ratios), 3),
                                   "p05": round(pct(ratios, 0.05), 3),
                                   "p50": round(pct(ratios, 0.5), 3)}  # fmt: skip
    # each size class the session used, its first edit replayed (the repeated-mask time)
    repeated = {}
    for e, row in zip(session, rows, strict=True):
        s = row["size_class"]
        if s in repeated:
            continue
        mask = e["mask"].to(device)
        xe = edited(name, current, mask, 7)
        repeated[s] = round(time_ms(lambda xe=xe, mask=mask: engine.edit(
            xe, *rest, mask=mask, **kwargs), 2, 10, device), 4)  # fmt: skip
    res["repeated_mask_ms_by_class"] = repeated
    if device.type == "cuda":  # where the median edit's time goes (its class replayed)
        median = sorted(rows, key=lambda r: r["edit_ms"])[len(rows) // 2]
        e = session[median["index"]]
        mask = e["mask"].to(device)
        xe = edited(name, current, mask, 7)
        res["breakdown_ms"] = breakdown(
            engine, lambda: engine.edit(xe, *rest, mask=mask, **kwargs), device
        )
    rel = [r["edit_ms"] / repeated[r["size_class"]] for r in rows]
    res["edit_vs_repeated"] = {"p50": round(pct(rel, 0.5), 3), "p95": round(pct(rel, 0.95), 3),
                               "max": round(max(rel), 3)}  # fmt: skip
    # fidelity of the last session edit against the dense model on the same input
    want = _sample(dense(last_x))
    res["psnr_last_edit_db"] = round(psnr(last_got.float(), want.float()), 2)
    st = engine.stats()
    res["graphs"] = st["graphs"]
    res["class_use"] = {str(s): sum(r["size_class"] == s for r in rows) for s in repeated}
    print(name, "session", {k: v for k, v in res.items() if k != "rows"}, flush=True)
    return info, res, engine, record_s


def breakdown(engine, fn, device) -> dict:
    """One edit's time: the whole edit (CUDA events), the graph it replayed alone (class or
    dense), the count graph with its host sync alone; "host" is the rest."""
    fn()
    path = engine.path
    last = path.last
    graph = path.dense_graph if last.ran_dense else path.entries[last.size_class]
    out = {"edit": time_ms(fn, 2, 10, device), "graph": time_ms(graph.graph.replay, 2, 10, device),
           "count_graph_and_sync": time_ms(lambda: (path.count_graph(), path.reader(path.head)),
                                           2, 10, device)}  # fmt: skip
    fn()  # leave the engine as the edit left it
    out["host"] = out["edit"] - out["graph"] - out["count_graph_and_sync"]
    return {k: round(v, 4) for k, v in out.items()}


def _slot_inputs(inputs, i: int):
    """Inputs of slot ``i``: another timestep where the model takes one (a trajectory)."""
    t = inputs[1] if len(inputs) > 1 else None
    if isinstance(t, torch.Tensor) and not t.is_floating_point():
        return (inputs[0], inputs[1] - 10 * i, *inputs[2:])
    return inputs


def _second_process(name: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.interactive",
        "--warm-only",
        "--models",
        name,
        "--device",
        args.device,
    ]
    for k, v in args.also:
        cmd += ["--also", f"{k}={v!r}"]
    t0 = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    res = json.loads(lines[-1])
    res["process_s"] = round(time.perf_counter() - t0, 2)
    return res


def variant_arg(text: str) -> list:
    """``KEY=VALUE[,KEY=VALUE]`` of a ``--variant``: SparseConfig changes."""
    return [config_override(part) for part in text.split(",") if part]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(STANDARD), choices=sorted(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--edits", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--area", type=float, nargs=2, default=(0.005, 0.05),
                   help="range of the edits' mask areas (share of the image)")  # fmt: skip
    p.add_argument(
        "--slots",
        type=int,
        nargs="*",
        default=[],
        help="also record this many slots on the warmed engine, e.g. 1 10 50",
    )
    p.add_argument(
        "--warm-process",
        action="store_true",
        help="repeat compile + warm-up in a second process (warm disk caches)",
    )
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--also", type=config_override, action="append", default=[], metavar="KEY=VALUE",
                   help="a SparseConfig field changed for sigec")  # fmt: skip
    p.add_argument("--variant", type=variant_arg, action="append", default=[],
                   metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run the session with these SparseConfig changes (on top of "
                   "--also) in this process, beside the same dense baseline")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/interactive.json"))
    args = p.parse_args()
    if args.warm_only:
        device = torch.device(args.device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        print(json.dumps(warm_only(args.models[0], device, dtype, dict(args.also))), flush=True)
        return
    for name in args.models:
        try:
            result = run_model(name, args)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if args.warm_process:  # after this process let go of the engine's memory
                result["warm_disk_cache"] = _second_process(name, args)
        except Exception as e:  # keep the other models' results
            import traceback

            traceback.print_exc()
            result = {"model": name, "error": f"{type(e).__name__}: {e}"}
        merged = json.loads(args.out.read_text()) if args.out.exists() else {"results": []}
        merged["results"] = [r for r in merged["results"] if r["model"] != name] + [result]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=1) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
