"""Small unmodified architectures the sweep test runs (tests/test_architectures.py): what users
bring that the named configs do not cover. Each builder returns ``(model, x, kwargs)`` with seeded
weights and a tiny image input."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def _diffusers():
    import diffusers

    return diffusers


def unet2d_resnet_blocks():
    """A DDPM-style UNet2DModel with attention down/up blocks and scale-shift time embedding."""
    m = _diffusers().UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        resnet_time_scale_shift="scale_shift", attention_head_dim=4,
    )  # fmt: skip
    return m, torch.randn(1, 3, 16, 16), {"timestep": torch.tensor([10])}


def unet2d_condition_small():
    """A text-conditioned UNet (cross-attention blocks), batch 2 like classifier-free guidance."""
    m = _diffusers().UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
    )  # fmt: skip
    kw = {"timestep": torch.tensor([5]), "encoder_hidden_states": torch.randn(2, 3, 16)}
    return m, torch.randn(2, 4, 16, 16), kw


class _Decoder(nn.Module):
    """A VAE's decoder as a model of its own: latents in, image out."""

    def __init__(self, vae, quantize=False):
        super().__init__()
        self.vae, self.quantize = vae, quantize

    def forward(self, z):
        if self.quantize:
            return self.vae.decode(z).sample  # VQModel.decode quantizes first
        return self.vae.decode(z).sample


def kl_vae_decoder():
    vae = _diffusers().AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    return _Decoder(vae), torch.randn(1, 4, 8, 8), {}


def vq_decoder():
    vae = _diffusers().VQModel(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, layers_per_block=1, num_vq_embeddings=16, vq_embed_dim=4,
    )  # fmt: skip
    return _Decoder(vae, quantize=True), torch.randn(1, 4, 8, 8), {}


def tiny_vae_decoder():
    vae = _diffusers().AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
    )  # fmt: skip
    return _Decoder(vae), torch.randn(1, 4, 8, 8), {}


class ResnetGenerator(nn.Module):
    """CycleGAN's generator, small: reflection pads, instance norms, stride-2 convs, residual
    blocks, transposed convs up, tanh."""

    def __init__(self, c=8, blocks=2):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c), nn.ReLU()]
        layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU()]
        self.head = nn.Sequential(*layers)

        def block():
            return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2 * c, 2 * c, 3),
                                 nn.InstanceNorm2d(2 * c), nn.ReLU(), nn.ReflectionPad2d(1),
                                 nn.Conv2d(2 * c, 2 * c, 3), nn.InstanceNorm2d(2 * c))  # fmt: skip

        self.blocks = nn.ModuleList(block() for _ in range(blocks))
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * c, c, 3, 2, 1, output_padding=1),
                                nn.InstanceNorm2d(c), nn.ReLU(), nn.ReflectionPad2d(3),
                                nn.Conv2d(c, 3, 7), nn.Tanh())  # fmt: skip

    def forward(self, x):
        h = self.head(x)
        for b in self.blocks:
            h = h + b(h)
        return self.up(h)


def resnet_generator():
    return ResnetGenerator().eval(), torch.randn(1, 3, 16, 16), {}


class UnetGenerator(nn.Module):
    """pix2pix's U-Net, small: stride-2 4x4 convs down, transposed 4x4 convs up with skip
    concatenations, batch norms (eval), leaky ReLU down, ReLU up."""

    def __init__(self, c=8):
        super().__init__()
        self.d1 = nn.Conv2d(3, c, 4, 2, 1)
        self.d2 = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(c, 2 * c, 4, 2, 1),
                                nn.BatchNorm2d(2 * c))  # fmt: skip
        self.u2 = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.BatchNorm2d(c))
        self.u1 = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * c, 3, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(a)
        return self.u1(torch.cat([self.u2(b), a], 1))


def unet_generator():
    m = UnetGenerator()
    with torch.no_grad():
        for bn in (m.d2[2], m.u2[2]):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval(), torch.randn(1, 3, 16, 16), {}


class DepthwiseDilated(nn.Module):
    """Depthwise-separable and dilated convs, replicate padding."""

    def __init__(self, c=8):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)
        self.dil = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.out = nn.Conv2d(c, 3, 3)

    def forward(self, x):
        h = F.silu(self.inp(x))
        h = h + self.pw(F.gelu(self.dw(h)))
        h = self.dil(h)
        return self.out(F.pad(h, (1, 1, 1, 1), mode="replicate"))


def depthwise_dilated():
    return DepthwiseDilated().eval(), torch.randn(1, 3, 16, 16), {}


class PixelShuffleNet(nn.Module):
    """A super-resolution head: conv -> pixel shuffle (x2) -> conv."""

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Conv2d(3, 4 * c, 3, padding=1)
        self.b = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(F.pixel_shuffle(self.a(x), 2)))


def pixel_shuffle_net():
    return PixelShuffleNet().eval(), torch.randn(1, 3, 12, 12), {}


ARCHITECTURES = {
    "unet2d-resnet-blocks": unet2d_resnet_blocks,
    "unet2d-condition-small": unet2d_condition_small,
    "kl-vae-decoder": kl_vae_decoder,
    "vq-decoder": vq_decoder,
    "tiny-vae-decoder": tiny_vae_decoder,
    "resnet-generator": resnet_generator,
    "unet-generator": unet_generator,
    "depthwise-dilated": depthwise_dilated,
    "pixel-shuffle": pixel_shuffle_net,
}
