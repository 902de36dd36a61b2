"""MACs of sigec's edits vs the dense model, full-size models, SIGE's settings (CPU is fine).

    python benchmarks/macs_table.py --out benchmarks/results/macs.json
    python benchmarks/macs_table.py --models sd15-unet-512x1024 --fractions 0.012 0.017 \
        --also kv_projection=dense --out kv.json   # a SparseConfig change

For each model and edit size: the median over seeds of dense / executed MACs, for compact edits
(one blob) and for the shared generator's default (one to three blobs). MACs do not depend on the
hardware, so this runs anywhere; it runs the real edits (not an estimate).
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
from benchmarks.edit_latency import config_override, sige_config_with  # noqa: E402
from sigec.models.configs import MODELS, build  # noqa: E402
from sigec.runtime.masks import blob_mask  # noqa: E402

FRACTIONS = (0.012, 0.05, 0.15, 0.30, 1.0)


def run(name: str, seeds: int, fractions=FRACTIONS, overrides: dict | None = None) -> dict:
    model, args, kwargs = build(name, seed=0)
    config = sigec.SparseConfig(**sige_config_with(name, overrides or {}))
    engine = sigec.compile(model, args, kwargs, config=config)
    engine.record(*args, **kwargs)
    h, w = args[0].shape[-2:]
    rows = []
    for fraction in fractions:
        for blobs in (1, None):
            ratios, fracs = [], []
            for seed in range(seeds if fraction < 1 else 1):
                mask = blob_mask(h, w, fraction, seed=seed, num_blobs=blobs)
                engine.edit(*args, mask=mask, **kwargs)
                stats = engine.stats()
                ratios.append(stats["dense_macs"] / stats["sparse_macs"])
                fracs.append(stats["active_fraction"])
            rows.append({
                "fraction": fraction,
                "blobs": "1" if blobs == 1 else "1-3",
                "seeds": len(ratios),
                "median_ratio": statistics.median(ratios),
                "min_ratio": min(ratios),
                "max_ratio": max(ratios),
                "dense_gmacs": stats["dense_macs"] / 1e9,
                "median_sparse_gmacs": stats["dense_macs"] / statistics.median(ratios) / 1e9,
            })  # fmt: skip
            print(name, rows[-1], flush=True)
            if fraction == 1.0:
                break
    return {"model": name, "config": MODELS[name].sige_config, "changes": overrides or {},
            "rows": rows,
            "cache_bytes_fp32": stats["cache_bytes"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ddpm-church-256", "gaugan-cityscapes"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--also", type=config_override, action="append", default=[],
                        metavar="KEY=VALUE", help="a SparseConfig field changed")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/macs.json"))
    args = parser.parse_args()
    t0 = time.time()
    result = {
        "torch": torch.__version__,
        "results": [run(m, args.seeds, args.fractions, dict(args.also)) for m in args.models],
    }
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
