"""The layout vocabulary: the forms one map takes in a model, shared by the passes (which find
them) and the runtime (which converts between them).

A map is ``[B, C, H, W]``; "tokens" ``[B, H*W, C]`` (token n is pixel ``(n // W, n % W)``),
"flat" ``[B, C, H*W]`` and "nhwc" ``[B, H, W, C]`` hold the same values in another order.
"""

from __future__ import annotations

import torch

LAYOUTS = ("map", "tokens", "flat", "nhwc")


def map_to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A map ``[B, C, H, W]`` as "tokens" ``[B, H*W, C]``, "flat" ``[B, C, H*W]`` or "nhwc"."""
    b, c, h, w = x.shape
    if layout == "tokens":
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    if layout == "flat":
        return x.reshape(b, c, h * w)
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1)
    return x


def layout_to_map(t: torch.Tensor, layout: str, res: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``map_to_layout``: token layouts come back as channels-last maps (no copy)."""
    h, w = res
    if layout == "tokens":
        return t.reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
    if layout == "flat":
        return t.reshape(t.shape[0], t.shape[1], h, w)
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    return t
