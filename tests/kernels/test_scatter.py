"""Tests for sigec/kernels/scatter.py: reference vs a loop oracle, Triton vs reference."""

import pytest
import torch

from sigec.kernels import scatter, scatter_reference, scatter_triton
from tests.kernels.cases import TILE_CASES, corners_tensor, overlapping_pair


def loop_oracle(out, tiles, corners, residual=None, bias=None):
    """Scatter the slow, obvious way: pixel by pixel, skipping pixels outside the map."""
    out = out.clone()
    n_, c, h, w = out.shape
    th, tw = tiles.shape[2:]
    m_total = len(corners)
    for n in range(n_):
        for m, (y0, x0) in enumerate(corners):
            for dy in range(th):
                for dx in range(tw):
                    y, x = y0 + dy, x0 + dx
                    if 0 <= y < h and 0 <= x < w:
                        v = tiles[n * m_total + m, :, dy, dx].float()
                        if bias is not None:
                            v = v + bias.float()
                        if residual is not None:
                            v = v + residual[n, :, y, x].float()
                        out[n, :, y, x] = v.to(out.dtype)
    return out


@pytest.mark.parametrize("n, c, h, w, th, tw, corners", TILE_CASES)
def test_cases_do_not_overlap(n, c, h, w, th, tw, corners):
    assert overlapping_pair(corners, th, tw) is None


def _tiles(n, c, th, tw, m, dtype=torch.float32):
    return torch.randn(n * m, c, th, tw).to(dtype)


EPILOGUES = ["plain", "residual", "bias", "bias+residual"]


def _epilogue(which, n, c, h, w, dtype=torch.float32):
    res = torch.randn(n, c, h, w).to(dtype) if "residual" in which else None
    bias = torch.randn(c).to(dtype) if "bias" in which else None
    return res, bias


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("n, c, h, w, th, tw, corners", TILE_CASES)
def test_reference_matches_loop_oracle(n, c, h, w, th, tw, corners, epilogue):
    out = torch.randn(n, c, h, w)
    tiles = _tiles(n, c, th, tw, len(corners))
    res, bias = _epilogue(epilogue, n, c, h, w)
    want = loop_oracle(out, tiles, corners, res, bias)
    scatter_reference(out, tiles, corners_tensor(corners), res, bias=bias)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("n, c, h, w, th, tw, corners", TILE_CASES)
def test_triton_bit_exact(n, c, h, w, th, tw, corners, epilogue, dtype):
    base = torch.randn(n, c, h, w).to(dtype)
    tiles = _tiles(n, c, th, tw, len(corners), dtype)
    res, bias = _epilogue(epilogue, n, c, h, w, dtype)
    co = corners_tensor(corners)
    got, want = base.clone(), base.clone()
    scatter_triton(got, tiles, co, res, bias=bias)
    scatter_reference(want, tiles, co, res, bias=bias)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bias_is_added_once_per_written_pixel_only():
    out = torch.zeros(1, 2, 8, 8)
    tiles = torch.zeros(1, 2, 4, 4)
    bias = torch.tensor([1.0, -2.0])
    scatter_triton(out, tiles, corners_tensor([(2, 2)]), bias=bias)
    want = torch.zeros(1, 2, 8, 8)
    want[0, 0, 2:6, 2:6], want[0, 1, 2:6, 2:6] = 1.0, -2.0
    torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize("impl", [scatter_reference, scatter_triton])
def test_residual_may_be_the_output_itself(impl):
    out = torch.randn(1, 3, 8, 8)
    before = out.clone()
    tiles = _tiles(1, 3, 4, 4, 1)
    impl(out, tiles, corners_tensor([(4, 0)]), residual=out)
    torch.testing.assert_close(out[:, :, 4:, :4], before[:, :, 4:, :4] + tiles[0])
    torch.testing.assert_close(out[:, :, :4], before[:, :, :4], atol=0, rtol=0)


def test_channels_last_out_and_tiles():
    out = torch.randn(2, 5, 7, 9).to(memory_format=torch.channels_last)
    tiles = _tiles(2, 5, 4, 4, 3).to(memory_format=torch.channels_last)
    res = torch.randn(2, 5, 7, 9)
    co = corners_tensor([(-1, -1), (3, 6), (5, 0)])
    got, want = out.clone(), out.contiguous()
    scatter_triton(got, tiles, co, res)
    scatter_reference(want, tiles.contiguous(), co, res)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("impl", [scatter_reference, scatter_triton])
def test_capacity_padding_rows_write_nothing(impl):
    out = torch.randn(1, 2, 8, 8)
    before = out.clone()
    tiles = _tiles(1, 2, 4, 4, 3)
    count = torch.tensor([1], dtype=torch.int32)
    impl(out, tiles, corners_tensor([(0, 4), (0, 0), (4, 4)]), num_active=count)
    torch.testing.assert_close(out[0, :, :4, 4:], tiles[0])
    out[:, :, :4, 4:] = before[:, :, :4, 4:]
    torch.testing.assert_close(out, before, atol=0, rtol=0)


def test_public_op_mutates_in_place_and_opcheck():
    out = torch.randn(2, 3, 6, 6)
    ptr = out.data_ptr()
    tiles = _tiles(2, 3, 3, 3, 2)
    co = corners_tensor([(0, 0), (3, 3)])
    want = out.clone()
    scatter_reference(want, tiles, co)
    assert torch.ops.sigec.scatter(out, tiles, co) is None
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.library.opcheck(scatter, (out, tiles, co), {"residual": torch.randn(2, 3, 6, 6)})
    torch.library.opcheck(scatter, (out, tiles, co), {"bias": torch.randn(3)})


BAD_CALLS = [
    ("out rank", {"out": torch.randn(3, 6, 6)}, ValueError, "out: expected a 4-D"),
    ("tiles dtype", {"tiles": torch.randn(1, 3, 3, 3).half()}, TypeError, "tiles: expected dtype"),
    ("tiles count", {"tiles": torch.randn(2, 3, 3, 3)}, ValueError, "N*M = 1*1"),
    ("tiles channels", {"tiles": torch.randn(1, 4, 3, 3)}, ValueError, "C = 3"),
    ("corners out of range", {"corners": corners_tensor([(9, 0)])}, ValueError, "row 0"),
    ("residual shape", {"residual": torch.randn(1, 3, 5, 6)}, ValueError, "residual: expected"),
    ("residual dtype", {"residual": torch.randn(1, 3, 6, 6).half()}, TypeError, "residual"),
    ("bias channels", {"bias": torch.randn(4)}, ValueError, "bias: expected a contiguous [C]"),
    ("bias rank", {"bias": torch.randn(1, 3)}, ValueError, "bias: expected a 1-D"),
    ("bias strided", {"bias": torch.randn(6)[::2]}, ValueError, "stride"),
]


@pytest.mark.parametrize("why, override, exc, words", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
@pytest.mark.parametrize("fn", [torch.ops.sigec.scatter, scatter_triton], ids=["op", "triton"])
def test_bad_input_is_a_typed_error(fn, why, override, exc, words):
    call = {"out": torch.randn(1, 3, 6, 6), "tiles": torch.randn(1, 3, 3, 3),
            "corners": corners_tensor([(0, 0)])}  # fmt: skip
    call.update(override)
    with pytest.raises(exc) as info:
        fn(**call)
    assert words in str(info.value)
