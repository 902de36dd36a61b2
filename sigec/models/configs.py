"""Named model configurations for tests, benchmarks and the CLI (random weights, seeded).

``build(name, seed)`` returns ``(model, example_inputs, example_kwargs)``. The compiler never
special-cases any of these: they are ordinary models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sigec.models import sd
from sigec.models.spade import SPADEConfig, SPADEGenerator, random_label_map

# google/ddpm-church-256 (diffusers UNet2DModel), 113.7 M parameters.
DDPM_CHURCH_256 = dict(
    sample_size=256,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    norm_num_groups=32,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn="silu",
    attention_head_dim=None,
)

# The same architecture at test size: two resolutions sparse, attention at the lowest.
DDPM_TINY = dict(
    DDPM_CHURCH_256,
    sample_size=32,
    layers_per_block=1,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)

GAUGAN_CITYSCAPES = SPADEConfig(semantic_nc=36, ngf=64, crop_size=512, aspect_ratio=2.0)
GAUGAN_TINY = SPADEConfig(semantic_nc=6, ngf=4, crop_size=64, aspect_ratio=2.0, nhidden=8)


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it and its inputs, and SIGE's settings for it."""

    name: str
    build: Callable[[int], tuple[torch.nn.Module, tuple, dict]]
    description: str
    sige_config: dict


def _unet2d(cfg: dict, batch: int = 1):
    def build(seed: int):
        from diffusers import UNet2DModel

        torch.manual_seed(seed)
        model = UNet2DModel(**cfg).eval()
        g = torch.Generator().manual_seed(seed + 1)
        size = cfg["sample_size"]
        x = torch.randn(batch, cfg["in_channels"], size, size, generator=g)
        return model, (x, torch.tensor([500])), {}

    return build


def _gaugan(cfg: SPADEConfig):
    def build(seed: int):
        torch.manual_seed(seed)
        model = SPADEGenerator(cfg)
        # Random weights with calibrated BatchNorm statistics: a few train-mode passes on label
        # maps (cumulative averages), so activations stay normalised as in a trained generator
        # (uncalibrated random statistics overflow fp16 within a few blocks). Variances are
        # floored at 0.01: random narrow layers have near-constant channels whose 1/std would
        # make the model ill-conditioned (outputs that float rounding alone moves).
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        model.train()
        with torch.no_grad():
            for i in range(2):
                model(random_label_map(cfg, seed=seed + 100 + i))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
                m.running_var.clamp_(min=0.01)
        return model.eval(), (random_label_map(cfg, seed=seed + 1),), {}

    return build


SIGE_DDPM = {"block_size": {"3x3": 6, "1x1": 4}, "mask_dilation": 5, "sparse_min_resolution": 64}
SIGE_GAUGAN = {"block_size": {"3x3": 6, "1x1": 4}, "mask_dilation": 1}
SIGE_SD = {"block_size": {"3x3": 6, "1x1": 4}, "mask_dilation": 1}

MODELS = {
    spec.name: spec
    for spec in (
        ModelSpec("ddpm-church-256", _unet2d(DDPM_CHURCH_256), "DDPM church-256 UNet", SIGE_DDPM),
        ModelSpec(
            "ddpm-tiny",
            _unet2d(DDPM_TINY),
            "DDPM UNet, test size",
            {**SIGE_DDPM, "sparse_min_resolution": 16},
        ),  # fmt: skip
        ModelSpec("gaugan-cityscapes", _gaugan(GAUGAN_CITYSCAPES), "GauGAN 512x256", SIGE_GAUGAN),
        ModelSpec("gaugan-tiny", _gaugan(GAUGAN_TINY), "GauGAN, test size", SIGE_GAUGAN),
        ModelSpec(
            "sd15-unet-512",
            sd.unet_builder(sd.SD15_UNET, latent=(64, 64)),
            "SD 1.5 UNet, batch 2 (CFG), 512x512",
            SIGE_SD,
        ),
        ModelSpec(
            "sd15-unet-512x1024",
            sd.unet_builder(sd.SD15_UNET, latent=(64, 128)),
            "SD 1.5 UNet, batch 2 (CFG), 512x1024",
            SIGE_SD,
        ),
        ModelSpec(
            "sd15-unet-tiny",
            sd.unet_builder(sd.SD15_UNET_TINY, tokens=5),
            "SD 1.5 UNet, test size",
            SIGE_SD,
        ),
        ModelSpec(
            "sd2-unet-tiny",
            sd.unet_builder(sd.SD2_UNET_TINY, tokens=5),
            "SD 2.x-style UNet (linear projections, per-level heads), test size",
            SIGE_SD,
        ),
        ModelSpec(
            "sdxl-unet-tiny",
            sd.unet_builder(sd.SDXL_UNET_TINY, tokens=5),
            "SDXL-style UNet (added text/time conditioning), test size",
            SIGE_SD,
        ),
        ModelSpec(
            "sd-vae-encoder-tiny",
            sd.vae_builder(sd.SD_VAE_TINY, "encoder", 32),
            "SD VAE encoder, test size",
            SIGE_SD,
        ),
        ModelSpec(
            "sd-vae-decoder-tiny",
            sd.vae_builder(sd.SD_VAE_TINY, "decoder", 32),
            "SD VAE decoder, test size",
            SIGE_SD,
        ),
    )
}


def build(name: str, seed: int = 0):
    """``(model, example_inputs, example_kwargs)`` of a named config with seeded random weights."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name].build(seed)


# The tiny named configs: tests sweep them, and CI keeps a graph summary of each.
TINY_MODELS = tuple(name for name in MODELS if name.endswith("-tiny"))


def build_on(name: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """``build`` with the model and every floating-point input in ``dtype`` on ``device``
    (integer inputs such as timesteps keep their dtype)."""
    model, args, kwargs = build(name, seed)

    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)

    model = model.to(device=device, dtype=dtype)
    return model, tuple(move(v) for v in args), torch.utils._pytree.tree_map(move, kwargs)
