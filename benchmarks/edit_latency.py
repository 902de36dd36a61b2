"""Latency and fidelity of sigec edits next to the dense model, one process, one device.

    python benchmarks/edit_latency.py --model ddpm-church-256 --dtype fp16 --out results.json

Per edit size (compact one-blob masks, seed 0): median CUDA-event time of the edit, dense eager
time (and dense torch.compile reduce-overhead with --compiled), PSNR of the edit against the dense
model on the edited input, max abs error outside the mask, executed/dense MACs. Warm-up and
compile time are reported apart. On CPU it reports fidelity only (--device cpu). Never asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import sigec
from sigec.models.configs import MODELS, build_on
from sigec.runtime.masks import blob_mask

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


def time_ms(fn, warmup: int, repeat: int, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def config_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of a ``--also`` argument: a SparseConfig field and its Python literal."""
    import ast

    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def sige_config_with(name: str, overrides: dict) -> dict:
    """The model's SIGE settings with ``overrides``; a ``block_size`` override changes only the
    kinds it names."""
    config = {**MODELS[name].sige_config, **overrides}
    if "block_size" in overrides:
        config["block_size"] = {**MODELS[name].sige_config.get("block_size", {}),
                                **overrides["block_size"]}  # fmt: skip
    return config


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    mse = torch.mean((a - b) ** 2).item()
    rng = (b.max() - b.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm-church-256", choices=sorted(MODELS))
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.012, 0.05, 0.15, 0.30, 1.0])
    p.add_argument("--policy", default="truncated")
    p.add_argument("--norm-stats", default="cached", choices=["cached", "incremental"])
    p.add_argument("--compiled", action="store_true", help="also time dense torch.compile")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    timing = device.type == "cuda"

    model, inputs, kwargs = build_on(args.model, device, dtype)
    x, rest = inputs[0], inputs[1:]
    config = sigec.SparseConfig(
        mask_policy=args.policy, norm_stats=args.norm_stats, **MODELS[args.model].sige_config
    )

    t0 = time.perf_counter()
    engine = sigec.compile(model, (x, *rest), kwargs, config=config)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.record(x, *rest, **kwargs)
    record_s = time.perf_counter() - t0

    result = {
        "model": args.model, "dtype": args.dtype, "policy": args.policy,
        "norm_stats": args.norm_stats,
        "device": torch.cuda.get_device_name(device) if timing else "cpu",
        "torch": torch.__version__, "compile_s": round(compile_s, 2),
        "record_s": round(record_s, 2), "rows": [],
    }  # fmt: skip
    with torch.no_grad():
        dense_eager = lambda: model(x, *rest, **kwargs)
        if timing:
            result["dense_eager_ms"] = time_ms(dense_eager, 3, args.repeat, device)
        if timing and args.compiled:
            compiled = torch.compile(model, mode="reduce-overhead")
            t0 = time.perf_counter()
            for _ in range(3):
                compiled(x, *rest, **kwargs)
            torch.cuda.synchronize()
            result["dense_compiled_warmup_s"] = round(time.perf_counter() - t0, 1)
            fn = lambda: compiled(x, *rest, **kwargs)
            result["dense_compiled_ms"] = time_ms(fn, 3, args.repeat, device)
        h, w = x.shape[-2:]
        g = torch.Generator().manual_seed(10_000)  # not the seed build() draws x with
        new = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
        for fraction in args.fractions:
            mask = blob_mask(h, w, fraction, seed=0, num_blobs=1, device=device)
            x_edit = torch.where(mask, new, x)
            want = _sample(model(x_edit, *rest, **kwargs))
            got = _sample(engine.edit(x_edit, *rest, mask=mask, **kwargs))
            stats = engine.stats()
            out_mask = torch.nn.functional.interpolate(
                mask[None, None].float(), size=got.shape[-2:]
            )
            outside = out_mask[0, 0] == 0
            row = {
                "fraction": fraction,
                "psnr_db": round(psnr(got, want), 2),
                "max_err_outside_mask": (got - want)[..., outside].abs().max().item()
                if outside.any() else 0.0,
                "max_err": (got - want).abs().max().item(),
                "macs_ratio": round(stats["dense_macs"] / stats["sparse_macs"], 2),
            }  # fmt: skip
            if timing:
                fn = lambda xe=x_edit, m=mask: engine.edit(xe, *rest, mask=m, **kwargs)
                row["edit_ms"] = time_ms(fn, 3, args.repeat, device)
                row["speedup_vs_eager"] = round(result["dense_eager_ms"] / row["edit_ms"], 2)
                if "dense_compiled_ms" in result:
                    row["speedup_vs_compiled"] = round(
                        result["dense_compiled_ms"] / row["edit_ms"], 2
                    )
            result["rows"].append(row)
            print(row, flush=True)
    result["cache_bytes"] = engine.stats()["cache_bytes"]
    if timing:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
