"""norm_stats="incremental": GroupNorm statistics of the map being computed, in O(active) work."""

import math

import pytest
import torch

import sigec
from sigec.models.configs import MODELS, build
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import GroupNormNet

SIZES = {"3x3": 4, "1x1": 4, "pointwise": 4}


def _setup(name):
    if name == "groupnorm-net":
        torch.manual_seed(0)
        return GroupNormNet().eval(), (torch.randn(1, 3, 16, 16), torch.randn(1, 4)), {}
    return build(name, seed=0)


def _out(y):
    return getattr(y, "sample", y)


def _psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    rng = (b.max() - b.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(rng * rng / mse)


@pytest.mark.parametrize("name", ["groupnorm-net", "ddpm-tiny", "sd15-unet-tiny"])
def test_full_mask_edit_equals_dense(name):
    """With every tile active, incremental statistics are the dense model's: the truncated
    policy then computes the dense result (cached statistics would not)."""
    model, args, kwargs = _setup(name)
    config = sigec.SparseConfig(norm_stats="incremental", block_size=SIZES)
    engine = sigec.compile(model, args, kwargs, config=config)
    engine.record(*args, **kwargs)
    x = args[0]
    xe = apply_edit(x, edit_masks(*x.shape[-2:])["blob"])
    got = _out(engine.edit(xe, *args[1:], mask=edit_masks(*x.shape[-2:])["full"], **kwargs))
    with torch.no_grad():
        want = _out(model(xe, *args[1:], **kwargs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sums_track_the_working_map_and_commit_adopts_them():
    model, args, _ = _setup("groupnorm-net")
    config = sigec.SparseConfig(norm_stats="incremental", block_size=SIZES)
    engine = sigec.compile(model, args, config=config)
    engine.record(*args)
    live, slot = engine.live, engine.slots["0"]
    assert live.norm_inputs, "the group norms should be incremental"
    xe = apply_edit(args[0], edit_masks(16, 16)["blob"])
    engine.edit(xe, args[1])
    for name, src in live.norm_inputs.items():
        if not live.has_map(src):
            continue
        s1, s2 = live.pending_norm_sums[name]
        xg = live.work(src).double().reshape(1, 2, -1)
        torch.testing.assert_close(s1, xg.sum(-1))
        torch.testing.assert_close(s2, (xg * xg).sum(-1))
    engine.commit()
    for name, src in live.norm_inputs.items():
        if live.has_map(src):
            xg = slot.cache(src).double().reshape(1, 2, -1)
            for holder in (slot, live):  # the slot's sums and the working set's copy
                torch.testing.assert_close(holder.norm_sums(name)[0], xg.sum(-1))
            torch.testing.assert_close(live.cache(src), slot.cache(src))


@pytest.mark.parametrize("name", ["ddpm-tiny", "sd15-unet-tiny", "sd-vae-decoder-tiny"])
def test_incremental_is_at_least_as_faithful_as_cached(name):
    model, args, kwargs = _setup(name)
    x = args[0]
    xe = apply_edit(x, edit_masks(*x.shape[-2:])["blob"])
    with torch.no_grad():
        want = _out(model(xe, *args[1:], **kwargs))
    psnr = {}
    for stats in ("cached", "incremental"):
        config = sigec.SparseConfig(norm_stats=stats, **MODELS[name].sige_config)
        engine = sigec.compile(model, args, kwargs, config=config)
        engine.record(*args, **kwargs)
        psnr[stats] = _psnr(_out(engine.edit(xe, *args[1:], **kwargs)), want)
        assert torch.equal(_out(engine.edit(*args, **kwargs)), _out(engine.record(*args, **kwargs)))
    assert psnr["incremental"] >= psnr["cached"]
