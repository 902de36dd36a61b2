"""The edit masks end-to-end tests sweep: empty, one pixel, border, corner, blobs, full."""

import torch

from sigec.runtime.masks import blob_mask


def edit_masks(h: int, w: int) -> dict[str, torch.Tensor]:
    pixel = torch.zeros(h, w, dtype=torch.bool)
    pixel[h // 2, w // 3] = True
    border = torch.zeros(h, w, dtype=torch.bool)
    border[:, -2:] = True
    corner = torch.zeros(h, w, dtype=torch.bool)
    corner[:3, :3] = True
    return {
        "empty": torch.zeros(h, w, dtype=torch.bool),
        "pixel": pixel,
        "border": border,
        "corner": corner,
        "blob": blob_mask(h, w, 0.08, seed=1),
        "blobs": blob_mask(h, w, 0.15, seed=2, num_blobs=3),
        "full": torch.ones(h, w, dtype=torch.bool),
    }


def apply_edit(x: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` with new random values inside ``mask`` (every channel), unchanged outside."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return torch.where(mask, x + noise, x)
