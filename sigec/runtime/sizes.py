"""Size classes: a bounded set of static edit shapes that serves every mask.

A static edit (one CUDA graph) has a fixed capacity per tile list; rows past the list's
device-side count are padding. Instead of a capacity per list (a key per combination: almost every
new mask a new graph), an engine has at most ``SparseConfig.size_classes`` classes, each one
capacity vector over all lists, the last holding every tile of every grid. An edit runs the
cheapest class whose capacities hold all its counts (chosen on the device, read with the edit's
one host sync).

The classes are calibrated once per engine from the model's own tile geometry. Seeded masks of
the shapes users make (blobs of one to three parts as ``masks.blob_mask`` draws them, brush
strokes, several strokes, boxes and
border strips; with and without the engine's mask dilation; from one pixel to 40 % of the image)
are reduced to tile counts, and each count vector gets a modelled time (``cost.modelled_seconds``:
a floor per op plus its MACs). Then:

1. a nested ladder of ``LADDER`` classes: class ``s`` holds every calibration mask whose modelled
   time is at most its level (levels spaced geometrically, finer at the small end), so any mask
   has a class not far above its own cost, whatever its shape;
2. the remaining classes are placed greedily: each is the count vector of one calibration mask,
   the one that most lowers the calibration set's mean of (time of the class that runs it) /
   (time of its exact tiles). Compact blobs and thin strokes of the same area load the lists of
   a low resolution very differently; these classes fit each family tightly.

A mask unlike any calibration shape still fits some class (the full grid at worst); it may carry
more padding rows than it needs. ``describe`` reports the classes; the cost model then measures
each against the dense model (``sigec.runtime.static_path``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sigec.runtime.cost import macs_per_tile, modelled_seconds
from sigec.runtime.masks import dilate, mask_pyramid, stroke_mask
from sigec.runtime.program import Program
from sigec.runtime.tiles import grid_size

# calibration: mask areas (share of the image) and shapes per area
_FRACTIONS = tuple(float(f) for f in np.geomspace(1e-4, 0.4, 16))
_SHAPES = (("blob", 1), ("blob", 2), ("blob", 3), ("stroke", 0), ("stroke", 1), ("strokes", 3),
           ("box", 0), ("strip", 0))  # fmt: skip
_WARP = 1.3  # ladder levels t**_WARP along the log-time range: finer steps for small edits
LADDER = 5  # nested classes before the greedily placed ones


@dataclass(frozen=True)
class SizeClasses:
    """The classes of one engine.

    Attributes:
        keys: the tile lists, in the order of the capacity rows.
        caps: ``caps[s][k]``: capacity of list ``keys[k]`` in class ``s``; the last row is every
            list's whole grid. Classes are ordered by modelled time.
        seconds: per class, its modelled time (what the cheapest holding class minimises; for a
            model whose every op sits at the time model's floor, its MACs instead).
        samples: per class, a calibration mask (bool ``[H, W]``, CPU) that runs it, what warm-up
            captures and times the class with.
        macs: per class, the MACs its sparse ops execute at its capacities.
    """

    keys: tuple[str, ...]
    caps: tuple[tuple[int, ...], ...]
    seconds: tuple[float, ...]
    samples: tuple[torch.Tensor, ...]
    macs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.caps)

    def capacities(self, s: int) -> dict[str, int]:
        return dict(zip(self.keys, self.caps[s], strict=True))

    def choose(self, counts) -> int:
        """The cheapest class that holds ``counts`` (one per key): what the device computes."""
        fits = [s for s, row in enumerate(self.caps)
                if all(int(c) <= r for c, r in zip(counts, row, strict=True))]  # fmt: skip
        return min(fits, key=lambda s: (self.seconds[s], s))

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 ``[S, K]`` capacities and float32 ``[S]`` modelled times, for the device."""
        caps = torch.tensor(self.caps, dtype=torch.int32, device=device)
        return caps, torch.tensor(self.seconds, dtype=torch.float32, device=device)


def cheapest_fitting(counts: torch.Tensor, caps: torch.Tensor, seconds: torch.Tensor):
    """int32 ``[1]``: index of the cheapest row of ``caps [S, K]`` that holds ``counts [K]``
    (device-side, no sync; plain ops a compiler fuses). The last row holds everything."""
    fits = (counts[None, :].to(caps.dtype) <= caps).all(dim=1)
    cost = torch.where(fits, seconds, torch.full_like(seconds, float("inf")))
    return torch.argmin(cost).to(torch.int32).reshape(1)


def sample_counts(program: Program, masks: torch.Tensor, keys, threshold: float,
                  dilation: int) -> torch.Tensor:  # fmt: skip
    """int64 ``[B, K]``: active tiles of every list ``keys`` for each edit mask of
    ``masks [B, H, W]`` separately (the truncated policy's per-resolution masks)."""
    if not keys:  # nothing runs on tiles
        return torch.zeros(masks.shape[0], 0, dtype=torch.int64, device=masks.device)
    levels = mask_pyramid(masks, program.resolutions, threshold, dilation)
    out = []
    for k in keys:
        req = program.tile_requests[k]
        m = levels[req.mask]
        b, h, w = m.shape
        bh, bw = req.tile
        gh, gw = -(-h // bh), -(-w // bw)
        m = F.pad(m, (0, gw * bw - w, 0, gh * bh - h))
        out.append(m.reshape(b, gh, bh, gw, bw).any(dim=4).any(dim=2).sum(dim=(1, 2)))
    return torch.stack(out, dim=1)


def _blobs(h: int, w: int, f: float, parts: int, seed: int) -> torch.Tensor:
    """``parts`` elliptical blobs of about ``f`` of the image together (the shapes of
    ``masks.blob_mask``, sized by their ellipse area instead of a search: calibration needs
    shapes, not exact areas)."""
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.full(parts, 4.0))
    aspect = rng.uniform(0.6, 1.6, size=parts)
    cy, cx = rng.uniform(0.15, 0.85, size=parts) * h, rng.uniform(0.15, 0.85, size=parts) * w
    out = np.zeros((h, w), dtype=bool)
    for i in range(parts):
        r = np.sqrt(share[i] * f * h * w / np.pi)
        ry, rx = max(r * np.sqrt(aspect[i]), 0.5), max(r / np.sqrt(aspect[i]), 0.5)
        y0, y1 = max(int(cy[i] - ry) - 1, 0), min(int(cy[i] + ry) + 2, h)  # its bounding box
        x0, x1 = max(int(cx[i] - rx) - 1, 0), min(int(cx[i] + rx) + 2, w)
        yy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
        xx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
        out[y0:y1, x0:x1] |= ((yy - cy[i]) / ry) ** 2 + ((xx - cx[i]) / rx) ** 2 <= 1.0
    if not out.any():
        out[int(cy[0]) % h, int(cx[0]) % w] = True
    return torch.from_numpy(out)


def _shape(h: int, w: int, kind: str, arg: int, f: float, seed: int) -> torch.Tensor:
    if kind == "blob":
        return _blobs(h, w, f, arg, seed)
    if kind == "stroke":
        return stroke_mask(h, w, f, seed=seed)
    if kind == "strokes":
        m = torch.zeros(h, w, dtype=torch.bool)
        for j in range(arg):
            m |= stroke_mask(h, w, f / arg, seed=seed + j)
        return m
    rng = np.random.default_rng(seed)
    m = torch.zeros(h, w, dtype=torch.bool)
    if kind == "box":  # an axis-aligned rectangle of aspect 1:3 to 3:1
        aspect = rng.uniform(1 / 3, 3)
        bh = int(np.clip(round(np.sqrt(f * h * w * aspect)), 1, h))
        bw = int(np.clip(round(f * h * w / bh), 1, w))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        m[y : y + bh, x : x + bw] = True
    else:  # a strip along one border
        side = int(rng.integers(4))
        n = max(1, round(f * (h if side < 2 else w)))
        if side == 0:
            m[:, :n] = True
        elif side == 1:
            m[:, w - n :] = True
        elif side == 2:
            m[:n] = True
        else:
            m[h - n :] = True
    return m


@functools.lru_cache(maxsize=8)
def _calibration_shapes(h: int, w: int) -> torch.Tensor:
    """bool ``[B, H, W]`` (CPU): the calibration shapes at every area."""
    return torch.stack([_shape(h, w, kind, arg, f, seed=7919 * i + 31 * j)
                        for i, f in enumerate(_FRACTIONS)
                        for j, (kind, arg) in enumerate(_SHAPES)])  # fmt: skip


def _calibration_masks(h: int, w: int, dilation: int, device=None) -> torch.Tensor:
    """The calibration shapes, undilated and dilated by the engine's mask dilation."""
    masks = _calibration_shapes(h, w).to(device)
    return torch.cat([masks, dilate(masks, dilation)]) if dilation else masks


def calibrate(program: Program, config, device, classes: int | None = None) -> SizeClasses:
    """The size classes of ``program`` (see the module docstring); ``classes`` defaults to
    ``config.size_classes``."""
    classes = classes or config.size_classes
    keys = tuple(sorted(program.tile_requests))
    h, w = program.input_resolution
    if not keys:  # nothing runs on tiles: one (empty) class
        return SizeClasses(keys, ((),), (0.0,), (torch.ones(h, w, dtype=torch.bool),), (0,))
    grid = np.array([grid_size(program.tile_requests[k], _mask_res(program, k)) for k in keys])
    masks = _calibration_masks(h, w, config.mask_dilation, device)
    counts = sample_counts(program, masks, keys, config.mask_threshold,
                           config.mask_level_dilation).cpu().numpy()  # fmt: skip
    counts = np.maximum(1, np.minimum(counts, grid[None, :]))  # a class holds >= 1 row a list

    def cost(rows) -> np.ndarray:
        return modelled_seconds(program, rows, keys)

    t = cost(counts)
    if t.max() <= t.min() * (1 + 1e-6):  # every op at its floor for every mask (a tiny model)
        per_tile = np.array([macs_per_tile(program)[k] + 1.0 for k in keys])

        def cost(rows) -> np.ndarray:  # noqa: F811 - placed by MACs instead
            return np.asarray(rows, dtype=np.float64).reshape(-1, len(keys)) @ per_tile

        t = cost(counts)
    rows = [tuple(int(g) for g in grid)]  # the whole grid: holds every mask
    ladder = min(LADDER, classes - 1)
    lo, hi = float(t.min()), float(t.max())
    for s in range(ladder):  # 1. nested levels
        level = lo * (hi / lo) ** ((s / max(1, ladder - 1)) ** _WARP) if ladder > 1 else hi
        row = tuple(int(c) for c in counts[t <= level * (1 + 1e-9)].max(axis=0))
        if row not in rows:
            rows.append(row)
    cand_t = t  # 2. greedy: each class the counts of one calibration mask
    holds = (counts[:, None, :] <= counts[None, :, :]).all(axis=-1)  # [mask, candidate]
    best = _cheapest(counts, rows, cost)
    while len(rows) < classes:
        trial = np.minimum(best[:, None], np.where(holds, cand_t[None, :], np.inf))
        score = (trial / t[:, None]).sum(axis=0)
        j = int(np.argmin(score))
        if score[j] >= (best / t).sum() * (1 - 1e-9):
            break
        rows.append(tuple(int(c) for c in counts[j]))
        best = trial[:, j]
    # by cost, ties (every op at its floor) by rows: the whole grid comes last
    rows = sorted(set(rows), key=lambda r: (float(cost([r])[0]), sum(r)))
    seconds = cost(rows)
    fits = (counts[:, None, :] <= np.array(rows)[None]).all(axis=-1)
    chosen = np.where(fits, seconds[None, :], np.inf).argmin(axis=1)  # each mask's class
    samples = []
    for s in range(len(rows)):
        runs = np.flatnonzero(chosen == s)
        if runs.size:  # the heaviest calibration mask this class runs
            samples.append(masks[int(runs[np.argmax(t[runs])])].cpu())
        else:
            samples.append(
                torch.ones(h, w, dtype=torch.bool)
                if s == len(rows) - 1
                else masks[int(np.argmax(np.where(fits[:, s], t, -1)))].cpu()
            )
    per_tile = macs_per_tile(program)
    macs = tuple(int(sum(per_tile[k] * c for k, c in zip(keys, r, strict=True))) for r in rows)
    return SizeClasses(keys, tuple(rows), tuple(float(x) for x in seconds), tuple(samples),
                       macs)  # fmt: skip


def _cheapest(counts, rows, cost) -> np.ndarray:
    """Per calibration mask: cost of the cheapest of ``rows`` that holds it."""
    r = np.array(rows)
    fits = (counts[:, None, :] <= r[None]).all(axis=-1)
    return np.where(fits, cost(r)[None, :], np.inf).min(axis=1)


def _mask_res(program: Program, key: str) -> tuple[int, int]:
    mask = program.tile_requests[key].mask
    return mask if isinstance(mask, tuple) else program.node_resolutions[mask]


def describe(classes: SizeClasses, program: Program) -> list[dict]:
    """Per class: its rows, its capacities as a share of each grid (min / max over lists), the
    MACs of its sparse ops relative to the dense model and its modelled time."""
    dense = sum(e.dense for e in program.macs) or 1
    out = []
    for s, row in enumerate(classes.caps):
        shares = [c / max(1, grid_size(program.tile_requests[k], _mask_res(program, k)))
                  for k, c in zip(classes.keys, row, strict=True)]  # fmt: skip
        out.append({"class": s, "rows": sum(row), "min_share": round(min(shares, default=0), 4),
                    "max_share": round(max(shares, default=0), 4),
                    "sparse_macs_vs_dense": round(classes.macs[s] / dense, 4),
                    "modelled_ms": round(classes.seconds[s] * 1e3, 4)})  # fmt: skip
    return out
