"""Pictures in and out of the editing workflows: image files <-> tensors, masks, label maps, and the
pictures ``sigec edit`` and ``sigec demo`` write (active tiles per resolution, error maps).

Tensors are ``[1, C, H, W]``: images in ``[-1, 1]`` (RGB), masks bool ``[H, W]``, label maps
one-hot float ``[1, classes, H, W]`` (an index picture in, an index picture out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sigec.errors import MaskError


def _pil():
    from PIL import Image

    return Image


def read_image(path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB picture as ``[1, 3, H, W]`` in ``[-1, 1]``; ``size`` (H, W) must match if given."""
    img = np.asarray(_pil().open(path).convert("RGB"), dtype=np.float32)
    _check_size(path, img.shape[:2], size)
    return torch.from_numpy(img).permute(2, 0, 1)[None] / 127.5 - 1.0


def write_image(t: torch.Tensor, path) -> Path:
    """``[1, 3, H, W]`` (or ``[3, H, W]``) in ``[-1, 1]`` as a PNG."""
    t = t.detach().float().cpu()
    t = t[0] if t.dim() == 4 else t
    if t.shape[0] == 1:
        t = t.expand(3, *t.shape[1:])
    arr = ((t[:3].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path = Path(path)
    _pil().fromarray(arr).save(path)
    return path


def read_mask(path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask picture (any mode; non-black is on) as bool ``[H, W]``."""
    arr = np.asarray(_pil().open(path).convert("L"))
    _check_size(path, arr.shape, size)
    return torch.from_numpy(arr > 127)


def write_mask(mask: torch.Tensor, path) -> Path:
    arr = mask.detach().cpu().bool().numpy().astype(np.uint8) * 255
    path = Path(path)
    _pil().fromarray(arr).save(path)
    return path


def read_label_map(path, classes: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An index picture (one class per pixel value) as a one-hot ``[1, classes, H, W]``."""
    arr = np.asarray(_pil().open(path))
    if arr.ndim == 3:
        arr = arr[..., 0]
    _check_size(path, arr.shape, size)
    if arr.max() >= classes:
        raise MaskError(f"{path}: label {int(arr.max())} does not exist (the model has {classes} "
                        "label channels, labels 0 to {classes - 1})")  # fmt: skip
    labels = torch.from_numpy(arr.astype(np.int64))
    return torch.nn.functional.one_hot(labels, classes).permute(2, 0, 1)[None].float()


def write_label_map(onehot: torch.Tensor, path) -> Path:
    arr = onehot[0].argmax(0).byte().cpu().numpy()
    path = Path(path)
    _pil().fromarray(arr).save(path)
    return path


def label_colours(onehot: torch.Tensor) -> torch.Tensor:
    """A label map as a picture to look at (a fixed colour per class), ``[1, 3, H, W]``."""
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(onehot.shape[1], 3, generator=g) * 2 - 1
    idx = onehot[0].argmax(0).cpu()
    return palette[idx].permute(2, 0, 1)[None]


def error_map(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| (max over channels) scaled to its maximum, as a grey picture."""
    err = (got.float() - want.float()).abs().amax(1, keepdim=True)
    top = float(err.max()) or 1.0
    return err / top * 2 - 1


def tile_picture(mask: torch.Tensor, tiles, shape: tuple[int, int]) -> torch.Tensor:
    """One resolution's active tiles over its mask: grey mask, white tile outlines."""
    h, w = shape
    pic = torch.full((3, h, w), -1.0)
    pic[:, mask.cpu()] = 0.0
    th, tw = tiles.out_tile
    n = int(tiles.num_active.item()) if tiles.num_active is not None else tiles.capacity
    for y, x in tiles.out_corners[:n].tolist():
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + th, h), min(x + tw, w)
        if y0 < y1 and x0 < x1:
            pic[:, y0:y1, x0] = pic[:, y0:y1, x1 - 1] = 1.0
            pic[:, y0, x0:x1] = pic[:, y1 - 1, x0:x1] = 1.0
    return pic[None]


def _check_size(path, got, want) -> None:
    if want is not None and tuple(got) != tuple(want):
        raise MaskError(
            f"{path}: {got[0]}x{got[1]} pixels, but the engine takes {want[0]}x{want[1]}; resize "
            "the picture (or convert an engine for this size)"
        )
