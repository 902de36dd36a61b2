"""What an edit costs and which path runs it: MAC accounting and the sparse/dense choice.

MACs come from the program's ``MacEntry`` table (one per conv / linear / attention node of the
dense model): a dense entry costs its full MACs in every edit, a cached one nothing, a sparse one
``per_pixel`` MACs for every output pixel of every computed tile row (padding rows of a static
edit shape compute too, so rows, not active tiles, are what count). ``engine.stats()``, the size
classes (which are spaced by these costs) and the cost model all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sigec.runtime.program import Program


def _res_key(entry) -> str:
    return f"{entry.resolution[0]}x{entry.resolution[1]}" if entry.resolution else "tokens"


def macs_per_tile(program: Program) -> dict[str, int]:
    """MACs one computed tile row of each tile list costs (over every sample and every sparse op
    that runs on the list); 0 for lists no MAC-counted op uses (pointwise ops, upsampling)."""
    out = {k: 0 for k in program.tile_requests}
    for key, macs in op_tile_macs(program):
        out[key] += macs
    return out


@dataclass(frozen=True)
class EditCost:
    """MACs of one edit (see ``executed``)."""

    dense: int
    sparse: int
    by_resolution: dict[str, dict[str, int]]
    by_op: dict[str, dict[str, int]]
    active_fraction: dict[str, float]


def executed(program: Program, rows: dict[str, int]) -> EditCost:
    """MACs an edit executes when tile list ``k`` computes ``rows[k]`` tiles (missing: 0).

    Returns the dense model's MACs, the edit's, both per resolution ("HxW", or "tokens" for
    attention) and per op kind ("conv", "linear", "attention"), and per resolution the average
    share of output pixels the sparse ops computed.
    """
    dense = sparse = 0
    frac: dict[str, list[float]] = {}
    by_res: dict[str, list[int]] = {}
    by_op: dict[str, list[int]] = {}
    for e in program.macs:
        key = _res_key(e)
        done = 0
        if e.mode == "dense":
            done = e.dense
        elif e.mode == "sparse":
            req = program.tile_requests[e.tile_key]
            h, w = e.resolution
            px = rows.get(e.tile_key, 0) * req.tile[0] * req.tile[1]
            if e.per_tile:
                done = rows.get(e.tile_key, 0) * e.per_tile
            else:
                done = e.dense // (e.per_pixel * h * w) * px * e.per_pixel
            frac.setdefault(key, []).append(min(px, h * w) / (h * w))
        dense += e.dense
        sparse += done
        for table, k in ((by_res, key), (by_op, e.op)):
            row = table.setdefault(k, [0, 0])
            row[0] += e.dense
            row[1] += done
    return EditCost(
        dense=dense,
        sparse=sparse,
        by_resolution={k: {"dense": d, "sparse": x} for k, (d, x) in by_res.items()},
        by_op={k: {"dense": d, "sparse": x} for k, (d, x) in by_op.items()},
        active_fraction={k: sum(v) / len(v) for k, v in frac.items()},
    )


# A rough time model of an edit on a current GPU (fp16): every sparse op costs at least a small
# kernel's time, and beyond that its MACs at the rate tile batches reach (round 4 on an H100,
# docs/results.md: ~3 us per small kernel in a graph; cuDNN convs on tile batches ~30 TMAC/s,
# dense ~90). It only places the size classes (``sigec.runtime.sizes``) and picks the cheaper of
# two classes that both hold an edit; which of sparse and dense runs is measured (``choose``).
OP_FLOOR_S = 3e-6
MACS_PER_S = 60e12


def op_tile_macs(program: Program) -> list[tuple[str, int]]:
    """``(tile list, MACs per computed tile row)`` of every sparse MAC-counted op."""
    out = []
    for e in program.macs:
        if e.mode == "sparse" and e.per_tile:
            out.append((e.tile_key, e.per_tile))
        elif e.mode == "sparse":
            req = program.tile_requests[e.tile_key]
            n = e.dense // (e.per_pixel * e.resolution[0] * e.resolution[1])
            out.append((e.tile_key, n * e.per_pixel * req.tile[0] * req.tile[1]))
    return out


def modelled_seconds(program: Program, rows, keys) -> np.ndarray:
    """Modelled time of edits computing ``rows [B, K]`` tile rows of lists ``keys`` (numpy):
    the dense ops' MACs plus, per sparse op, the larger of ``OP_FLOOR_S`` and its MACs."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(keys))
    index = {k: i for i, k in enumerate(keys)}
    fixed = sum(e.dense for e in program.macs if e.mode == "dense") / MACS_PER_S
    t = np.full(rows.shape[0], fixed)
    for key, macs in op_tile_macs(program):
        t += np.maximum(OP_FLOOR_S, rows[:, index[key]] * macs / MACS_PER_S)
    return t


def choose(sparse_ms: float, dense_ms: float) -> str:
    """The cost model's verdict for one static edit shape: the faster of its measured sparse
    graph and the dense model's graph ("sparse" or "dense")."""
    return "dense" if dense_ms < sparse_ms else "sparse"
