"""Edit masks: difference, dilation, per-resolution pyramid, reduction to active tiles, blob masks.

Everything here is vectorized torch that runs on CPU and GPU. Host synchronisation happens only
where a result's *size* depends on the data: ``active_tiles`` without a ``capacity`` (one
``nonzero``). With a ``capacity`` the tile list has a fixed size and the count stays on the device,
which is what CUDA-graph capture needs.

Shapes: a mask is bool ``[B, H, W]`` (or ``[H, W]``, treated as B = 1). Tile corners are int32
``[M, 2]`` rows ``(y, x)``, the layout the ``sigec::gather/scatter/restore`` ops take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TileSet",
    "active_tiles",
    "blob_mask",
    "difference_mask",
    "dilate",
    "downsample_mask",
    "edit_sequence",
    "mask_pyramid",
    "stroke_mask",
]


def _as_batched(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"{name}: expected [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
    return mask.bool()


def difference_mask(original: torch.Tensor, edited: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Pixels where any channel changed by more than ``eps`` (a NaN that appears or goes away
    is a change; one that stays is not).

    Args:
        original: ``[B, C, H, W]`` or ``[C, H, W]``.
        edited: same shape as ``original``.
        eps: absolute threshold.

    Returns:
        bool ``[B, H, W]`` (``[H, W]`` for 3-D inputs).
    """
    if original.shape != edited.shape:
        raise ValueError(
            f"edited: expected the shape of the original {tuple(original.shape)}, "
            f"got {tuple(edited.shape)}"
        )
    if original.dim() not in (3, 4):
        raise ValueError(
            f"original: expected [B, C, H, W] or [C, H, W], got {tuple(original.shape)}"
        )
    a, b = original.float(), edited.float()
    # NaN differences count as changes (a NaN appearing, or a NaN replaced by a number), except
    # a NaN or infinity that stays what it was
    same = (a == b) | ((b - a).abs() <= eps) | (a.isnan() & b.isnan())
    return (~same).any(dim=-3)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square dilation by ``radius`` pixels (a (2r+1)^2 structuring element); same shape out."""
    if radius < 0:
        raise ValueError(f"radius: expected >= 0, got {radius}")
    if radius == 0:
        return mask.bool()
    squeeze = mask.dim() == 2
    m = _as_batched(mask).float()[:, None]
    k = 2 * radius + 1  # a square is separable: rows, then columns (same result, k times cheaper)
    m = F.max_pool2d(m, kernel_size=(1, k), stride=1, padding=(0, radius))
    out = F.max_pool2d(m, kernel_size=(k, 1), stride=1, padding=(radius, 0))[:, 0] > 0
    return out[0] if squeeze else out


def _area_and_footprint(src: torch.Tensor, h: int, w: int):
    """Box-filter mean and max of ``src [B, 1, H, W]`` down to ``h x w``.

    For integer factors these are plain reductions over a reshape (what adaptive pooling computes,
    with the same sums of 0/1 values: exact), which run well parallelised on a GPU; the adaptive
    pools loop over each large window in one thread.
    """
    b, _, hh, ww = src.shape
    if hh % h == 0 and ww % w == 0:
        blocks = src.reshape(b, 1, h, hh // h, w, ww // w)
        return blocks.mean(dim=(3, 5)), blocks.amax(dim=(3, 5))
    return F.interpolate(src, size=(h, w), mode="area"), F.adaptive_max_pool2d(src, (h, w))


def downsample_mask(
    mask: torch.Tensor, size: tuple[int, int], threshold: float = 0.3, dilation: int = 1
) -> torch.Tensor:
    """Mask at another resolution (SIGE's policy): resample, threshold, dilate.

    Going down, pixels whose coverage (the masked share of their footprint, by area resampling)
    exceeds ``threshold`` stay on, then a ``dilation``-pixel square dilation. A sample whose
    mask is non-empty never comes out empty: if thresholding loses it, its max-pooled footprint
    is used instead. Going up (a decoder), the nearest-neighbour footprint is used, then the
    dilation.

    Args:
        mask: bool ``[B, H, W]`` or ``[H, W]``.
        size: target ``(h, w)``.
        threshold: coverage above which a downsampled pixel is on.
        dilation: square dilation radius applied at the target resolution.

    Returns:
        bool mask at ``size`` with the input's batch layout.
    """
    squeeze = mask.dim() == 2
    m = _as_batched(mask)
    h, w = int(size[0]), int(size[1])
    src = m.float()[:, None]
    if (h, w) == tuple(m.shape[1:]):
        out = m
    elif h >= m.shape[1] and w >= m.shape[2]:
        out = F.interpolate(src, size=(h, w), mode="nearest")[:, 0] > 0
    else:
        # coverage: the share of each target pixel's footprint that is masked (area resampling,
        # i.e. antialiased downsampling with a box filter; the bilinear-antialias kernel of
        # torch fails on CUDA for large factors)
        cover, footprint = _area_and_footprint(src, h, w)
        out = cover[:, 0] > threshold
        footprint = footprint[:, 0] > 0
        lost = m.flatten(1).any(1) & ~out.flatten(1).any(1)  # [B], stays on the device
        out = torch.where(lost[:, None, None], footprint, out)
    out = dilate(out, dilation)
    return out[0] if squeeze else out


def mask_pyramid(
    mask: torch.Tensor,
    sizes,
    threshold: float = 0.3,
    dilation: int = 1,
) -> dict[tuple[int, int], torch.Tensor]:
    """Masks for every resolution in ``sizes``: ``{(h, w): bool mask}``.

    Each level is derived from the input mask directly (not from the previous level), so the
    changed region does not grow with depth inside one resolution (SIGE's truncated policy). The
    input resolution itself is kept as given (no dilation there: the caller dilates the edit mask
    once, by its own radius).
    """
    m = _as_batched(mask) if mask.dim() == 2 else mask.bool()
    base = tuple(m.shape[-2:])
    levels = {}
    for size in sizes:
        size = (int(size[0]), int(size[1]))
        levels[size] = m if size == base else downsample_mask(m, size, threshold, dilation)
    return levels


@dataclass(frozen=True)
class TileSet:
    """Active tiles of one sparse convolution.

    Attributes:
        out_corners: int32 ``[M, 2]`` top-left output pixel of each active output tile.
        in_corners: int32 ``[M, 2]`` top-left input pixel of the matching input tile
            (``out * stride - padding``; may be negative).
        out_tile: output tile size ``(bh, bw)``.
        in_tile: input tile size ``((bh-1)*sh + kh, (bw-1)*sw + kw)``.
        num_active: int32 ``[1]`` count of real tiles (rows past it are padding), or None when
            the lists hold exactly the active tiles.
    """

    out_corners: torch.Tensor
    in_corners: torch.Tensor
    out_tile: tuple[int, int]
    in_tile: tuple[int, int]
    num_active: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return int(self.out_corners.shape[0])


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tile_grid(mask: torch.Tensor, tile) -> torch.Tensor:
    """bool ``[ceil(Ho / bh), ceil(Wo / bw)]``: which output tiles hold a masked pixel."""
    bh, bw = _pair(tile)
    m = _as_batched(mask).any(dim=0)  # [Ho, Wo]
    ho, wo = m.shape
    gh, gw = math.ceil(ho / bh), math.ceil(wo / bw)
    if (gh * bh, gw * bw) != (ho, wo):  # zero rows / columns up to whole tiles
        m = F.pad(m, (0, gw * bw - wo, 0, gh * bh - ho))
    return m.reshape(gh, bh, gw, bw).any(dim=(1, 3))


def active_tiles(
    mask: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    tile=4,
    capacity: int | None = None,
) -> TileSet:
    """Reduce an output-resolution mask to the active tiles of a convolution.

    The output map is cut into a grid of ``tile`` x ``tile`` output tiles starting at (0, 0); a tile
    is active when any of its output pixels is masked (in any batch sample: all samples share one
    tile list). Its input tile starts at ``out_corner * stride - padding`` and spans
    ``(tile - 1) * stride + kernel_size`` pixels.

    Args:
        mask: bool ``[B, Ho, Wo]`` or ``[Ho, Wo]`` at the conv's *output* resolution.
        kernel_size, stride, padding: the conv's, as ints or (h, w) pairs.
        tile: output tile size, int or (h, w).
        capacity: if given, return exactly ``capacity`` rows (tiles in raster order first, the rest
            padding) with the true count in ``num_active``; no host sync. Active tiles beyond the
            capacity are dropped, so pick it from the tile grid size when unsure.

    Returns:
        A ``TileSet``, tiles in raster order.
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    bh, bw = _pair(tile)
    if min(kh, kw, sh, sw, bh, bw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"active_tiles: kernel {kh}x{kw}, stride {sh}x{sw}, tile {bh}x{bw} must be >= 1 and "
            f"padding {ph}x{pw} >= 0"
        )
    idx, count = tile_indices(mask, (bh, bw), capacity)
    return tiles_at(idx, count, (kh, kw), (sh, sw), (ph, pw), (bh, bw))


def tile_indices(mask: torch.Tensor, tile, capacity: int | None = None, grid=None):
    """``(idx, count)``: int32 ``[M, 2]`` grid coordinates of the active tiles in raster order and
    the device-side count (None for exact lists; with ``capacity`` the rows past it are padding).
    ``grid``: ``tile_grid(mask, tile)`` if the caller already has it."""
    grid = tile_grid(mask, tile) if grid is None else grid
    gw = grid.shape[1]
    if capacity is None:
        return grid.nonzero().to(torch.int32), None  # host sync: M is data-dependent
    # compaction by prefix sum: active cell i goes to row (active cells before it); inactive
    # cells and active ones past the capacity go to a spare row that is cut off. Plain ATen ops
    # a compiler fuses (nonzero_static is several library kernels per list); padding rows are 0.
    cells = grid.flatten()
    pos = torch.cumsum(cells.to(torch.int32), 0) - 1
    count = torch.clamp(cells.sum(), max=capacity).to(torch.int32).reshape(1)
    dest = torch.where(cells & (pos < capacity), pos, capacity).long()
    rows = torch.zeros(capacity + 1, dtype=torch.int64, device=grid.device)
    rows = rows.scatter(0, dest, torch.arange(cells.numel(), device=grid.device))[:capacity]
    return torch.stack([rows // gw, rows % gw], dim=1).to(torch.int32), count


def tiles_at(idx, count, kernel, stride, padding, tile) -> TileSet:
    """The ``TileSet`` of a conv geometry for the tiles at grid coordinates ``idx``."""
    (kh, kw), (bh, bw) = kernel, tile
    out_corners = idx * bh if bh == bw else torch.stack([idx[:, 0] * bh, idx[:, 1] * bw], dim=1)
    in_tile = ((bh - 1) * stride[0] + kh, (bw - 1) * stride[1] + kw)
    return TileSet(out_corners, in_corners_of(out_corners, stride, padding), (bh, bw), in_tile,
                   count)  # fmt: skip


def in_corners_of(out_corners: torch.Tensor, stride, padding) -> torch.Tensor:
    """``out * stride - padding`` per axis, in as few kernels as the geometry allows (python
    scalars only: a host-made tensor copied to the GPU would be a sync)."""
    (sh, sw), (ph, pw) = stride, padding
    if (sh, sw) == (1, 1) and (ph, pw) == (0, 0):
        return out_corners
    if sh == sw and ph == pw:
        return out_corners - ph if sh == 1 else out_corners * sh - ph
    return torch.stack([out_corners[:, 0] * sh - ph, out_corners[:, 1] * sw - pw], dim=1)


def blob_mask(
    height: int,
    width: int,
    fraction: float,
    seed: int = 0,
    num_blobs: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A deterministic edit mask of one to three compact elliptical blobs covering ``fraction``.

    The one mask generator that tests, benchmarks and the CLI share. The same ``(height, width,
    fraction, seed, num_blobs)`` gives the same mask on every machine (numpy's seeded generator,
    no device arithmetic). The covered area is within one percent (relative) of the target, or
    a few pixels for tiny masks; ``fraction >= 1`` gives a full mask, ``<= 0`` an empty one.

    Args:
        height, width: mask size.
        fraction: target share of masked pixels, in [0, 1].
        seed: selects blob count (unless given), centres, shapes and area split.
        num_blobs: 1 to 3 to fix the count.
        device: where the returned tensor lives.

    Returns:
        bool ``[height, width]``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"blob_mask: size must be positive, got {height}x{width}")
    if fraction >= 1.0:
        return torch.ones(height, width, dtype=torch.bool, device=device)
    if fraction <= 0.0:
        return torch.zeros(height, width, dtype=torch.bool, device=device)
    rng = np.random.default_rng(seed)
    k = int(num_blobs) if num_blobs is not None else int(rng.integers(1, 4))
    if not 1 <= k <= 3:
        raise ValueError(f"num_blobs: expected 1 to 3, got {num_blobs}")
    share = rng.dirichlet(np.full(k, 4.0))  # area split, no blob vanishingly small
    aspect = rng.uniform(0.6, 1.6, size=k)
    # keep centres away from the border in proportion to the blob size, so blobs stay compact
    radius0 = np.sqrt(share * fraction * height * width / np.pi)
    cy = rng.uniform(0.15, 0.85, size=k) * height
    cx = rng.uniform(0.15, 0.85, size=k) * width
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    target = fraction * height * width

    def render(scale: float) -> np.ndarray:
        out = np.zeros((height, width), dtype=bool)
        for i in range(k):
            ry = max(radius0[i] * scale * np.sqrt(aspect[i]), 0.5)
            rx = max(radius0[i] * scale / np.sqrt(aspect[i]), 0.5)
            out |= ((yy - cy[i]) / ry) ** 2 + ((xx - cx[i]) / rx) ** 2 <= 1.0
        return out

    lo, hi = 0.0, 1.0
    while render(hi).sum() < target and hi < 1e4:
        hi *= 2.0
    for _ in range(60):  # bisection on a common radius scale: area is monotone in it
        mid = 0.5 * (lo + hi)
        if render(mid).sum() < target:
            lo = mid
        else:
            hi = mid
    best = render(hi)
    if not best.any():  # fractions below one pixel still give one pixel
        best[int(cy[0]) % height, int(cx[0]) % width] = True
    return torch.from_numpy(best).to(device)


def stroke_mask(
    height: int,
    width: int,
    fraction: float,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A deterministic brush stroke covering about ``fraction`` of the image.

    A round brush walks a smoothly turning path from a random start (reflecting at the
    borders) and stops once the covered area reaches the target: thin strokes of 5 to 20 brush
    widths' length, the shape a user paints. Same arguments, same mask on every machine (numpy's
    seeded generator). The area reaches the target to within one brush stamp.

    Args:
        height, width: mask size.
        fraction: target share of masked pixels; ``>= 1`` gives a full mask, ``<= 0`` an empty
            one.
        seed: selects start, direction, brush size and path.
        device: where the returned tensor lives.

    Returns:
        bool ``[height, width]``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"stroke_mask: size must be positive, got {height}x{width}")
    if fraction >= 1.0:
        return torch.ones(height, width, dtype=torch.bool, device=device)
    if fraction <= 0.0:
        return torch.zeros(height, width, dtype=torch.bool, device=device)
    rng = np.random.default_rng(seed)
    target = max(1, int(round(fraction * height * width)))
    aspect = rng.uniform(5.0, 20.0)  # length / width of the stroke
    radius = max(1.0, float(np.sqrt(target / (4.0 * aspect + np.pi))))
    y, x = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    angle = rng.uniform(0.0, 2.0 * np.pi)
    step = max(1.0, radius / 2.0)
    out = np.zeros((height, width), dtype=bool)
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dy * dy + dx * dx <= radius * radius
    area = 0
    for _ in range(50 * (height + width)):  # a stroke that cannot grow any more stops too
        cy, cx = int(round(y)), int(round(x))
        y0, y1 = max(cy - r, 0), min(cy + r + 1, height)
        x0, x1 = max(cx - r, 0), min(cx + r + 1, width)
        if y0 < y1 and x0 < x1:
            patch = disc[y0 - cy + r : y1 - cy + r, x0 - cx + r : x1 - cx + r]
            window = out[y0:y1, x0:x1]
            area += int((patch & ~window).sum())
            window |= patch
        if area >= target:
            break
        angle += rng.normal(0.0, 0.35)
        y, x = y + step * np.sin(angle), x + step * np.cos(angle)
        if not 0 <= y < height:  # reflect at the border
            angle, y = -angle, min(max(y, 0.0), height - 1.0)
        if not 0 <= x < width:
            angle, x = np.pi - angle, min(max(x, 0.0), width - 1.0)
    return torch.from_numpy(out).to(device)


def edit_sequence(
    height: int,
    width: int,
    count: int,
    seed: int = 0,
    fractions: tuple[float, float] = (0.005, 0.05),
    commit_share: float = 0.8,
):
    """A seeded painting session: ``count`` edits, each a new stroke or blob mask.

    Areas are drawn log-uniformly from ``fractions``, kinds half strokes, half blobs of one to
    three parts, at random places; each edit is followed by a commit with probability
    ``commit_share``. Benchmarks and tests share it, so "a session" means the same everywhere.

    Returns:
        A list of dicts ``{"kind", "fraction", "mask" (bool [H, W], CPU), "commit"}``.
    """
    rng = np.random.default_rng(seed)
    lo, hi = np.log(fractions[0]), np.log(fractions[1])
    edits = []
    for i in range(count):
        fraction = float(np.exp(rng.uniform(lo, hi)))
        kind = "stroke" if rng.uniform() < 0.5 else "blob"
        s = int(rng.integers(1 << 30))
        mask = (stroke_mask(height, width, fraction, seed=s) if kind == "stroke"
                else blob_mask(height, width, fraction, seed=s))  # fmt: skip
        edits.append({"kind": kind, "fraction": fraction, "mask": mask,
                      "commit": bool(rng.uniform() < commit_share), "index": i})  # fmt: skip
    return edits
