"""The Triton kernels on a CUDA GPU, against the CPU reference (skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from sigec.kernels import (
    ACTIVATIONS,
    gather,
    gather_reference,
    restore_reference,
    scatter_reference,
    tile_conv_reference,
    tile_conv_triton,
)
from sigec.runtime.masks import active_tiles, blob_mask
from tests.kernels.cases import TILE_CASES, corners_tensor

pytestmark = pytest.mark.gpu

GPU_DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES)
@pytest.mark.parametrize("n, c, h, w, th, tw, corners", TILE_CASES)
def test_ops_on_cuda_match_reference(n, c, h, w, th, tw, corners, dtype, atol, rtol, memory_format):
    co = corners_tensor(corners)
    x = torch.randn(n, c, h, w).to(dtype).to(memory_format=memory_format)
    xg, cog = x.cuda(), co.cuda()
    # pure copies: bit-exact
    torch.testing.assert_close(
        torch.ops.sigec.gather(xg, cog, th, tw).cpu(),
        gather_reference(x, co, th, tw),
        atol=0,
        rtol=0,
    )
    tiles = torch.randn(n * len(corners), c, th, tw).to(dtype)
    res = torch.randn(n, c, h, w).to(dtype)
    out = torch.randn(n, c, h, w).to(dtype).to(memory_format=memory_format)
    out_g = out.cuda()
    bias = torch.randn(c).to(dtype)
    torch.ops.sigec.scatter(out_g, tiles.cuda(), cog, res.cuda(), bias=bias.cuda())
    scatter_reference(out, tiles, co, res, bias=bias)
    torch.testing.assert_close(out_g.cpu(), out, atol=0, rtol=0)
    work_g = out_g.clone()
    torch.ops.sigec.restore(work_g, xg, cog, th, tw)
    restore_reference(out, x, co, th, tw)
    torch.testing.assert_close(work_g.cpu(), out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_gather_prologue_on_cuda(act, dtype, atol, rtol):
    co = corners_tensor([(-2, -2), (2, 5), (4, 0)])
    x = torch.randn(2, 37, 6, 7).to(dtype)
    scale, shift = torch.randn(2, 37), torch.randn(2, 37)
    for act_first in (False, True):
        args = (co, 4, 4, scale, shift, act, 0.2, act_first)
        got = torch.ops.sigec.gather(x.cuda(), co.cuda(), *args[1:3], scale.cuda(), shift.cuda(),
                                     *args[5:])  # fmt: skip
        torch.testing.assert_close(got.cpu(), gather_reference(x, *args), atol=atol, rtol=rtol)


@pytest.mark.parametrize("factor", [2, 4])
def test_gather_through_an_upsampling_on_cuda(factor):
    """``upsample=f`` on the GPU: the tiles of the nearest-upsampled map, bit for bit."""
    x = torch.randn(2, 37, 6, 5, dtype=torch.float16)
    co = corners_tensor([(-1, -1), (3, 2), (6 * factor - 2, 5 * factor - 3)])
    up = F.interpolate(x.float(), scale_factor=factor, mode="nearest").half()
    got = torch.ops.sigec.gather(x.cuda(), co.cuda(), 4, 4, upsample=factor)
    torch.testing.assert_close(got.cpu(), gather_reference(up, co, 4, 4), atol=0, rtol=0)


def test_64_bit_offsets():
    # 33 * 8192 * 8192 > 2**31 elements: the last channel is past the int32 range
    x = torch.empty(1, 33, 8192, 8192, dtype=torch.float16, device="cuda")
    x[0, -1, -8:, -8:] = torch.randn(8, 8, device="cuda").half()
    co = torch.tensor([[8190, 8190]], dtype=torch.int32, device="cuda")
    tiles = torch.ops.sigec.gather(x, co, 4, 4)
    torch.testing.assert_close(tiles[0, -1, :2, :2], x[0, -1, -2:, -2:], atol=0, rtol=0)
    assert (tiles[0, :, 2:, :] == 0).all() and (tiles[0, :, :, 2:] == 0).all()
    new = torch.randn_like(tiles)
    torch.ops.sigec.scatter(x, new, co)
    torch.testing.assert_close(x[0, -1, -2:, -2:], new[0, -1, :2, :2], atol=0, rtol=0)


@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES)
def test_sparse_conv_on_cuda_without_host_sync(dtype, atol, rtol):
    x = torch.randn(2, 16, 64, 64, device="cuda", dtype=dtype)
    weight = torch.randn(32, 16, 3, 3, device="cuda", dtype=dtype) / 12
    dense = F.conv2d(x, weight, padding=1)
    mask = blob_mask(64, 64, 0.05, seed=0, device="cuda")
    out = torch.zeros_like(dense)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        tiles = active_tiles(mask, 3, 1, 1, 6, capacity=128)
        batch = torch.ops.sigec.gather(x, tiles.in_corners, *tiles.in_tile,
                                       num_active=tiles.num_active, check_values=False)  # fmt: skip
        out_tiles = F.conv2d(batch, weight)
        torch.ops.sigec.scatter(out, out_tiles, tiles.out_corners, num_active=tiles.num_active,
                                check_values=False)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out[:, :, mask], dense[:, :, mask], atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("window", [False, True], ids=["per-tap", "window"])
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES)
@pytest.mark.parametrize(
    "c1, c2, co, k, stride, up",
    [(64, 0, 128, 3, 1, 1), (96, 64, 64, 3, 1, 1), (128, 0, 64, 1, 1, 1), (32, 0, 48, 3, 2, 1),
     (64, 32, 64, 3, 1, 2)],
)  # fmt: skip
def test_tile_conv_on_cuda_matches_reference(c1, c2, co, k, stride, up, dtype, atol, rtol,
                                             window):  # fmt: skip
    """Fused tile conv with the launch heuristic's blocks, channels-last, capacity padding, a
    norm + SiLU prologue and a residual; no host sync. ``up``: the inputs read through a
    nearest upsampling (``upsample``); ``window``: the window conv (``stage_windows``)."""
    cl = torch.channels_last
    parts = [torch.randn(2, c, 40 // up, 36 // up) for c in (c1, c2) if c]
    weight = torch.randn(co, c1 + c2, k, k) / ((c1 + c2) * k * k) ** 0.5
    bias = torch.randn(co)
    scale, shift = torch.rand(2, c1 + c2) + 0.5, torch.randn(2, c1 + c2)
    ho, wo = (40 + 2 * (k // 2) - k) // stride + 1, (36 + 2 * (k // 2) - k) // stride + 1
    residual = torch.randn(2, co, ho, wo)
    mask = blob_mask(ho, wo, 0.1, seed=1)
    tiles = active_tiles(mask, k, stride, k // 2, 6, capacity=64)
    args = (weight, bias, tiles.in_corners, tiles.out_corners, *tiles.out_tile, [stride] * 2,
            [1, 1], scale, shift, "silu", 0.01, residual, tiles.num_active)  # fmt: skip
    want = torch.zeros(2, co, ho, wo)
    rounded = [a.to(dtype).float() if isinstance(a, torch.Tensor) and a.is_floating_point()
               else a for a in args]  # fmt: skip
    tile_conv_reference(want, [p.to(dtype).float() for p in parts], *rounded, upsample=up)
    g = lambda a: a.to(dtype).cuda() if a.is_floating_point() else a.cuda()  # noqa: E731
    got = torch.zeros(2, co, ho, wo, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    gargs = [g(a) if isinstance(a, torch.Tensor) else a for a in args]
    gargs[0] = gargs[0].contiguous(memory_format=cl)
    gparts = [g(p).contiguous(memory_format=cl) for p in parts]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.sigec.tile_conv(got, gparts, *gargs, check_values=False, upsample=up,
                                  stage_windows=window)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(0)
    tol = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("split", [1, 4, 7])
@pytest.mark.parametrize("path", ["map", "tiles", "window"])
def test_tile_conv_split_k_and_tile_inputs_in_a_graph_on_cuda(path, split):
    """A long reduction over few tiles (320 + 320 channels, 3x3), read from the map with the
    prologue in the kernel (per tap, or once per staged window pixel: ``window``) or from
    gather's windows with the prologue applied there, its
    reduction split over ``split`` programs; captured in a CUDA graph and replayed three times
    with new tiles each time: every replay equals the reference, and the split-K workspace and
    counters are zero again after each."""
    from sigec.kernels import gather_parts
    from sigec.kernels.conv import split_k_workspace

    torch.manual_seed(11)
    cl, dt = torch.channels_last, torch.float16
    parts = [torch.randn(2, 320, 32, 32, device="cuda", dtype=dt).contiguous(memory_format=cl)
             for _ in range(2)]  # fmt: skip
    weight = (torch.randn(320, 640, 3, 3, device="cuda", dtype=dt) / 80).contiguous(
        memory_format=cl)  # fmt: skip
    bias = torch.randn(320, device="cuda", dtype=dt)
    scale = torch.rand(2, 640, device="cuda") + 0.5
    shift = torch.randn(2, 640, device="cuda")
    residual = torch.randn(2, 320, 32, 32, device="cuda", dtype=dt).contiguous(memory_format=cl)
    tiles = active_tiles(blob_mask(32, 32, 0.05, seed=0), 3, 1, 1, 6, capacity=16)
    in_c, out_c, count = (tiles.in_corners.cuda(), tiles.out_corners.cuda(),
                          tiles.num_active.cuda())  # fmt: skip
    out = torch.zeros(2, 320, 32, 32, device="cuda", dtype=dt).contiguous(memory_format=cl)

    def run():
        if path == "tiles":
            windows = gather_parts(gather, parts, in_c, 8, 8, scale, shift, "silu", 0.01, count,
                                   concat=False)  # fmt: skip
            tile_conv_triton(out, windows, weight, bias, in_c, out_c, 6, 6, [1, 1], [1, 1],
                             residual=residual, num_active=count, check_values=False,
                             input_tiles=True, split_k=split)  # fmt: skip
        else:
            tile_conv_triton(out, parts, weight, bias, in_c, out_c, 6, 6, [1, 1], [1, 1],
                             scale, shift, "silu", 0.01, residual, count, check_values=False,
                             split_k=split, stage_windows=path == "window")  # fmt: skip

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in (1, 2, 3):
        new = active_tiles(blob_mask(32, 32, 0.02 * seed, seed=seed), 3, 1, 1, 6, capacity=16)
        in_c.copy_(new.in_corners.cuda())
        out_c.copy_(new.out_corners.cuda())
        count.copy_(new.num_active.cuda())
        out.zero_()
        graph.replay()
        want = torch.zeros(2, 320, 32, 32)
        tile_conv_reference(want, [p.float().cpu() for p in parts], weight.float().cpu(),
                            bias.float().cpu(), new.in_corners, new.out_corners, 6, 6, [1, 1],
                            [1, 1], scale.cpu(), shift.cpu(), "silu", 0.01,
                            residual.float().cpu(), new.num_active)  # fmt: skip
        torch.testing.assert_close(out.float().cpu(), want, atol=3e-2, rtol=3e-2)
        if split > 1:
            ws, counters = split_k_workspace(out.device)
            assert not ws.any() and not counters.any()


@pytest.mark.parametrize("seed", range(16))
def test_tile_conv_split_k_matches_unsplit_on_cuda(seed):
    """Random shapes (1-2 parts of 128-1280 channels, 1x1 / 3x3, maps of 16-64, with or without
    the prologue and residual, on the map or on gathered windows) and split factors 2-16: three
    split launches in a row each equal the unsplit launch (the order of the fp32 sums differs),
    and leave the workspace zero. The plain-load version of the last program's read failed this
    on an H200 in a few elements of most launches."""
    import random

    from sigec.kernels import gather_parts
    from sigec.kernels.conv import split_k_workspace

    rng = random.Random(seed)
    torch.manual_seed(seed)
    cl, dt = torch.channels_last, torch.float16
    n, res, k = rng.choice([1, 2]), rng.choice([16, 32, 64]), rng.choice([3, 3, 1])
    parts_c = rng.choice([(128,), (256,), (320,), (640,), (1280,), (256, 128), (640, 320)])
    co, cin = rng.choice([128, 320, 640]), sum(parts_c)
    parts = [torch.randn(n, c, res, res, device="cuda", dtype=dt).contiguous(memory_format=cl)
             for c in parts_c]  # fmt: skip
    weight = torch.randn(co, cin, k, k, device="cuda", dtype=dt) / (cin * k * k) ** 0.5
    weight = weight.contiguous(memory_format=cl)
    bias = torch.randn(co, device="cuda", dtype=dt)
    prologue, tiled = rng.random() < 0.7, rng.random() < 0.5
    scale = torch.rand(n, cin, device="cuda") + 0.5 if prologue else None
    shift = torch.randn(n, cin, device="cuda") if prologue else None
    act = "silu" if prologue else "identity"
    residual = None
    if rng.random() < 0.5:
        residual = torch.randn(n, co, res, res, device="cuda", dtype=dt)
        residual = residual.contiguous(memory_format=cl)
    mask = blob_mask(res, res, rng.choice([0.01, 0.02, 0.05, 0.1]), seed=seed, device="cuda")
    ts = active_tiles(mask, k, 1, k // 2, 6 if k == 3 else 4, capacity=64)
    split = rng.choice([2, 3, 4, 8, 16])
    window = not tiled and rng.random() < 0.5  # the window conv (prologue once per pixel)
    out = torch.zeros(n, co, res, res, device="cuda", dtype=dt).contiguous(memory_format=cl)

    def run(split_k):
        out.zero_()
        if tiled:
            windows = gather_parts(gather, parts, ts.in_corners, *ts.in_tile, scale, shift, act,
                                   0.01, ts.num_active, concat=False)  # fmt: skip
            tile_conv_triton(out, windows, weight, bias, ts.in_corners, ts.out_corners,
                             *ts.out_tile, [1, 1], [1, 1], residual=residual,
                             num_active=ts.num_active, check_values=False, input_tiles=True,
                             split_k=split_k)  # fmt: skip
        else:
            tile_conv_triton(out, parts, weight, bias, ts.in_corners, ts.out_corners,
                             *ts.out_tile, [1, 1], [1, 1], scale, shift, act, 0.01, residual,
                             ts.num_active, check_values=False, split_k=split_k,
                             stage_windows=window)  # fmt: skip
        return out.float().clone()

    want = run(1)
    for _ in range(3):
        torch.testing.assert_close(run(split), want, atol=1e-2, rtol=1e-2)
    ws, counters = split_k_workspace(out.device)
    assert not ws.any() and not counters.any()


def test_restore_batch_on_cuda_in_a_graph():
    """One launch restores maps of three dtypes and formats; captured in a CUDA graph, a replay
    reads the counts (and tiles) current at replay time."""
    from sigec.kernels.restore import RestoreBatch

    items, wants = [], []
    for i, (n, c, h, w, th, tw, corners) in enumerate(p.values for p in TILE_CASES):
        dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
        work = torch.randn(n, c, h, w, device="cuda").to(dtype)
        if i % 2:
            work = work.contiguous(memory_format=torch.channels_last)
        cache = torch.randn(n, c, h, w, device="cuda").to(dtype)
        co = corners_tensor(corners).cuda()
        count = torch.tensor([len(corners)], dtype=torch.int32, device="cuda")
        items.append((work, cache, co, count, th, tw))
        want = work.cpu()
        restore_reference(want, cache.cpu(), co.cpu(), th, tw)
        wants.append(want)
    originals = [it[0].clone() for it in items]
    # without counts (exact tile lists: every row is real), outside a graph
    RestoreBatch([(w, c, co, None, th, tw) for w, c, co, _, th, tw in items])()
    for it, want, orig in zip(items, wants, originals, strict=True):
        torch.testing.assert_close(it[0].cpu(), want, atol=0, rtol=0)
        it[0].copy_(orig)
    batch = RestoreBatch(items)
    assert batch.use_triton and len(batch.launches) == 3
    batch()  # compiles, outside the capture
    for it, orig in zip(items, originals, strict=True):
        it[0].copy_(orig)
    graph = _replay_captured(batch)
    for (work, *_), want in zip(items, wants, strict=True):
        torch.testing.assert_close(work.cpu(), want, atol=0, rtol=0)
    for it, orig in zip(items, originals, strict=True):  # count 0: a replay copies nothing
        it[0].copy_(orig)
        it[3].zero_()
    graph.replay()
    torch.cuda.synchronize()
    for (work, *_), orig in zip(items, originals, strict=True):
        assert torch.equal(work, orig)


def test_restore_batch_vector_copies_on_cuda_in_a_graph():
    """The channels-last vector path compiled for the GPU (address hints, no channel mask):
    bit-exact against the reference, also replayed from a CUDA graph with counts."""
    from sigec.kernels.restore import RestoreBatch, vector_width
    from tests.kernels.cases import vector_restore_items

    items, wants = vector_restore_items("cuda")
    assert sum(vector_width(w, c) > 0 for w, c, *_ in items) == len(items) - 1
    originals = [it[0].clone() for it in items]
    batch = RestoreBatch(items)
    batch()
    for (work, *_), want in zip(items, wants, strict=True):
        torch.testing.assert_close(work.cpu(), want, atol=0, rtol=0)
    for it, orig in zip(items, originals, strict=True):
        it[0].copy_(orig)
    _replay_captured(batch)
    for (work, *_), want in zip(items, wants, strict=True):
        torch.testing.assert_close(work.cpu(), want, atol=0, rtol=0)


def _replay_captured(fn) -> torch.cuda.CUDAGraph:
    """Capture ``fn`` (compiled already) in a CUDA graph, replay it once and wait for it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


@pytest.mark.parametrize("vector", [False, True], ids=["strided", "vector"])
def test_restore_batch_reads_and_writes_pinned_host_tensors(vector):
    """A slot kept on the host: the launch reads the tiles of a pinned cache (undo) and writes
    them into a pinned cache (commit), bit-exact, also replayed from a CUDA graph."""
    from sigec.kernels.restore import RestoreBatch, vector_width

    fmt = torch.channels_last if vector else torch.contiguous_format
    n, c, h, w, th, tw = 2, 16, 13, 17, 4, 4
    work = torch.randn(n, c, h, w, device="cuda").half().contiguous(memory_format=fmt)
    cache = torch.randn(n, c, h, w).half().contiguous(memory_format=fmt).pin_memory()
    co = torch.tensor([[0, 0], [8, 12], [12, 4]], dtype=torch.int32, device="cuda")
    count = torch.tensor([3], dtype=torch.int32, device="cuda")
    assert (vector_width(work, cache) > 0) == vector
    want = work.cpu()
    restore_reference(want, cache, co.cpu(), th, tw)
    undo = RestoreBatch([(work, cache, co, count, th, tw)])
    assert undo.use_triton
    undo()
    torch.cuda.synchronize()
    torch.testing.assert_close(work.cpu(), want, atol=0, rtol=0)
    work.copy_(torch.randn_like(work))  # commit: the edited tiles into the host cache
    want_cache = cache.clone()
    restore_reference(want_cache, work.cpu(), co.cpu(), th, tw)
    commit = RestoreBatch([(cache, work, co, count, th, tw)])
    _replay_captured(commit)
    torch.testing.assert_close(cache, want_cache, atol=0, rtol=0)


def test_precompiling_compiles_without_running():
    """Inside ``precompiling`` a launch writes nothing and its compile runs on the thread pool;
    after it the same launch finds the kernel compiled and computes the reference result."""
    from sigec.kernels import can_precompile, precompiling
    from sigec.kernels.conv import _tile_conv_kernel, tile_conv_triton

    assert can_precompile()  # triton >= 3.4 on CUDA: the warm-up's dry run is on
    torch.manual_seed(3)
    # a channel count no other test uses: a kernel this process has not compiled yet
    x = torch.randn(1, 40, 24, 24, device="cuda", dtype=torch.float16)
    weight = torch.randn(24, 40, 3, 3, device="cuda", dtype=torch.float16) / 20
    mask = blob_mask(24, 24, 0.2, seed=2)
    tiles = active_tiles(mask, 3, 1, 1, 6, capacity=16)
    args = (weight, None, tiles.in_corners.cuda(), tiles.out_corners.cuda(), *tiles.out_tile,
            [1, 1], [1, 1])  # fmt: skip
    kw = dict(num_active=tiles.num_active.cuda(), check_values=False)
    out = torch.zeros(1, 24, 24, 24, device="cuda", dtype=torch.float16)
    before = sum(len(c[0]) for c in _tile_conv_kernel.device_caches.values())
    with precompiling(4) as active:
        tile_conv_triton(out, [x], *args, **kw)
    torch.cuda.synchronize()
    assert active and bool((out == 0).all())  # nothing ran
    after = sum(len(c[0]) for c in _tile_conv_kernel.device_caches.values())
    assert after == before + 1  # one kernel compiled
    tile_conv_triton(out, [x], *args, **kw)
    assert sum(len(c[0]) for c in _tile_conv_kernel.device_caches.values()) == after  # reused
    want = torch.zeros(1, 24, 24, 24)
    tile_conv_reference(want, [x.float().cpu()], weight.float().cpu(), None,
                        *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args[2:]],
                        num_active=tiles.num_active)  # fmt: skip
    torch.testing.assert_close(out.float().cpu(), want, atol=2e-2, rtol=2e-2)
