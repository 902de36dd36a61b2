"""Small plain-PyTorch models that exercise every rewrite (shared by pass and API tests)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvNet(nn.Module):
    """Convs of every supported kind, with no global op: the exact policy is fully sparse.

    conv3x3 -> BatchNorm(eval) + LeakyReLU -> conv (residual) -> pad + stride-2 conv ->
    depthwise conv -> dilated conv -> nearest upsample x2 -> concat skip -> 1x1 conv.
    """

    def __init__(self, c: int = 6):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.dil = nn.Conv2d(2 * c, 2 * c, 3, padding=2, dilation=2)
        self.conv_out = nn.Conv2d(3 * c, 3, 1)

    def forward(self, x):
        h = self.conv_in(x)
        h = h + self.conv_a(F.leaky_relu(self.bn(h), 0.2))
        d = self.down(F.pad(h, (0, 1, 0, 1)))
        d = self.dil(F.silu(self.dw(d)))
        u = F.interpolate(d, scale_factor=2, mode="nearest")
        return self.conv_out(torch.cat([u, h], dim=1))


class GroupNormNet(nn.Module):
    """A UNet-like residual block: GroupNorm -> SiLU -> conv, time-embedding add, residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.temb = nn.Linear(4, c)
        self.norm2 = nn.GroupNorm(2, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x)
        r = self.conv1(F.silu(self.norm1(h)))
        r = r + self.temb(t)[:, :, None, None]
        r = self.conv2(F.dropout(F.silu(self.norm2(r)), 0.1, self.training))
        return self.conv_out(h + r)


class ConvSandwich(nn.Module):
    """``b(middle(a(x)))``: two 3x3 convs around the op a subclass puts in ``middle``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 3, padding=1)

    def middle(self, h):
        raise NotImplementedError

    def forward(self, x):
        return self.b(self.middle(self.a(x)))


class FlipNet(ConvSandwich):
    """An op sigec cannot run on tiles (a flip): it must fall back to dense and say so."""

    def middle(self, h):
        return torch.flip(h, dims=[3])


def init_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so folding BatchNorm is really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model.eval()


class TokenNet(nn.Module):
    """conv -> tokens -> LayerNorm -> self-attention (+ residual) -> GEGLU feed-forward -> map
    -> conv: a transformer block as diffusers writes one. ``causal`` makes the attention one
    sigec must not run sparse (a query's result depends on its position)."""

    def __init__(self, c: int = 8, heads: int = 2, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.q, self.k, self.v = nn.Linear(c, c, bias=False), nn.Linear(c, c), nn.Linear(c, c)
        self.out = nn.Linear(c, c)
        self.ff_in, self.ff_out = nn.Linear(c, 4 * c), nn.Linear(2 * c, c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        b, c, hh, ww = h.shape
        t = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        n = self.norm(t)
        q, k, v = (p(n).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))  # fmt: skip
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        t = self.out(a.transpose(1, 2).reshape(b, -1, c)) + t
        u, gate = self.ff_in(t).chunk(2, dim=-1)
        t = self.ff_out(u * nn.functional.gelu(gate)) + t
        h = t.reshape(b, hh, ww, c).permute(0, 3, 1, 2).contiguous()
        return self.conv_out(h)


class BoolMaskNet(ConvSandwich):
    """A comparison inside the map path: ``h * (h > 0)`` and ``(h > t).float()`` give 4-D bool
    tensors, which tiles cannot hold."""

    def middle(self, h):
        return h * (h > 0) + 0.5 * (h > 0.3).float()


class FFTNet(ConvSandwich):
    """A complex intermediate: a spectral filter (``torch.fft``) between two convs."""

    def middle(self, h):
        return h + torch.fft.ifft2(torch.fft.fft2(h) * 0.5).real
