"""gather -> conv2d(padding=0) -> scatter equals the dense conv on every masked output pixel."""

import pytest
import torch
import torch.nn.functional as F

from sigec.kernels import gather_reference, gather_triton, scatter_reference, scatter_triton
from sigec.runtime.masks import active_tiles, blob_mask

IMPLS = {
    "reference": (gather_reference, scatter_reference),
    "triton": (gather_triton, scatter_triton),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_sparse_conv_equals_dense_on_masked_pixels(impl, kernel, stride, padding):
    gather, scatter = IMPLS[impl]
    n, cin, cout, h, w = 2, 3, 4, 13, 11
    x = torch.randn(n, cin, h, w)
    weight, bias = torch.randn(cout, cin, kernel, kernel), torch.randn(cout)
    dense = F.conv2d(x, weight, bias, stride=stride, padding=padding)  # [N, Co, Ho, Wo]
    ho, wo = dense.shape[2:]
    mask = blob_mask(ho, wo, 0.15, seed=kernel + 10 * stride + 100 * padding)
    mask[-1, -1] = True  # a corner pixel, so a tile hangs off the bottom-right edge
    tiles = active_tiles(mask, kernel, stride, padding, tile=4)

    batch = gather(x, tiles.in_corners, *tiles.in_tile)
    out_tiles = F.conv2d(batch, weight, bias, stride=stride)
    assert tuple(out_tiles.shape[2:]) == tiles.out_tile
    out = torch.full_like(dense, float("nan"))
    scatter(out, out_tiles.contiguous(), tiles.out_corners)

    torch.testing.assert_close(out[:, :, mask], dense[:, :, mask], rtol=1e-5, atol=1e-5)
    written = ~out[0, 0].isnan()
    assert written[mask].all()
    # every written pixel is right, not only the masked ones (whole output tiles are computed)
    torch.testing.assert_close(out[:, :, written], dense[:, :, written], rtol=1e-5, atol=1e-5)
