"""Where warm-up time goes: every Triton kernel compile and every inductor compile of one warm-up.

    TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) \\
        python -m benchmarks.warmup_compiles --models ddpm-church-256 --out warmup.json

Per model (fp16 on CUDA, ``SparseConfig(cuda_graphs=True)`` with SIGE's settings, ``--also``
overrides): compile, then ``record`` (which runs the warm-up), with a wrapper around Triton's
``JITFunction._do_compile`` that times each kernel compile (a disk-cache hit is a fast one) and
names the kernel, and dynamo's own compile-time metrics; then one edit, checked against the dense
model (PSNR), and with ``--edits N`` N timed edits of new masks. Reported: the warm-up breakdown
(``stats()["warmup"]``), Triton compiles per kernel (count, seconds, when), dynamo's seconds, how
many compiled functions the graphs share. With the warm-up's dry run (``compile_workers > 0``)
kernels compile on a thread pool and the seconds per kernel here are only their submission.
Point the cache variables at fresh folders for a cold start; run it twice with the same folders
for a warm one. Never asserts; never run by the tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigec  # noqa: E402
from benchmarks.edit_latency import config_override, psnr, sige_config_with  # noqa: E402
from benchmarks.interactive import _sample, edited  # noqa: E402
from sigec.models.configs import MODELS, build_on  # noqa: E402
from sigec.runtime.compiled import shared_compiles  # noqa: E402
from sigec.runtime.masks import edit_sequence  # noqa: E402


class TritonCompiles:
    """Times every ``JITFunction._do_compile`` call while installed (a context manager)."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []  # (kernel, start, seconds)

    def __enter__(self):
        from triton.runtime import jit

        self._cls, self._orig = jit.JITFunction, jit.JITFunction._do_compile
        orig, events = self._orig, self.events

        def timed(fn_self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(fn_self, *args, **kwargs)
            finally:
                events.append((fn_self.fn.__name__, t0, time.perf_counter() - t0))

        self._cls._do_compile = timed
        return self

    def __exit__(self, *exc):
        self._cls._do_compile = self._orig

    def summary(self, since: float) -> dict:
        by_kernel = collections.defaultdict(lambda: [0, 0.0])
        for name, _, s in self.events:
            by_kernel[name][0] += 1
            by_kernel[name][1] += s
        return {
            "compiles": len(self.events),
            "seconds": round(sum(s for *_, s in self.events), 2),
            "by_kernel": {k: {"count": c, "seconds": round(s, 2)} for k, (c, s) in
                          sorted(by_kernel.items(), key=lambda kv: -kv[1][1])},
            "timeline_s": [(name, round(t - since, 2), round(s, 3)) for name, t, s in self.events],
        }  # fmt: skip


def edit_times(engine, name, inputs, kwargs, n: int) -> dict:
    """Wall ms of ``n`` edits, a new mask each (every third committed): what a warm-up knob costs
    per edit (the full session with the dense baselines is ``benchmarks.interactive``)."""
    x, times = inputs[0], []
    for e in edit_sequence(*x.shape[-2:], n, seed=11):
        mask = e["mask"].to(x.device)
        xe = edited(name, x, mask, e["index"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.edit(xe, *inputs[1:], mask=mask, **kwargs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        if e["index"] % 3 == 0:
            engine.commit()
            x = xe
    times.sort()
    return {"edits": n, "p50": round(times[n // 2], 3), "max": round(times[-1], 3),
            "captured_in_edits": engine.stats()["graphs"]["captured_in_edits"]}  # fmt: skip


def dynamo_seconds() -> dict:
    from torch._dynamo import utils

    metrics = getattr(utils, "compilation_time_metrics", {})
    return {k: round(sum(v), 2) for k, v in metrics.items() if sum(v) >= 0.05}


def run_model(name: str, overrides: dict, edits: int = 0) -> dict:
    device = torch.device("cuda")
    model, inputs, kwargs = build_on(name, device, torch.float16)
    config = sigec.SparseConfig(cuda_graphs=True, **sige_config_with(name, overrides))
    with torch.no_grad(), TritonCompiles() as tc:
        t0 = time.perf_counter()
        engine = sigec.compile(model, inputs, kwargs, config=config)
        compile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        engine.record(*inputs, **kwargs)
        torch.cuda.synchronize()
        record_s = time.perf_counter() - t1
        # one edit after warm-up, checked against the dense model on the same input
        x = inputs[0]
        mask = edit_sequence(*x.shape[-2:], 1, seed=5)[0]["mask"].to(device)
        xe = edited(name, x, mask, 5)
        t2 = time.perf_counter()
        got = engine.edit(xe, *inputs[1:], mask=mask, **kwargs)
        torch.cuda.synchronize()
        first_edit_ms = (time.perf_counter() - t2) * 1e3
        want = model(xe, *inputs[1:], **kwargs)
        db = psnr(_sample(got).float(), _sample(want).float())
        session = edit_times(engine, name, inputs, kwargs, edits) if edits else None
    return {
        "model": name,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "overrides": sorted(overrides.items()),
        "compile_s": round(compile_s, 2),
        "record_with_warmup_s": round(record_s, 2),
        "first_edit_ms": round(first_edit_ms, 3),
        "first_edit_psnr_db": round(db, 2),
        "session_ms": session,
        "shared_compiles": shared_compiles(),
        "warmup": {
            k: v for k, v in engine.stats()["warmup"].items() if k not in ("classes", "timings_ms")
        },  # fmt: skip
        "triton": tc.summary(t1),
        "dynamo_s": dynamo_seconds(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ddpm-church-256"], choices=sorted(MODELS))
    p.add_argument("--also", type=config_override, action="append", default=[], metavar="KEY=VALUE",
                   help="a SparseConfig field changed for sigec")  # fmt: skip
    p.add_argument("--edits", type=int, default=0, help="then time this many new-mask edits")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/warmup_compiles.json"))
    args = p.parse_args()
    results = []
    for name in args.models:
        res = run_model(name, dict(args.also), args.edits)
        print(json.dumps({k: v for k, v in res.items() if k != "triton"}), flush=True)
        print(name, "triton", {k: v for k, v in res["triton"].items() if k != "timeline_s"},
              flush=True)  # fmt: skip
        results.append(res)
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
