"""Stable Diffusion model configs (diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``) and the
VAE halves as standalone modules, so each compiles on its own.

Full sizes follow the released SD 1.5, SD 2.x and SDXL configs; the tiny variants keep each
architecture's features (cross-attention, linear projections and per-level head dims, added
time/text conditioning, the VAE's mid-block attention) at test size.
"""

from __future__ import annotations

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip

SD15_UNET_TINY = dict(
    SD15_UNET, sample_size=16, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8,
)  # fmt: skip

# SD 2.x: linear proj_in/proj_out, head dims per level.
SD2_UNET_TINY = dict(
    SD15_UNET_TINY, use_linear_projection=True, attention_head_dim=(2, 4), cross_attention_dim=12,
)  # fmt: skip

# SDXL: added text/time conditioning, several transformer layers per block.
SDXL_UNET_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=16,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 + 6 * 8, norm_num_groups=8,
)  # fmt: skip

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
)  # fmt: skip

SD_VAE_TINY = dict(
    SD_VAE, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
)  # fmt: skip


class VAEEncode(torch.nn.Module):
    """Image ``[N, 3, H, W]`` -> latent moments ``[N, 2*latent, H/8, W/8]``: encoder, quant_conv."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(image))


class VAEDecode(torch.nn.Module):
    """Latent ``[N, latent, h, w]`` -> image ``[N, 3, 8h, 8w]`` (post_quant_conv + decoder)."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latent))


def unet_builder(cfg: dict, batch: int = 2, latent: tuple[int, int] | None = None, tokens=77):
    """Builder of ``(unet, (latent, t), {"encoder_hidden_states": c, ...})`` with seeded weights."""

    def build(seed: int):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        model = UNet2DConditionModel(**cfg).eval()
        g = torch.Generator().manual_seed(seed + 1)
        h, w = latent or (cfg["sample_size"], cfg["sample_size"])
        x = torch.randn(batch, cfg["in_channels"], h, w, generator=g)
        c = torch.randn(batch, min(tokens, 77), cfg["cross_attention_dim"], generator=g)
        kwargs = {"encoder_hidden_states": c}
        if cfg.get("addition_embed_type") == "text_time":
            text_dim = (
                cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            )
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, text_dim, generator=g),
                "time_ids": torch.randn(batch, 6, generator=g),
            }
        return model, (x, torch.tensor([500])), kwargs

    return build


def vae_builder(cfg: dict, part: str, size: int):
    """Builder of the VAE encoder (image input) or decoder (latent input) as its own module."""

    def build(seed: int):
        from diffusers import AutoencoderKL

        torch.manual_seed(seed)
        vae = AutoencoderKL(**cfg).eval()
        g = torch.Generator().manual_seed(seed + 1)
        if part == "encoder":
            return VAEEncode(vae).eval(), (torch.randn(1, 3, size, size, generator=g),), {}
        scale = 2 ** (len(cfg["block_out_channels"]) - 1)
        z = torch.randn(1, cfg["latent_channels"], size // scale, size // scale, generator=g)
        return VAEDecode(vae).eval(), (z,), {}

    return build
