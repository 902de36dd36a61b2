"""RestoreBatch on channels-last fp16 maps: the vector copy against the generic one.

    python benchmarks/restore_kernel.py --out benchmarks/results/restore_kernel.json

Maps shaped like DDPM church-256's (C x H x W, 6x6 tiles), every tile (a 100 % edit) and 2 % of
them; median CUDA-event time of one launch and the effective bandwidth (bytes read + written).
Never asserts; never run by the tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/NAME.py``: make the root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.edit_latency import time_ms  # noqa: E402

restore_mod = importlib.import_module("sigec.kernels.restore")  # the package exports an op

SHAPES = [(128, 256), (128, 256), (256, 128), (256, 128), (256, 64), (512, 32), (512, 16)] * 4


def items_for(share: float, tile: int = 6):
    items = []
    for c, r in SHAPES:
        work = torch.randn(1, c, r, r, device="cuda", dtype=torch.float16)
        work = work.contiguous(memory_format=torch.channels_last)
        cache = torch.randn_like(work)
        grid = [(y, x) for y in range(0, r, tile) for x in range(0, r, tile)]
        grid = grid[: max(1, int(len(grid) * share))]
        corners = torch.tensor(grid, dtype=torch.int32, device="cuda")
        items.append((work, cache, corners, None, tile, tile))
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/restore_kernel.json"))
    args = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "rows": []}
    real = restore_mod.vector_width
    for share in (1.0, 0.3, 0.02):
        items = items_for(share)
        moved = sum(2 * min(co.shape[0] * 36, w[0, 0].numel()) * w.shape[1] * 2
                    for w, _, co, *_ in items)  # fmt: skip
        row = {"tile_share": share, "maps": len(items), "bytes_moved": moved}
        for name, width in (("generic", lambda w, c, most=64: 0), ("vector", real)):
            restore_mod.vector_width = width
            batch = restore_mod.RestoreBatch(items)
            ms = time_ms(batch, 3, 20, torch.device("cuda"))
            row[name] = {"ms": round(ms, 4), "GB_per_s": round(moved / ms / 1e6, 1),
                         "launches": len(batch.launches)}  # fmt: skip
        restore_mod.vector_width = real
        res["rows"].append(row)
        print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
