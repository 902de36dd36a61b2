"""Tests for sigec/kernels/gather.py: reference vs a padded-slice oracle, Triton vs reference."""

import pytest
import torch
import torch.nn.functional as F

from sigec.kernels import ACTIVATIONS, gather, gather_reference, gather_triton
from sigec.kernels._common import apply_activation
from tests.kernels.cases import DTYPE_TOLS, TILE_CASES, corners_tensor


def padded_slice_oracle(x, corners, th, tw, scale=None, shift=None, act="identity",
                        slope=0.01, act_first=False):  # fmt: skip
    """Gather the slow, obvious way: prologue on the whole map, zero-pad, slice each tile."""
    v = x.float()
    if act_first:
        v = apply_activation(v, act, slope)
    if scale is not None:
        v = v * scale.float()[:, :, None, None]
    if shift is not None:
        v = v + shift.float()[:, :, None, None]
    if not act_first:
        v = apply_activation(v, act, slope)
    pad = max(th, tw) + 1
    v = F.pad(v, (pad, pad, pad, pad)).to(x.dtype)
    tiles = [v[:, :, y + pad : y + pad + th, x_ + pad : x_ + pad + tw] for y, x_ in corners]
    if not tiles:
        return x.new_empty((0, x.shape[1], th, tw))
    return torch.stack(tiles, dim=1).flatten(0, 1)  # [N*M, C, th, tw], n-major


@pytest.mark.parametrize("n, c, h, w, th, tw, corners", TILE_CASES)
def test_reference_matches_padded_slices(n, c, h, w, th, tw, corners):
    x = torch.randn(n, c, h, w)
    got = gather_reference(x, corners_tensor(corners), th, tw)
    torch.testing.assert_close(got, padded_slice_oracle(x, corners, th, tw), atol=0, rtol=0)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("act_first", [False, True])
def test_reference_prologue_matches_oracle(act, act_first):
    n, c, h, w, th, tw = 2, 3, 6, 7, 4, 4
    corners = [(-2, -2), (2, 5), (4, 0)]
    x, scale, shift = torch.randn(n, c, h, w), torch.randn(n, c), torch.randn(n, c)
    got = gather_reference(x, corners_tensor(corners), th, tw, scale, shift, act, 0.2, act_first)
    want = padded_slice_oracle(x, corners, th, tw, scale, shift, act, 0.2, act_first)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got[0, :, :2, :] == 0).all(), "padding must stay zero after the prologue"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, c, h, w, th, tw, corners", TILE_CASES)
def test_triton_copy_bit_exact(n, c, h, w, th, tw, corners, dtype):
    x = torch.randn(n, c, h, w).to(dtype)
    co = corners_tensor(corners)
    got = gather_triton(x, co, th, tw)
    torch.testing.assert_close(got, gather_reference(x, co, th, tw), atol=0, rtol=0)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("act_first", [False, True])
def test_triton_prologue_matches_reference(act, act_first, dtype, atol, rtol):
    n, c, h, w, th, tw = 2, 5, 6, 7, 4, 4
    co = corners_tensor([(-2, -2), (2, 5), (4, 0)])
    x = torch.randn(n, c, h, w).to(dtype)
    scale, shift = torch.randn(n, c), torch.randn(n, c).to(dtype)  # mixed dtypes are allowed
    args = (x, co, th, tw, scale, shift, act, 0.2, act_first)
    torch.testing.assert_close(gather_triton(*args), gather_reference(*args), atol=atol, rtol=rtol)


def test_triton_scale_only_and_expanded_scale():
    x = torch.randn(2, 3, 5, 5)
    co = corners_tensor([(-1, -1), (2, 2)])
    scale = torch.randn(1, 3).expand(2, 3)  # stride 0 over the batch
    got = gather_triton(x, co, 4, 4, scale=scale)
    torch.testing.assert_close(got, gather_reference(x, co, 4, 4, scale=scale), atol=0, rtol=0)


def test_channels_last_in_and_out():
    x = torch.randn(2, 6, 7, 9).to(memory_format=torch.channels_last)
    co = corners_tensor([(-1, -1), (3, 6), (5, 0)])
    got = gather_triton(x, co, 4, 4)
    want = gather_reference(x.contiguous(), co, 4, 4)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert gather_reference(x, co, 4, 4).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", [gather_reference, gather_triton])
def test_capacity_padding_rows_are_zero(impl):
    x = torch.randn(2, 3, 8, 8)
    co = corners_tensor([(0, 0), (4, 4), (123, -456), (0, 0)])  # rows 2, 3 are padding
    count = torch.tensor([2], dtype=torch.int32)
    got = impl(x, co, 4, 4, num_active=count).reshape(2, 4, 3, 4, 4)
    assert (got[:, 2:] == 0).all()
    want = gather_reference(x, co[:2], 4, 4).reshape(2, 2, 3, 4, 4)
    torch.testing.assert_close(got[:, :2], want, atol=0, rtol=0)


def test_public_op_on_cpu_and_opcheck():
    x = torch.randn(2, 3, 6, 6)
    co = corners_tensor([(-1, -1), (3, 3)])
    scale, shift = torch.randn(2, 3), torch.randn(2, 3)
    got = torch.ops.sigec.gather(x, co, 4, 4, scale, shift, "silu")
    torch.testing.assert_close(got, gather_reference(x, co, 4, 4, scale, shift, "silu"))
    torch.library.opcheck(gather, (x, co, 4, 4), {"scale": scale, "activation": "relu"})


BAD_CALLS = [
    # (why, kwargs overriding a good call, error type, words the message must contain)
    ("x rank", {"x": torch.randn(3, 6, 6)}, ValueError, "x: expected a 4-D"),
    ("x dtype", {"x": torch.ones(1, 3, 6, 6, dtype=torch.int64)}, TypeError, "x: expected dtype"),
    ("corners dtype", {"corners": torch.zeros(1, 2, dtype=torch.int64)}, TypeError, "corners"),
    ("corners shape", {"corners": torch.zeros(1, 3, dtype=torch.int32)}, ValueError, "[M, 2]"),
    ("corners above", {"corners": corners_tensor([(-8, 0)])}, ValueError, "row 0"),
    ("corners right", {"corners": corners_tensor([(0, 0), (2, 10)])}, ValueError, "row 1"),
    (
        "corners device",
        {"corners": torch.zeros(1, 2, dtype=torch.int32, device="meta")},
        ValueError,
        "corners: expected a tensor on cpu",
    ),  # fmt: skip
    ("scale shape", {"scale": torch.randn(3)}, ValueError, "scale: expected a 2-D"),
    ("scale size", {"scale": torch.randn(2, 3)}, ValueError, "[N, C] = [1, 3]"),
    ("activation", {"activation": "tanh"}, ValueError, "activation: expected one of"),
    ("tile size", {"tile_h": 0}, ValueError, "tile size"),
    ("num_active", {"num_active": torch.tensor([5], dtype=torch.int32)}, ValueError, "[0, 1]"),
    ("upsample", {"upsample": 0}, ValueError, "upsample: expected an integer factor >= 1"),
    (
        "corners past the upsampled map",
        {"upsample": 2, "corners": corners_tensor([(0, 17)])},
        ValueError,
        "on a 12x12 map",
    ),
]


@pytest.mark.parametrize("why, override, exc, words", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
@pytest.mark.parametrize("fn", [torch.ops.sigec.gather, gather_triton], ids=["op", "triton"])
def test_bad_input_is_a_typed_error(fn, why, override, exc, words):
    call = {"x": torch.randn(1, 3, 6, 6), "corners": corners_tensor([(0, 0)]), "tile_h": 4,
            "tile_w": 4}  # fmt: skip
    call.update(override)
    with pytest.raises(exc, match=None) as info:
        fn(**call)
    assert words in str(info.value)


def test_bad_input_fails_in_the_fake_impl_too():
    x = torch.empty(1, 3, 6, 6, device="meta")
    with pytest.raises(ValueError, match="scale"):
        torch.ops.sigec.gather(x, torch.zeros(1, 2, dtype=torch.int32, device="meta"), 4, 4,
                               torch.empty(5, device="meta"))  # fmt: skip


def test_float64_runs_on_the_cpu_reference_only():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    co = corners_tensor([(-1, -1)])
    scale = torch.rand(1, 2, dtype=torch.float64)
    got = torch.ops.sigec.gather(x, co, 4, 4, scale=scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, padded_slice_oracle(x, [(-1, -1)], 4, 4, scale=scale))
    with pytest.raises(TypeError, match="float64 runs on the CPU reference only"):
        gather_triton(x, co, 4, 4)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("impl", [gather_reference, gather_triton], ids=["ref", "triton"])
def test_folded_pad_modes_read_what_the_padded_map_holds(mode, impl):
    """A reflection / replicate pad folded into the read: tiles that hang over every border
    (p = 2 rows and columns of pad) equal slices of ``F.pad(x, mode=...)``, prologue included."""
    torch.manual_seed(0)
    n, c, h, w, th, tw, p = 2, 3, 7, 9, 5, 6, 2
    corners = [(-2, -2), (-2, 5), (4, -1), (4, 5), (1, 2)]  # corners, borders and inside
    x, scale, shift = torch.randn(n, c, h, w), torch.randn(n, c), torch.randn(n, c)
    for prologue in ((None, None, "identity"), (scale, shift, "silu")):
        got = impl(x, corners_tensor(corners), th, tw, *prologue, pad_mode=mode)
        v = x.float()
        if prologue[0] is not None:
            v = F.silu(v * scale[:, :, None, None] + shift[:, :, None, None])
        padded = F.pad(v, (p, p, p, p), mode=mode)
        want = torch.stack([padded[:, :, y + p : y + p + th, xx + p : xx + p + tw]
                            for y, xx in corners], dim=1).flatten(0, 1)  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="pad_mode: expected one of"):
        gather(x, corners_tensor(corners), th, tw, pad_mode="circular")


@pytest.mark.parametrize("factor, mode", [(2, "zeros"), (3, "zeros"), (2, "reflect"),
                                          (2, "replicate")])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_upsampled_read_equals_gathering_the_upsampled_map(factor, mode, dtype):
    """``upsample=f`` reads x as its nearest upsampling: the same tiles as gathering the
    upsampled map itself (corners in its pixels, padding around it): bit for bit as a copy and
    in the reference, to one rounding with Triton's prologue (it may contract into an FMA)."""
    x = torch.randn(2, 3, 5, 4).to(dtype)
    up = F.interpolate(x, scale_factor=factor, mode="nearest")
    co = corners_tensor([(-1, -1), (3, 2), (5 * factor - 2, 4 * factor - 3), (0, 4)])
    scale, shift = torch.randn(2, 3), torch.randn(2, 3)
    for impl in (gather_reference, gather_triton):
        for pro in ((), (scale, shift, "silu")):
            got = impl(x, co, 4, 4, *pro, pad_mode=mode, upsample=factor)
            want = gather_reference(up, co, 4, 4, *pro, pad_mode=mode)
            exact = impl is gather_reference or not pro
            tol = 0 if exact else 1e-6 if dtype == torch.float32 else 1e-3
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
