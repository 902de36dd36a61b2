"""The GauGAN / SPADE generator (Park et al., "Semantic Image Synthesis with Spatially-Adaptive
Normalization", CVPR 2019), written from the paper and the official architecture.

Module and parameter names follow the official ``SPADEGenerator`` (``fc``, ``head_0``,
``G_middle_0/1``, ``up_0..3``, ``conv_img``; inside a block ``conv_0/1/s`` with spectral norm, so
``weight_orig``/``weight_u``/``weight_v``, and ``norm_0/1/s`` with ``param_free_norm`` and
``mlp_shared.0``, ``mlp_gamma``, ``mlp_beta``), so the released generator checkpoints load with
``load_state_dict(strict=True)``. The official synchronized BatchNorm is a plain ``BatchNorm2d``
here (identical in eval mode on one device). Only the default configuration is built: no VAE
encoder (``fc`` from the downsampled label map), "normal" upsampling (5 upsamplings),
``norm_G="spectralspadesyncbatch3x3"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm


@dataclass(frozen=True)
class SPADEConfig:
    """Generator hyper-parameters (official option names).

    Attributes:
        semantic_nc: input label channels (label classes + don't-care + instance edges).
        ngf: base width; the first block has 16 * ngf channels.
        crop_size: output width; the output is crop_size / aspect_ratio high.
        aspect_ratio: width / height.
        nhidden: hidden width of the SPADE modulation MLP.
    """

    semantic_nc: int = 36
    ngf: int = 64
    crop_size: int = 512
    aspect_ratio: float = 2.0
    nhidden: int = 128


class SPADE(nn.Module):
    """Spatially-adaptive norm: param-free BatchNorm, then gamma/beta from the label map."""

    def __init__(self, norm_nc: int, label_nc: int, nhidden: int = 128):
        super().__init__()
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, 3, padding=1)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.size()[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """Two SPADE -> LeakyReLU -> conv3x3 stages and a (learned, 1x1) shortcut."""

    def __init__(self, fin: int, fout: int, label_nc: int, nhidden: int = 128):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, fmiddle, 3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(fmiddle, fout, 3, padding=1))
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))
        self.norm_0 = SPADE(fin, label_nc, nhidden)
        self.norm_1 = SPADE(fmiddle, label_nc, nhidden)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, nhidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 2e-1))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 2e-1))
        return x_s + dx


class SPADEGenerator(nn.Module):
    """GauGAN's generator: label map ``[N, semantic_nc, H, W]`` -> image ``[N, 3, H, W]``."""

    def __init__(self, config: SPADEConfig | None = None):
        super().__init__()
        config = config or SPADEConfig()
        self.config = config
        nf, nc, nh = config.ngf, config.semantic_nc, config.nhidden
        self.sw = config.crop_size // 2**5
        self.sh = round(self.sw / config.aspect_ratio)
        self.fc = nn.Conv2d(nc, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, nc, nh)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, nc, nh)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, nc, nh)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, nc, nh)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, nc, nh)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, nc, nh)
        self.up_3 = SPADEResnetBlock(2 * nf, 1 * nf, nc, nh)
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(seg, size=(self.sh, self.sw))
        x = self.fc(x)
        x = self.head_0(x, seg)
        x = self.up(x)
        x = self.G_middle_0(x, seg)
        x = self.G_middle_1(x, seg)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = self.up(x)
            x = block(x, seg)
        x = self.conv_img(F.leaky_relu(x, 2e-1))
        return torch.tanh(x)

    def output_size(self) -> tuple[int, int]:
        return self.sh * 2**5, self.sw * 2**5


def load_generator(path, config: SPADEConfig | None = None) -> SPADEGenerator:
    """A ``SPADEGenerator`` with weights from a checkpoint in the official layout.

    Accepts a state dict saved with ``torch.save`` (the official ``latest_net_G.pth``), optionally
    nested under "state_dict" or "netG". Loads with ``strict=True``.

    Raises:
        CheckpointError: the file is missing, unreadable, or its keys or shapes do not match.
    """
    from pathlib import Path

    from sigec.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            "is the file complete?"
        ) from exc
    for key in ("state_dict", "netG"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    model = SPADEGenerator(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: does not match the SPADE generator ({exc}); check semantic_nc / ngf / "
            "crop_size in the SPADEConfig"
        ) from exc
    return model.eval()


def random_label_map(
    config: SPADEConfig, batch: int = 1, seed: int = 0, height: int | None = None
) -> torch.Tensor:
    """A one-hot label map ``[N, semantic_nc, H, W]`` of random rectangles (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    w = config.crop_size
    h = height or round(w / config.aspect_ratio)
    labels = torch.zeros(batch, h, w, dtype=torch.long)
    for _ in range(12):
        c = int(torch.randint(0, config.semantic_nc - 1, (1,), generator=g))
        y0 = int(torch.randint(0, h, (1,), generator=g))
        x0 = int(torch.randint(0, w, (1,), generator=g))
        hh = int(torch.randint(h // 8, h // 2 + 1, (1,), generator=g))
        ww = int(torch.randint(w // 8, w // 2 + 1, (1,), generator=g))
        labels[:, y0 : y0 + hh, x0 : x0 + ww] = c
    return F.one_hot(labels, config.semantic_nc).permute(0, 3, 1, 2).float()
