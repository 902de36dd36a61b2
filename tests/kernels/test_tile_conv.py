"""The fused tile conv (gather + conv + scatter in one kernel) against its reference and dense."""

import pytest
import torch
import torch.nn.functional as F

from sigec.kernels import tile_conv, tile_conv_reference, tile_conv_triton
from sigec.runtime.masks import active_tiles, blob_mask

BIG = (64, 32, 32, 4, 1)  # large blocks: few programs under the CPU interpreter


def _setup(n=2, cin=5, cout=6, h=11, w=9, k=3, stride=1, padding=1, dilation=1, tile=4, seed=3,
           dtype=torch.float32):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype)
    bias = torch.randn(cout, generator=g).to(dtype)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    mask = blob_mask(ho, wo, 0.3, seed=seed)
    mask[-1, -1] = True  # a tile hanging off the bottom-right edge
    kernel = dilation * (k - 1) + 1
    ts = active_tiles(mask, kernel, stride, padding, tile=tile)
    return x, weight, bias, ts, (n, cout, ho, wo), mask


def _second_part(x, weight, shape, k, dtype, seed):
    """A 4-channel second input part (a skip concat) with its weights appended, the norm's
    scale / shift over all 11 input channels, and a residual map."""
    g = torch.Generator().manual_seed(seed)
    x2 = torch.randn(x.shape[0], 4, *x.shape[2:], generator=g).to(dtype)
    weight = torch.cat([weight, torch.randn(5, 4, k, k, generator=g).to(dtype) / 6], dim=1)
    scale = torch.rand(x.shape[0], 11, generator=g) + 0.5
    shift = torch.randn(x.shape[0], 11, generator=g)
    return x2, weight, scale, shift, torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize(
    "k,stride,padding,dilation",
    [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2), (1, 1, 1, 1)],
    ids=["3x3", "1x1", "3x3-stride2", "3x3-dilated", "1x1-padded"],
)
def test_reference_equals_dense_on_written_tiles(k, stride, padding, dilation):
    x, weight, bias, ts, shape, mask = _setup(k=k, stride=stride, padding=padding,
                                              dilation=dilation)  # fmt: skip
    dense = F.conv2d(x, weight, bias, stride, padding, dilation)
    out = torch.full(shape, float("nan"))
    tile_conv_reference(out, [x], weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile,
                        [stride] * 2, [dilation] * 2)  # fmt: skip
    written = ~out[0, 0].isnan()
    assert written[mask].all()
    torch.testing.assert_close(out[:, :, written], dense[:, :, written], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "k,stride,padding,dilation",
    [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2)],
    ids=["3x3", "1x1", "3x3-stride2", "3x3-dilated"],
)
def test_triton_equals_reference(k, stride, padding, dilation):
    x, weight, bias, ts, shape, _ = _setup(k=k, stride=stride, padding=padding,
                                           dilation=dilation)  # fmt: skip
    args = (weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile, [stride] * 2,
            [dilation] * 2)  # fmt: skip
    want = torch.full(shape, 7.0)
    got = want.clone()
    tile_conv_reference(want, [x], *args)
    tile_conv_triton(got, [x], *args, blocks=BIG)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got == 7.0, want == 7.0)  # untouched pixels stay untouched


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_fused_concat_prologue_residual_and_capacity(dtype, atol):
    """Two parts (a decoder's skip concat), norm + SiLU prologue, residual, padding rows."""
    x, weight, bias, ts, shape, _ = _setup(cin=7, cout=5, dtype=dtype, seed=5)
    x2, weight, scale, shift, residual = _second_part(x, weight, shape, 3, dtype, 1)
    m = ts.out_corners.shape[0]
    pad = torch.tensor([[-100, -100]] * 3, dtype=torch.int32)  # never read: rows past the count
    in_c, out_c = torch.cat([ts.in_corners, pad]), torch.cat([ts.out_corners, pad])
    count = torch.tensor([m], dtype=torch.int32)
    args = ([x, x2], weight, bias, in_c, out_c, *ts.out_tile, [1, 1], [1, 1], scale, shift,
            "silu", 0.01, residual, count)  # fmt: skip
    want = torch.zeros(shape, dtype=dtype)
    got = want.clone()
    tile_conv_reference(want, *args)
    tile_conv_triton(got, *args, check_values=False, blocks=BIG)
    torch.testing.assert_close(got.float(), want.float(), rtol=atol, atol=atol)
    # the same through the reference pieces: concat tiles, conv, add residual
    xc = torch.cat([x, x2], 1).float()
    dense = F.conv2d(F.silu(xc * scale[:, :, None, None] + shift[:, :, None, None]).to(dtype)
                     .float(), weight.float(), bias.float(), 1, 1) + residual.float()  # fmt: skip
    written = want[0, 0] != 0
    torch.testing.assert_close(got.float()[:, :, written], dense[:, :, written], rtol=atol,
                               atol=atol)  # fmt: skip


def test_channels_last_maps_and_weights():
    x, weight, bias, ts, shape, _ = _setup(cin=6, cout=7, seed=2)
    args = (bias, ts.in_corners, ts.out_corners, *ts.out_tile, [1, 1], [1, 1])
    want = torch.zeros(shape)
    tile_conv_reference(want, [x], weight, *args)
    cl = torch.channels_last
    got = torch.zeros(shape).contiguous(memory_format=cl)
    tile_conv_triton(got, [x.contiguous(memory_format=cl)], weight.contiguous(memory_format=cl),
                     *args, blocks=BIG)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_residual_may_be_out_itself():
    x, weight, bias, ts, shape, _ = _setup(seed=4)
    base = torch.randn(shape)
    args = ([x], weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile, [1, 1], [1, 1])
    want, got = base.clone(), base.clone()
    tile_conv_reference(want, *args, residual=want)
    tile_conv_triton(got, *args, residual=got, blocks=BIG)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_default_blocks_and_public_op():
    x, weight, bias, ts, shape, _ = _setup(cin=4, cout=4, h=6, w=6, seed=6)
    args = ([x], weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile, [1, 1], [1, 1])
    want, got, op = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    tile_conv_reference(want, *args)
    tile_conv_triton(got, *args)  # the launch heuristic's blocks
    tile_conv(op, *args)  # CPU: the reference
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(op, want)
    torch.library.opcheck(torch.ops.sigec.tile_conv.default, (torch.zeros(shape), *args),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def _bad(**override):
    x, weight, bias, ts, shape, _ = _setup(seed=7)
    kw = dict(out=torch.zeros(shape), parts=[x], weight=weight, bias=bias,
              in_corners=ts.in_corners, out_corners=ts.out_corners, tile_h=ts.out_tile[0],
              tile_w=ts.out_tile[1], stride=[1, 1], dilation=[1, 1])  # fmt: skip
    kw.update(override)
    return kw


@pytest.mark.parametrize(
    "override,exc,words",
    [
        (dict(weight=torch.zeros(6, 4, 3, 3)), ValueError, "weight: expected [Co=6, Ci=5"),
        (dict(weight=torch.zeros(6, 5, 3, 3, dtype=torch.float16)), TypeError, "weight"),
        (dict(parts=[torch.zeros(2, 5, 11, 9)] * 3), ValueError, "one or two input maps"),
        (dict(parts=[torch.zeros(1, 5, 11, 9)]), ValueError, "parts[0]"),
        (dict(bias=torch.zeros(3)), ValueError, "bias: expected [6]"),
        (dict(stride=[0, 1]), ValueError, "stride"),
        (dict(scale=torch.ones(2, 4)), ValueError, "scale: expected shape [N, C_in]"),
        (dict(residual=torch.zeros(2, 6, 3, 3)), ValueError, "residual"),
        (dict(in_corners=torch.zeros(1, 2, dtype=torch.int32)), ValueError, "same tiles"),
        (dict(out_corners=torch.tensor([[90, 0]], dtype=torch.int32),
              in_corners=torch.tensor([[0, 0]], dtype=torch.int32)), ValueError, "out of range"),
        (dict(upsample=0), ValueError, "upsample: expected an integer factor >= 1"),
    ],
    ids=["weight-channels", "weight-dtype", "three-parts", "part-batch", "bias", "stride",
         "scale", "residual", "corner-count", "corner-range", "upsample-zero"],
)  # fmt: skip
def test_bad_input_is_a_typed_error(override, exc, words):
    with pytest.raises(exc) as e:
        tile_conv(**_bad(**override))
    assert words in str(e.value)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
@pytest.mark.parametrize("k, stride, dilation", [(3, 1, 1), (7, 1, 1), (3, 2, 1), (3, 1, 2)],
                         ids=["3x3", "7x7", "3x3-stride2", "3x3-dilated"])  # fmt: skip
def test_folded_pad_modes_equal_the_padded_dense_conv(mode, k, stride, dilation):
    """``conv(F.pad(x, p, mode))`` with the pad folded into the conv (its padding p read through
    the pad mode): reference and Triton kernel both equal the dense conv on the padded map."""
    p = dilation * (k - 1) // 2
    x, weight, bias, ts, shape, mask = _setup(k=k, stride=stride, padding=p, dilation=dilation,
                                              h=11, w=13)  # fmt: skip
    dense = F.conv2d(F.pad(x, (p, p, p, p), mode=mode), weight, bias, stride, 0, dilation)
    args = (weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile, [stride] * 2,
            [dilation] * 2)  # fmt: skip
    for impl in (tile_conv_reference, tile_conv_triton):
        out = torch.full(shape, float("nan"))
        extra = {"blocks": BIG} if impl is tile_conv_triton else {}
        impl(out, [x], *args, pad_mode=mode, **extra)
        written = ~out[0, 0].isnan()
        assert written[mask].all()
        torch.testing.assert_close(out[:, :, written], dense[:, :, written], rtol=1e-5,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("factor, mode", [(2, "zeros"), (3, "zeros"), (2, "reflect")])
def test_upsampled_input_equals_the_conv_of_the_upsampled_map(factor, mode):
    """``conv(upsample_nearest(x, f))`` with ``upsample=f``: the kernel reads x through the
    lookup, never the upsampled map; reference and Triton equal the dense conv of the upsampled
    map on every written pixel (with a folded norm + SiLU prologue and a residual)."""
    g = torch.Generator().manual_seed(5)
    n, cin, cout, h, w = 2, 5, 6, 5, 4
    x = torch.randn(n, cin, h, w, generator=g)
    up = F.interpolate(x, scale_factor=factor, mode="nearest")
    weight = torch.randn(cout, cin, 3, 3, generator=g) / 6
    bias = torch.randn(cout, generator=g)
    scale, shift = torch.randn(n, cin, generator=g), torch.randn(n, cin, generator=g)
    residual = torch.randn(n, cout, h * factor, w * factor, generator=g)
    mask = blob_mask(h * factor, w * factor, 0.3, seed=2)
    mask[-1, -1] = True
    ts = active_tiles(mask, 3, 1, 1, tile=4)
    act_in = F.silu(up * scale[:, :, None, None] + shift[:, :, None, None])
    if mode == "zeros":
        dense = F.conv2d(act_in, weight, bias, 1, 1) + residual
    else:
        dense = F.conv2d(F.pad(act_in, (1, 1, 1, 1), mode=mode), weight, bias) + residual
    args = (weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile, [1, 1], [1, 1], scale,
            shift, "silu", 0.01, residual)  # fmt: skip
    for impl in (tile_conv_reference, tile_conv_triton):
        out = torch.full(residual.shape, float("nan"))
        extra = {"blocks": BIG} if impl is tile_conv_triton else {}
        impl(out, [x], *args, pad_mode=mode, upsample=factor, **extra)
        written = ~out[0, 0].isnan()
        assert written[mask].all()
        torch.testing.assert_close(out[:, :, written], dense[:, :, written], rtol=1e-5,
                                   atol=1e-5)  # fmt: skip


def _windows(parts, ts, k, stride, dilation, scale, shift, act, count=None):
    """The gathered input windows of every part (what the runtime's gather hands the conv)."""
    from sigec.kernels import gather_parts, gather_reference

    in_h = (ts.out_tile[0] - 1) * stride + dilation * (k - 1) + 1
    in_w = (ts.out_tile[1] - 1) * stride + dilation * (k - 1) + 1
    out, off = [], 0
    for p in parts:
        c = p.shape[1]
        out.append(gather_parts(gather_reference, [p], ts.in_corners, in_h, in_w,
                                None if scale is None else scale[:, off:off + c],
                                None if shift is None else shift[:, off:off + c], act, 0.01,
                                count))  # fmt: skip
        off += c
    return out


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (3, 1, 2), (1, 1, 1)],
                         ids=["3x3", "3x3-stride2", "3x3-dilated", "1x1"])  # fmt: skip
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_conv_on_gathered_tiles_equals_the_fused_prologue(k, stride, dilation, dtype, atol):
    """``input_tiles=True``: the parts are gather's windows with the norm + SiLU prologue
    applied once; the conv on them (two parts, residual, capacity rows) equals the conv that
    applies the prologue itself, for the reference and the Triton kernel."""
    pad = dilation * (k - 1) // 2
    x, weight, bias, ts, shape, _ = _setup(cin=7, cout=5, k=k, stride=stride, padding=pad,
                                           dilation=dilation, dtype=dtype, seed=8)  # fmt: skip
    x2, weight, scale, shift, residual = _second_part(x, weight, shape, k, dtype, 2)
    m = ts.out_corners.shape[0]
    filler = torch.tensor([[-100, -100]] * 2, dtype=torch.int32)
    in_c, out_c = torch.cat([ts.in_corners, filler]), torch.cat([ts.out_corners, filler])
    count = torch.tensor([m], dtype=torch.int32)
    geo = (weight, bias, in_c, out_c, *ts.out_tile, [stride] * 2, [dilation] * 2)
    want = torch.zeros(shape, dtype=dtype)
    tile_conv_reference(want, [x, x2], *geo, scale, shift, "silu", 0.01, residual, count)

    class _Tiles:  # the tile set with the capacity rows
        in_corners, out_tile = in_c, ts.out_tile

    windows = _windows([x, x2], _Tiles, k, stride, dilation, scale, shift, "silu", count)
    assert windows[0].shape[0] == x.shape[0] * (m + 2)
    for impl, extra in ((tile_conv_reference, {}), (tile_conv_triton, {"blocks": BIG})):
        got = torch.zeros(shape, dtype=dtype)
        impl(got, windows, *geo, None, None, "identity", 0.01, residual, count,
             input_tiles=True, **extra)  # fmt: skip
        torch.testing.assert_close(got.float(), want.float(), rtol=atol, atol=atol)


@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("input_tiles", [False, True], ids=["map", "tiles"])
def test_split_k_equals_one_program_per_block(split, input_tiles):
    """Split-K: the reduction spread over ``split`` programs per output block (two parts, so
    the second part's steps continue the first's) gives the unsplit result, and leaves the
    shared workspace and counters zero for the next launch."""
    from sigec.kernels.conv import split_k_workspace

    x, weight, bias, ts, shape, _ = _setup(cin=6, cout=5, seed=9)
    g = torch.Generator().manual_seed(4)
    x2 = torch.randn(x.shape[0], 3, *x.shape[2:], generator=g)
    weight = torch.cat([weight, torch.randn(5, 3, 3, 3, generator=g) / 6], dim=1)
    residual = torch.randn(shape, generator=g)
    geo = (weight, bias, ts.in_corners, ts.out_corners, *ts.out_tile, [1, 1], [1, 1])
    parts = _windows([x, x2], ts, 3, 1, 1, None, None, "identity") if input_tiles else [x, x2]
    blocks = (32, 8, 2, 4, 1)  # 2-channel steps: 9 taps x (3 + 2) channel blocks = 45 steps
    want = torch.full(shape, 3.0)
    tile_conv_reference(want, [x, x2], *geo, residual=residual)
    got = torch.full(shape, 3.0)
    tile_conv_triton(got, parts, *geo, residual=residual, input_tiles=input_tiles,
                     split_k=split, blocks=blocks)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ws, locks = split_k_workspace(got.device)
    assert not ws.any() and not locks.any()


def test_split_k_choice():
    """Automatic split-K only for launches with fewer programs than SMs and a reduction of at
    least 12 steps: about sqrt(steps) slices, at most 16 and 8 programs per SM, never past the
    workspace."""
    from sigec.kernels.conv import SPLIT_K_BLOCKS, split_k_for

    assert split_k_for(programs=132, steps=72, block_elems=2048, sms=132) == 1  # fills the GPU
    assert split_k_for(programs=18, steps=18, block_elems=4096, sms=132) == 4  # ~sqrt(steps)
    assert split_k_for(programs=120, steps=180, block_elems=2048, sms=132) == 8  # 8 per SM
    assert split_k_for(programs=8, steps=400, block_elems=2048, sms=132) == 16  # the cap
    assert split_k_for(programs=16, steps=11, block_elems=4096, sms=132) == 1  # too short
    assert split_k_for(programs=8, steps=72, block_elems=128 * 64, sms=132) == 1  # big blocks
    assert split_k_for(programs=SPLIT_K_BLOCKS + 1, steps=72, block_elems=64, sms=10**6) == 1
    assert split_k_for(programs=8, steps=72, block_elems=2048, sms=0) == 1  # the interpreter


def test_input_tiles_misuse_is_a_typed_error():
    x, weight, bias, ts, shape, _ = _setup(seed=7)
    windows = _windows([x], ts, 3, 1, 1, None, None, "identity")
    base = dict(out=torch.zeros(shape), weight=weight, bias=bias, in_corners=ts.in_corners,
                out_corners=ts.out_corners, tile_h=ts.out_tile[0], tile_w=ts.out_tile[1],
                stride=[1, 1], dilation=[1, 1], input_tiles=True)  # fmt: skip
    with pytest.raises(ValueError, match="expected a tile batch"):
        tile_conv(parts=[x], **base)  # a map where windows belong
    with pytest.raises(ValueError, match="prologue belongs to the gather"):
        tile_conv(parts=windows, activation="silu", **base)
    with pytest.raises(ValueError, match="split_k"):
        tile_conv(parts=windows, split_k=-1, **base)


@pytest.mark.parametrize(
    "k,stride,dilation,tile,pad_mode,up",
    [(3, 1, 1, 4, "zeros", 1), (3, 2, 1, 4, "zeros", 1), (3, 1, 2, 3, "zeros", 1),
     (1, 1, 1, 4, "zeros", 1), (3, 1, 1, 5, "reflect", 1), (3, 1, 1, 4, "zeros", 2)],
    ids=["3x3", "3x3-stride2", "3x3-dilated-3x3tiles", "1x1", "reflect-5x5tiles", "upsampled"],
)  # fmt: skip
@pytest.mark.parametrize("split", [1, 2, 4])  # 27 steps: 14- and 7-step slices cross blocks
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_window_conv_equals_the_reference(k, stride, dilation, tile, pad_mode, up, split, dtype,
                                          atol):  # fmt: skip
    """``stage_windows=True``: the window conv (prologue once per staged input pixel, then the
    taps, one launch) equals the reference with two parts, norm + SiLU prologue, residual,
    capacity rows past the count, folded pads, an upsampled input and split-K (contiguous step
    slices that cross channel blocks and the boundary between the parts)."""
    from sigec.kernels.conv import split_k_workspace

    pad = dilation * (k - 1) // 2
    x, weight, bias, ts, shape, _ = _setup(cin=7, cout=5, h=11 * up, w=9 * up, k=k,
                                           stride=stride, padding=pad, dilation=dilation,
                                           tile=tile, dtype=dtype, seed=11)  # fmt: skip
    x = x[:, :, ::up, ::up].contiguous()  # read as its upsampling by ``up``
    x2, weight, scale, shift, residual = _second_part(x, weight, shape, k, dtype, 6)
    m = ts.out_corners.shape[0]
    filler = torch.tensor([[-100, -100]] * 5, dtype=torch.int32)  # never read: past the count
    in_c, out_c = torch.cat([ts.in_corners, filler]), torch.cat([ts.out_corners, filler])
    count = torch.tensor([m], dtype=torch.int32)
    args = ([x, x2], weight, bias, in_c, out_c, *ts.out_tile, [stride] * 2, [dilation] * 2,
            scale, shift, "silu", 0.01, residual, count)  # fmt: skip
    want = torch.full(shape, 5.0, dtype=dtype)
    tile_conv_reference(want, *args, pad_mode=pad_mode, upsample=up)
    got = torch.full(shape, 5.0, dtype=dtype)
    tile_conv_triton(got, *args, check_values=False, pad_mode=pad_mode, upsample=up,
                     split_k=split, blocks=(32, 8, 4, 4, 1), stage_windows=True)  # fmt: skip
    torch.testing.assert_close(got.float(), want.float(), rtol=atol, atol=atol)
    assert torch.equal(got == 5.0, want == 5.0)  # untouched pixels stay untouched
    ws, locks = split_k_workspace(got.device)
    assert not ws.any() and not locks.any()


def test_window_conv_rows_and_misuse():
    """Whole tiles per program (at least one, rows rounded to a power of two); the window conv
    reads maps, not gathered windows."""
    from sigec.kernels.window_conv import window_rows

    assert window_rows(4, 4, 64) == (4, 64)
    assert window_rows(3, 3, 32) == (3, 32)  # 27 rows in a block of 32
    assert window_rows(8, 8, 32) == (1, 64)  # one tile larger than the asked rows
    x, weight, bias, ts, shape, _ = _setup(seed=7)
    windows = _windows([x], ts, 3, 1, 1, None, None, "identity")
    with pytest.raises(ValueError, match="stage_windows"):
        tile_conv(torch.zeros(shape), windows, weight, bias, ts.in_corners, ts.out_corners,
                  *ts.out_tile, [1, 1], [1, 1], input_tiles=True, stage_windows=True)  # fmt: skip
