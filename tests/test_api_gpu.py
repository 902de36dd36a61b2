"""sigec.compile end to end on a CUDA GPU (skipped without one)."""

import copy

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
    eager = sigec.compile(model, args, kwargs, config=sigec.SparseConfig(**base))
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
    runner = graphed.slots["0"].graphs
    assert runner.captures < 5  # the repeated "blob" edits replay an existing graph


def test_the_cost_model_picks_the_faster_graph_and_stays_correct():
    model, args, kwargs = build_on("ddpm-tiny", "cuda", torch.float16)
    config = sigec.SparseConfig(**MODELS["ddpm-tiny"].sige_config, cuda_graphs=True)
    engine = sigec.compile(model, args, kwargs, config=config)
    engine.record(*args, **kwargs)
    x = args[0]
    masks = edit_masks(*x.shape[-2:])
    for name in ("pixel", "full"):
        xe = apply_edit(x.cpu().float(), masks[name], seed=1).to(x)
        got = engine.edit(xe, *args[1:], **kwargs).sample
        want = model(xe, *args[1:], **kwargs).sample
        runner = engine.slots["0"].graphs
        times = list(runner.timings.values())[-1]
        assert engine.stats()["ran_dense"] == (times["dense"] < times["sparse"])
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name", ["ddpm-tiny", "sd15-unet-tiny", "gaugan-tiny"])
def test_fused_and_cudnn_conv_kernels_agree(name):
    model, args, kwargs = build_on(name, "cuda", torch.float16)
    outs = []
    for kernel in ("fused", "cudnn"):
        config = sigec.SparseConfig(**MODELS[name].sige_config, cuda_graphs=True,
                                    cost_model=False, conv_kernel=kernel)  # fmt: skip
        engine = sigec.compile(model, args, kwargs, config=config)
        engine.record(*args, **kwargs)
        x = args[0]
        xe = apply_edit(x.cpu().float(), edit_masks(*x.shape[-2:])["blob"], seed=2).to(x)
        out = engine.edit(xe, *args[1:], **kwargs)
        outs.append(getattr(out, "sample", out).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
