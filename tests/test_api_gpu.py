"""sigec.compile end to end on a CUDA GPU (skipped without one)."""

import copy
import dataclasses

import pytest
import torch

import sigec
from sigec.models.configs import MODELS, build, build_on
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import ConvNet, init_bn

pytestmark = pytest.mark.gpu

EXACT = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 4, "1x1": 4, "pointwise": 4})


def test_engine_moves_to_cuda_with_its_caches():
    torch.manual_seed(0)
    model = init_bn(ConvNet())
    x = torch.randn(2, 3, 20, 22)
    engine = sigec.compile(model, (x,), config=EXACT)
    engine.record(x)
    engine.to("cuda")
    assert all(b.is_cuda for b in engine.slots["0"].buffers())
    mask = edit_masks(20, 22)["blob"]
    xe = apply_edit(x, mask).cuda()
    want = copy.deepcopy(model).cuda()(xe)
    torch.testing.assert_close(engine.edit(xe), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["ddpm-tiny", "gaugan-tiny", "sd15-unet-tiny"])
def test_fp16_on_cuda_matches_fp32_on_cpu(name):
    _, args, _ = build(name, seed=0)
    config = sigec.SparseConfig(**MODELS[name].sige_config)
    x = args[0]
    xe = apply_edit(x, edit_masks(*x.shape[-2:])["blob"])

    def run(device, dtype):
        m, a, kw = build_on(name, device, dtype)
        engine = sigec.compile(m, a, kw, config=config)
        engine.record(*a, **kw)
        out = engine.edit(xe.to(device=device, dtype=dtype), *a[1:], **kw)
        return getattr(out, "sample", out).float().cpu()

    torch.testing.assert_close(run("cuda", torch.float16), run("cpu", torch.float32),
                               rtol=2e-2, atol=2e-2)  # fmt: skip


@pytest.mark.parametrize("name", ["ddpm-tiny", "sd15-unet-tiny"])
def test_cuda_graph_edits_match_eager_edits_and_replay(name):
    model, args, kwargs = build_on(name, "cuda", torch.float16)
    base = dict(MODELS[name].sige_config, norm_stats="incremental")
    # no cost model on either: the eager path's MAC rule would run some edits densely
    eager = sigec.compile(model, args, kwargs, config=sigec.SparseConfig(**base, cost_model=False))
    graphed = sigec.compile(model, args, kwargs,
                            config=sigec.SparseConfig(**base, cuda_graphs=True,
                                                      cost_model=False))  # fmt: skip
    for e in (eager, graphed):
        e.record(*args, **kwargs)
    x = args[0]
    masks = edit_masks(*x.shape[-2:])
    for i, mask_name in enumerate(["blob", "pixel", "blob", "full", "blob"]):
        xe = apply_edit(x.cpu().float(), masks[mask_name], seed=i).to(x)
        want = getattr(eager.edit(xe, *args[1:], **kwargs), "sample", None)
        got = getattr(graphed.edit(xe, *args[1:], **kwargs), "sample", None)
        # padded lists change the tile batch, and with it cuDNN's algorithm: fp16 rounding
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        if mask_name == "full":
            eager.commit()
            graphed.commit()
            x = xe
    graphs = graphed.stats()["graphs"]
    assert graphs["captured_in_edits"] == 0 and 2 <= graphs["held"] <= 16  # all from warm-up


def test_the_cost_model_picks_the_faster_graph_and_stays_correct():
    model, args, kwargs = build_on("ddpm-tiny", "cuda", torch.float16)
    config = sigec.SparseConfig(**MODELS["ddpm-tiny"].sige_config, cuda_graphs=True)
    engine = sigec.compile(model, args, kwargs, config=config)
    engine.record(*args, **kwargs)
    x = args[0]
    masks = edit_masks(*x.shape[-2:])
    # the reference of a sparse edit: the eager path without its own (MAC) cost model, which
    # would run the dense model where the static path's measured one kept the sparse graph
    plain = dataclasses.replace(config, cuda_graphs=False, cost_model=False)
    eager = sigec.compile(model, args, kwargs, config=plain)
    eager.record(*args, **kwargs)
    for name in ("pixel", "full"):
        xe = apply_edit(x.cpu().float(), masks[name], seed=1).to(x)
        got = engine.edit(xe, *args[1:], **kwargs).sample
        stats = engine.stats()
        times = engine.path.timings[stats["size_class"]]
        if times:  # measured (the cost model skips the classes above two dense ones)
            assert stats["ran_dense"] == (times["dense"] < times["sparse"])
        else:
            assert stats["ran_dense"]
        # the dense model where it ran; the same (truncated) edit where the sparse graph did
        want = (model(xe, *args[1:], **kwargs) if stats["ran_dense"]
                else eager.edit(xe, *args[1:], **kwargs)).sample  # fmt: skip
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
    assert engine.stats()["graphs"]["captured_in_edits"] == 0


@pytest.mark.parametrize("name", ["ddpm-tiny", "sd15-unet-tiny", "gaugan-tiny"])
def test_fused_and_cudnn_conv_kernels_agree(name):
    model, args, kwargs = build_on(name, "cuda", torch.float16)
    outs = []
    kernels = ("fused", "tiles", "window", "cudnn")
    for kernel in kernels:
        config = sigec.SparseConfig(**MODELS[name].sige_config, cuda_graphs=True,
                                    cost_model=False, conv_kernel=kernel)  # fmt: skip
        engine = sigec.compile(model, args, kwargs, config=config)
        engine.record(*args, **kwargs)
        x = args[0]
        xe = apply_edit(x.cpu().float(), edit_masks(*x.shape[-2:])["blob"], seed=2).to(x)
        out = engine.edit(xe, *args[1:], **kwargs)
        outs.append(getattr(out, "sample", out).float())
    for kernel, out in zip(kernels[:-1], outs[:-1], strict=True):  # each against cuDNN's
        torch.testing.assert_close(out, outs[-1], rtol=2e-2, atol=2e-2,
                                   msg=lambda m, k=kernel: f"conv_kernel={k}: {m}")  # fmt: skip


def test_slots_share_the_captured_graphs_on_cuda():
    """Three slots (timesteps) replay the same CUDA graphs: each slot's edits equal an engine
    that recorded only that slot, and no graph is added."""
    model, args, kwargs = build_on("ddpm-tiny", "cuda", torch.float16)
    config = sigec.SparseConfig(**MODELS["ddpm-tiny"].sige_config, cuda_graphs=True,
                                cost_model=False)  # fmt: skip
    x = args[0]
    ts = [torch.tensor([t], device="cuda") for t in (900, 500, 100)]
    engine = sigec.compile(model, (x, ts[0]), kwargs, config=config)
    for i, t in enumerate(ts):
        engine.record(x, t, slot=i)
    held = engine.stats()["graphs"]["held"]
    masks = edit_masks(*x.shape[-2:])
    for i in (0, 1, 2, 1, 1):
        single = sigec.compile(model, (x, ts[i]), kwargs, config=config)
        single.record(x, ts[i])
        xe = apply_edit(x.cpu().float(), masks["blob" if i != 1 else "blobs"], seed=i).to(x)
        got = engine.edit(xe, ts[i], slot=i).sample
        torch.testing.assert_close(got, single.edit(xe, ts[i]).sample, rtol=1e-2, atol=1e-2)
    stats = engine.stats()["graphs"]
    assert stats["held"] == held and stats["captured_in_edits"] == 0


def test_a_new_record_keeps_the_captured_graphs_on_cuda():
    model, args, kwargs = build_on("sd15-unet-tiny", "cuda", torch.float16)
    config = sigec.SparseConfig(**MODELS["sd15-unet-tiny"].sige_config, cuda_graphs=True,
                                cost_model=False)  # fmt: skip
    engine = sigec.compile(model, args, kwargs, config=config)
    engine.record(*args, **kwargs)
    made = list(engine.path.entries)
    x2 = torch.randn_like(args[0])
    engine.record(x2, *args[1:], **kwargs)
    fresh = sigec.compile(model, (x2, *args[1:]), kwargs, config=config)
    fresh.record(x2, *args[1:], **kwargs)
    xe = apply_edit(x2.cpu().float(), edit_masks(*x2.shape[-2:])["blob"], seed=4).to(x2)
    got = engine.edit(xe, *args[1:], **kwargs).sample
    torch.testing.assert_close(got, fresh.edit(xe, *args[1:], **kwargs).sample, rtol=1e-2,
                               atol=1e-2)  # fmt: skip
    assert engine.path.entries == made and engine.stats()["graphs"]["captured_in_edits"] == 0


def test_host_slots_with_prefetch_edit_like_device_slots_on_cuda():
    """Slots in pinned host memory (the next one prefetched on a side stream): with CUDA graphs,
    edits and commits in a trajectory order equal an engine whose slots stay on the GPU."""
    model, args, kwargs = build_on("ddpm-tiny", "cuda", torch.float16)
    config = sigec.SparseConfig(**MODELS["ddpm-tiny"].sige_config, cuda_graphs=True,
                                cost_model=False)  # fmt: skip
    x = args[0]
    ts = [torch.tensor([t], device="cuda") for t in (900, 600, 300, 100)]
    engines = []
    for _ in range(2):
        e = sigec.compile(model, (x, ts[0]), kwargs, config=config)
        for i, t in enumerate(ts):
            e.record(x, t, slot=i)
        engines.append(e)
    host, device = engines
    for i in range(len(ts)):
        host.place(i, "host")
    assert all(b.is_pinned() for b in host.slots["2"].flats.values())
    masks = list(edit_masks(*x.shape[-2:]).values())
    current = x
    for rnd in range(3):
        xe = apply_edit(current.cpu().float(), masks[rnd], seed=rnd).to(x)
        for i, t in enumerate(ts):
            nxt = (i + 1) % len(ts)
            got = host.edit(xe, t, slot=i, next_slot=nxt).sample
            want = device.edit(xe, t, slot=i).sample  # a stale cache would be far off
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
            if rnd != 1:
                host.commit(slot=i)
                device.commit(slot=i)
        if rnd != 1:
            current = xe
    cache = host.stats()["cache"]
    assert cache["prefetch_hits"] >= 8 and cache["host_bytes"] > 0
    assert host.cache_bytes("device") < device.cache_bytes("device")
