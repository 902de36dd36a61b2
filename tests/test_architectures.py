"""Held-out-style sweep: small unmodified architectures (tests/architectures.py) through
``sigec.compile`` in the exact policy. Each edit must equal the dense model on the edited input,
and ``stats()`` must be honest: its dense MACs are what an independent counter measures on the
dense model, its executed MACs what the same counter measures while the edit runs."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import sigec
from sigec.runtime.masks import blob_mask
from tests.architectures import ARCHITECTURES
from tests.masks_for_tests import apply_edit

aten = torch.ops.aten
EXACT = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 4, "1x1": 4, "pointwise": 4},
                           cost_model=False)  # fmt: skip
_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_efficient_attention.default,
         aten._scaled_dot_product_flash_attention.default}  # fmt: skip


class _KernelMacs(TorchDispatchMode):
    """MACs of what the flop counter does not see: fused attention on the CPU, and sigec's fused
    tile conv (a custom op: the counter stops at its boundary), from the op's own arguments."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            q, k = args[0], args[1]
            lead = q.numel() // (q.shape[-2] * q.shape[-1])
            self.macs += 2 * lead * q.shape[-2] * k.shape[-2] * q.shape[-1]
        elif func is torch.ops.sigec.tile_conv.default:
            out, weight, out_corners = args[0], args[2], args[5]
            th, tw = args[6], args[7]
            count = kwargs.get("num_active", args[15] if len(args) > 15 else None)
            tiles = int(count.item()) if count is not None else out_corners.shape[0]
            self.macs += out.shape[0] * tiles * th * tw * weight[0].numel() * weight.shape[0]
        return func(*args, **kwargs)


def count_macs(fn) -> int:
    """MACs ``fn()`` executes: torch's flop counter (convs, matmuls) plus ``_KernelMacs``."""
    with torch.no_grad(), FlopCounterMode(display=False) as flops, _KernelMacs() as att:
        fn()
    counted = {str(op) for ops in flops.get_flop_counts().values() for op in ops}
    assert not any("attention" in op for op in counted), "the counter counts attention itself"
    return flops.get_total_flops() // 2 + att.macs


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_unmodified_architecture_edits_equal_dense_and_report_honest_macs(name):
    torch.manual_seed(0)
    model, x, kwargs = ARCHITECTURES[name]()
    model = model.eval()
    engine = sigec.compile(model, (x,), kwargs, config=EXACT)
    engine.record(x, **kwargs)
    mask = blob_mask(*x.shape[-2:], 0.05, seed=1, num_blobs=1)
    xe = apply_edit(x, mask, seed=2)
    executed = count_macs(lambda: engine.edit(xe, **kwargs))
    got = _sample(engine.edit(xe, **kwargs))
    with torch.no_grad():
        want = _sample(model(xe, **kwargs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stats = engine.stats()
    assert stats["dense_macs"] == count_macs(lambda: model(x, **kwargs))
    assert stats["sparse_macs"] == executed


@pytest.mark.parametrize("name", ["resnet-generator", "unet-generator", "depthwise-dilated"])
def test_gan_generators_run_sparse_in_the_truncated_policy(name):
    """Transposed convs, reflection / replicate pads and instance norms (cached statistics) run
    on tiles: nothing falls back; the edit keeps the record outside its footprint bit for bit,
    and the static path gives the eager path's result."""
    torch.manual_seed(0)
    model, x, kwargs = ARCHITECTURES[name]()
    model = model.eval()
    mask = blob_mask(*x.shape[-2:], 0.05, seed=1, num_blobs=1)
    xe = apply_edit(x, mask, seed=2)
    outs = []
    for graphs in (False, True):
        config = dataclasses.replace(EXACT, mask_policy="truncated", cuda_graphs=graphs)
        engine = sigec.compile(model, (x,), kwargs, config=config)
        y0 = engine.record(x)
        y = engine.edit(xe, mask=mask)
        (footprint,) = engine.edit_footprint()
        assert engine.stats()["dense_fallbacks"] == []
        assert footprint.any() and not footprint.all()
        assert torch.equal(y[..., ~footprint], y0[..., ~footprint])
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_a_vq_quantizer_does_not_send_its_decoder_dense():
    """The quantizer works on flattened rows (cdist, argmin, embedding: dense), and its codes
    come back in the latent's shape: read pixel for pixel, the decoder after it runs on tiles."""
    torch.manual_seed(0)
    model, x, _ = ARCHITECTURES["vq-decoder"]()
    config = dataclasses.replace(EXACT, mask_policy="truncated")
    engine = sigec.compile(model.eval(), (x,), config=config)
    y0 = engine.record(x)
    mask = blob_mask(*x.shape[-2:], 0.05, seed=1, num_blobs=1)
    y = engine.edit(apply_edit(x, mask, seed=2), mask=mask)
    stats = engine.stats()
    assert stats["rewrites"]["convs_sparse"] >= 15 and stats["macs_ratio"] > 2
    dense_ops = {f["op"] for f in stats["dense_fallbacks"]}
    assert dense_ops <= {"aten.cdist.default", "aten.argmin.default", "aten.embedding.default",
                         "aten.detach.default",
                         "aten.view.default", "aten.mean.default", "aten.pow.Tensor_Scalar",
                         "aten.sub.Tensor", "aten.add.Tensor", "aten.mul.Tensor"}  # fmt: skip
    (footprint,) = engine.edit_footprint()
    assert torch.equal(y[..., ~footprint], y0[..., ~footprint])
