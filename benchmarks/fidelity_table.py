"""MACs and fidelity of edits, "cached" vs "incremental" normalisation statistics.

    python benchmarks/fidelity_table.py --models sd15-unet-512 sd15-unet-512x1024 \
        --out benchmarks/results/fidelity_sd.json

For each model, edit size (one compact blob, seed 0) and statistics mode: dense / executed MACs,
PSNR of the edit against the dense model on the edited input, and the max abs error outside the
mask. Runs on any device (fp32 on CPU is the reference); the dense result of each edited input is
computed once and shared by both modes. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sigec  # noqa: E402
from benchmarks.edit_latency import DTYPES, config_override, psnr, sige_config_with  # noqa: E402
from sigec.models.configs import build_on  # noqa: E402
from sigec.runtime.masks import blob_mask  # noqa: E402

FRACTIONS = (0.012, 0.017, 0.05, 0.15, 0.30, 1.0)


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


def run(name: str, device, dtype, fractions, overrides: dict, modes=("cached", "incremental"),
        ) -> dict:  # fmt: skip
    model, inputs, kwargs = build_on(name, device, dtype)
    x, rest = inputs[0], inputs[1:]
    h, w = x.shape[-2:]
    g = torch.Generator().manual_seed(10_000)  # not the seed build() draws x with
    new = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
    edits = []
    with torch.no_grad():
        for fraction in fractions:
            mask = blob_mask(h, w, fraction, seed=0, num_blobs=1, device=device)
            x_edit = torch.where(mask, new, x)
            edits.append((fraction, mask, x_edit, _sample(model(x_edit, *rest, **kwargs))))
    rows = {f: {"fraction": f} for f in fractions}
    settings = sige_config_with(name, overrides)
    for stats_mode in modes:
        config = sigec.SparseConfig(norm_stats=stats_mode, **settings)
        t0 = time.perf_counter()
        engine = sigec.compile(model, inputs, kwargs, config=config)
        engine.record(*inputs, **kwargs)
        print(name, stats_mode, f"compile+record {time.perf_counter() - t0:.1f} s", flush=True)
        for fraction, mask, x_edit, want in edits:
            got = _sample(engine.edit(x_edit, *rest, mask=mask, **kwargs))
            st = engine.stats()
            outside = torch.nn.functional.interpolate(
                mask[None, None].float(), size=got.shape[-2:]
            )[0, 0] == 0  # fmt: skip
            err_out = (got - want)[..., outside].abs().max().item() if outside.any() else 0.0
            row = rows[fraction]
            row["macs_ratio"] = round(st["dense_macs"] / st["sparse_macs"], 2)
            row["macs_by_op"] = {k: round(v["dense"] / max(v["sparse"], 1), 2)
                                 for k, v in st["macs_by_op"].items()}  # fmt: skip
            row[f"psnr_db_{stats_mode}"] = round(psnr(got, want), 2)
            row[f"max_err_outside_{stats_mode}"] = err_out
            print(name, stats_mode, row, flush=True)
        cache = st["cache_bytes"]
    return {"model": name, "config": settings, "cache_bytes": cache,
            "dense_gmacs": st["dense_macs"] / 1e9, "rows": list(rows.values())}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sd15-unet-512", "sd15-unet-512x1024"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument(
        "--also",
        type=config_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a SparseConfig field changed (block_size merges "
        "with the model's: --also \"block_size={'pointwise': 4}\" fit_tiles=True)",
    )
    p.add_argument(
        "--stats",
        nargs="+",
        default=["cached", "incremental"],
        choices=["cached", "incremental"],
        help="norm_stats modes to run",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "torch": torch.__version__,
        "overrides": dict(args.also),
        "results": [run(m, device, dtype, args.fractions, dict(args.also), args.stats)
                    for m in args.models],
    }  # fmt: skip
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
