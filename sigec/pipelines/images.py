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


def paint(image: torch.Tensor, mask: torch.Tensor, rgb: tuple[int, int, int]) -> torch.Tensor:
    """``image`` ``[1, 3, H, W]`` with the pixels of ``mask`` painted in colour ``rgb`` (0-255)."""
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        h, w = image.shape[-2:]
        raise MaskError(f"the mask is {mask.shape[0]}x{mask.shape[1]}, the image {h}x{w}: "
                        "they must be the same size")  # fmt: skip
    colour = torch.tensor(rgb, dtype=torch.float32).reshape(1, 3, 1, 1) / 127.5 - 1.0
    return torch.where(mask.to(image.device), colour.to(image), image)


def demo_picture(h: int, w: int) -> torch.Tensor:
    """A built-in picture to edit (a sky, a hill, a sun): ``[1, 3, h, w]`` in [-1, 1]."""
    y = torch.linspace(0, 1, h).reshape(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).reshape(1, w).expand(h, w)
    sky = torch.stack([0.3 + 0.4 * y, 0.5 + 0.3 * y, torch.full_like(y, 0.95)])
    ground = torch.stack([0.2 + 0.2 * x, 0.55 - 0.2 * y, 0.15 + 0 * x])
    hill = y > 0.62 - 0.12 * torch.sin(3.1 * x)
    sun = (y - 0.25) ** 2 + (x - 0.72) ** 2 < 0.012
    pic = torch.where(hill, ground, sky)
    pic = torch.where(sun, torch.tensor([1.0, 0.85, 0.3]).reshape(3, 1, 1), pic)
    return pic[None] * 2 - 1


def is_label_map(x: torch.Tensor) -> bool:
    """A one-hot label map ``[N, C, H, W]`` (C > 1, every pixel exactly one class)."""
    return (x.dim() == 4 and x.shape[1] > 1 and bool(((x == 0) | (x == 1)).all())
            and bool((x.sum(1) == 1).all()))  # fmt: skip


def tile_pictures(mask: torch.Tensor, tiles: list) -> dict[str, torch.Tensor]:
    """One picture per resolution of an edit's active tiles (``SparseEngine.edit_tiles``): the
    edit mask at that resolution in grey, the output tiles of the resolution's 3x3 convs (or its
    busiest list) outlined in white. Keys ``"HxW"``."""
    by_res: dict[tuple, list] = {}
    for key, res, ts in tiles:
        by_res.setdefault(tuple(res), []).append((key, ts))
    out = {}
    for (h, w), lists in by_res.items():
        three = [x for x in lists if "|k3x3|s1x1|" in x[0]] or lists
        _, ts = max(three, key=lambda kv: _active(kv[1]))
        m = mask.float().reshape(1, 1, *mask.shape[-2:]).cpu()
        m = torch.nn.functional.adaptive_max_pool2d(m, (h, w))[0, 0] > 0
        out[f"{h}x{w}"] = tile_picture(m, ts, (h, w))
    return out


def _active(ts) -> int:
    return int(ts.num_active.item()) if ts.num_active is not None else ts.capacity


def tile_picture(mask: torch.Tensor, tiles, shape: tuple[int, int]) -> torch.Tensor:
    """One resolution's active tiles over its mask: grey mask, white tile outlines."""
    h, w = shape
    pic = torch.full((3, h, w), -1.0)
    pic[:, mask.cpu()] = 0.0
    th, tw = tiles.out_tile
    for y, x in tiles.out_corners[: _active(tiles)].tolist():
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
