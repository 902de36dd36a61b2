"""A whole SDEdit edit on Stable Diffusion 1.5 at 512x512, sigec against the dense pipeline.

    python benchmarks/sdedit.py --out benchmarks/results/sdedit_H200.json

In one process on one card (fp16; random weights from the released configs, since no weights can
be downloaded): an ``SDEditor`` over the SD 1.5 UNet (CFG batch 2) and the SD VAE with DDIM,
``--steps`` steps at ``--strength`` (default 30 and 0.6: 18 UNet calls). ``generate`` (compile,
warm-up, record of every call) is timed, then a seeded session of ``--edits`` edits (strokes and
blobs of 2-5 % of the image, each painted a colour; most committed): each edit's whole wall time
(VAE encoder, every step, VAE decoder, on the host around a synchronize), the dense pipeline on
the same edited image (the same trajectory: eager fp16, and ``torch.compile(mode=
"reduce-overhead")`` of the UNet and both VAE halves), PSNR of the edit against the eager dense
result, commit time, cache bytes per step and where they live, peak memory. The same session
runs again with every cache in pinned host memory (``cache_device="host"``: each step's caches
prefetched while the previous step runs) and split by a GPU budget (``"auto"``, ``--auto-gib``),
with the host-to-device bandwidth measured beside. Writes JSON after every phase (a run cut
short keeps what it measured). ``--tiny`` runs the tiny configs on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigec  # noqa: E402
from benchmarks.edit_latency import psnr  # noqa: E402
from sigec.models.sd import SD15_UNET, SD15_UNET_TINY, SD_VAE, SD_VAE_TINY  # noqa: E402
from sigec.pipelines import SDEditor  # noqa: E402
from sigec.pipelines.diffusion import SIGE_SD  # noqa: E402
from sigec.pipelines.images import demo_picture, paint  # noqa: E402
from sigec.runtime.masks import edit_sequence  # noqa: E402


def _wall(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--edits", type=int, default=6)
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled dense pipeline")
    p.add_argument("--budget-s", type=float, default=420,
                   help="skip the compiled baseline when this much time has passed")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test)")
    p.add_argument("--profile", metavar="TXT",
                   help="cProfile one edit and one commit into this file")  # fmt: skip
    p.add_argument(
        "--auto-gib",
        type=float,
        default=6.0,
        help="also a session with cache_device='auto' under this GPU budget (0: no)",
    )
    p.add_argument("--out", default="sdedit.json")
    args = p.parse_args()
    start = time.perf_counter()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    size = 32 if args.tiny else args.size
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_UNET_TINY if args.tiny else SD15_UNET)).eval()
    vae = AutoencoderKL(**(SD_VAE_TINY if args.tiny else SD_VAE)).eval()
    unet, vae = unet.to(dev, dt), vae.to(dev, dt)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False)  # SD 1.5's  # fmt: skip
    g = torch.Generator().manual_seed(1)
    dim = unet.config.cross_attention_dim
    cond, uncond = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    kw = {"prompt_embeds": cond, "negative_prompt_embeds": uncond, "seed": 0}
    on_gpu = dev.type == "cuda"
    config = sigec.SparseConfig(cuda_graphs=on_gpu, **SIGE_SD)
    editor = SDEditor(unet, sched, vae, config=config, steps=args.steps, strength=args.strength)
    res = {"card": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
           "size": size, "steps": args.steps, "strength": args.strength, "dtype": str(dt),
           "config": {k: v for k, v in config.__dict__.items() if k != "block_size"},
           "weights": "random (released SD 1.5 / VAE configs)"}  # fmt: skip
    out = Path(args.out)

    def dump():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    image = demo_picture(size, size).to(dev, dt)
    secs, _ = _wall(lambda: editor.generate(image, **kw), dev)
    res["generate_s"] = secs  # compile + warm-up + record, all calls
    res["unet_calls"] = len(editor._run.timesteps)
    res["warmup"] = {k: e.stats()["warmup"] for k, e in editor.engines.items()}
    dump()

    # a session: each edit a new mask, painted; the dense pipeline on the same image
    state = {"current": image}

    def session(label: str) -> dict:
        edits = []
        for i, e in enumerate(edit_sequence(size, size, args.edits, seed=3,
                                            fractions=(0.02, 0.05))):  # fmt: skip
            colour = [(230, 60, 40), (40, 180, 70), (50, 80, 220)][i % 3]
            edited = paint(state["current"], e["mask"], colour)
            mask = e["mask"].to(dev)
            edit_s, got = _wall(lambda ed=edited, m=mask: editor.edit(ed, mask=m, **kw), dev)
            dense_s, want = _wall(lambda ed=edited: editor.dense(ed), dev)
            row = {"fraction": e["fraction"], "kind": e["kind"], "edit_s": edit_s,
                   "dense_eager_s": dense_s, "psnr": psnr(got.float(), want.float())}  # fmt: skip
            if e["commit"]:
                row["commit_s"], _ = _wall(editor.commit, dev)
                state["current"] = edited
            edits.append(row)
            state.update(edited=edited, want=want, mask=mask)
        times = [r["edit_s"] for r in edits]
        unet_eng = editor.engines["unet"]
        summary = {
            "edits": edits,
            "edit_s": {"first": times[0], "p50": statistics.median(times), "max": max(times)},
            "commit_s_p50": statistics.median(
                [r["commit_s"] for r in edits if "commit_s" in r] or [0.0]
            ),  # fmt: skip
            "dense_eager_s_p50": statistics.median(r["dense_eager_s"] for r in edits),
            "cache": {
                "placement": {k: e.placement() for k, e in editor.engines.items()},
                "per_step_bytes": [unet_eng.slots[k].nbytes() for k in unet_eng.slots],
                "encoder_bytes": editor.engines["encode"].cache_bytes(),
                "decoder_bytes": editor.engines["decode"].cache_bytes(),
                "unet_working_set_bytes": unet_eng.live.nbytes(),
                "device_bytes": editor.cache_bytes("device"),
                "host_bytes": editor.cache_bytes("host"),
                "total_bytes": editor.cache_bytes(),
                "unet_staging": unet_eng.live.staging.stats(),
            },
        }
        if on_gpu:
            summary["memory_allocated_bytes"] = torch.cuda.memory_allocated()
            summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        res["sessions"][label] = summary
        dump()
        return summary

    res["sessions"] = {}
    first = session("device")
    res["edit_s"], res["dense_eager_s_p50"] = first["edit_s"], first["dense_eager_s_p50"]
    res["cache"] = first["cache"]  # the default: every cache on the GPU
    last_edit, mask, want = state["edited"], state["mask"], state["want"]

    # the same session with caches in pinned host memory (every step's prefetched), then split
    # by a budget (the VAE's and the last steps' on the host)
    if on_gpu:
        step = editor.engines["unet"].slots["0"].nbytes()
        n = 2 * step  # the PCIe bandwidth a slot switch sees: pinned host -> device
        src = torch.empty(n // 2, dtype=torch.float16, pin_memory=True)
        dst = torch.empty(n // 2, dtype=torch.float16, device=dev)
        secs = min(_wall(lambda: dst.copy_(src, non_blocking=True), dev)[0] for _ in range(5))
        res["h2d_gb_per_s"] = step / secs / 1e9
        del src, dst
    placements = [("host", None)]
    if args.auto_gib:
        placements.append(("auto", int(args.auto_gib * 2**30)))
    for where, budget in placements:
        editor.max_cache_bytes = budget
        torch.cuda.reset_peak_memory_stats() if on_gpu else None
        label = where if budget is None else f"{where} {args.auto_gib:g} GiB"
        try:
            secs, _ = _wall(lambda w=where: editor.place_caches(w), dev)
            session(label)["place_s"] = secs
        except Exception as e:  # keep what was measured; the compiled baseline still runs
            import traceback

            traceback.print_exc()
            res["sessions"][label] = {"error": f"{type(e).__name__}: {e}"}
        dump()
    editor.max_cache_bytes = None
    editor.place_caches("device")

    if args.profile:  # where the host time of an edit and a commit goes
        import cProfile
        import io
        import pstats

        text = io.StringIO()
        for name, fn in (("edit", lambda: editor.edit(last_edit, mask=mask, **kw)),
                         ("commit", editor.commit)):  # fmt: skip
            prof = cProfile.Profile()
            prof.enable()
            _wall(fn, dev)
            prof.disable()
            text.write(f"==== {name}\n")
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        Path(args.profile).write_text(text.getvalue())

    # the strongest dense baseline: the pipeline's modules compiled (reduce-overhead)
    if args.no_compiled or time.perf_counter() - start > args.budget_s:
        res["dense_compiled"] = "skipped (time budget)" if not args.no_compiled else "skipped"
        dump()
        return
    mode = "reduce-overhead" if on_gpu else None
    modules = {"unet": torch.compile(unet, mode=mode), "encode": torch.compile(editor.encoder(),
               mode=mode), "decode": torch.compile(editor.decoder(), mode=mode)}  # fmt: skip
    last = last_edit
    t_compile, _ = _wall(lambda: editor.dense(last, modules), dev)
    times = []
    for _ in range(4):
        secs, ref = _wall(lambda: editor.dense(last, modules), dev)
        times.append(secs)
    res["dense_compiled"] = {"first_call_s": t_compile, "p50_s": statistics.median(times[1:]),
                             "psnr_vs_eager": psnr(ref.float(), want.float())}  # fmt: skip
    res["speedup_p50_vs_compiled"] = res["dense_compiled"]["p50_s"] / res["edit_s"]["p50"]
    res["speedup_p50_vs_eager"] = res["dense_eager_s_p50"] / res["edit_s"]["p50"]
    res["total_s"] = time.perf_counter() - start
    dump()


if __name__ == "__main__":
    main()
