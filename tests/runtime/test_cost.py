"""sigec/runtime/cost.py and the choices it drives: MAC accounting against an independent
counter, the dense fallback where nothing is timed (the CPU), and empty edits (no MACs)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sigec
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import ConvNet, GroupNormNet, init_bn

BLOCKS = {"3x3": 4, "1x1": 4, "pointwise": 4}


def _macs_by_flop_counter(model, args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_where_nothing_is_timed_the_dense_model_runs_when_tiles_cost_more(graphs):
    """Off CUDA the cost model compares MACs: a full edit (its tiles overhang the map and
    compute more than the dense model) runs the dense model, a small one runs sparse; with
    cost_model=False both run sparse."""
    torch.manual_seed(0)
    model = init_bn(ConvNet())
    x = torch.randn(1, 3, 20, 22)
    masks = edit_masks(20, 22)
    for cost_model in (True, False):
        config = sigec.SparseConfig(block_size=BLOCKS, cuda_graphs=graphs, cost_model=cost_model)
        engine = sigec.compile(model, (x,), config=config)
        engine.record(x)
        engine.edit(apply_edit(x, masks["pixel"], seed=1), mask=masks["pixel"])
        small = engine.stats()
        xe = apply_edit(x, masks["full"], seed=2)
        got = engine.edit(xe, mask=masks["full"])
        full = engine.stats()
        assert not small["ran_dense"] and small["sparse_macs"] < small["dense_macs"]
        assert full["ran_dense"] == cost_model
        if cost_model:  # the dense model's output, and its MACs
            with torch.no_grad():
                torch.testing.assert_close(got, model(xe), rtol=1e-4, atol=1e-5)
            assert full["sparse_macs"] == full["dense_macs"]
        else:
            assert full["sparse_macs"] > full["dense_macs"]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_an_empty_edit_returns_the_record_and_costs_nothing(graphs):
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x, t = torch.randn(1, 3, 16, 16), torch.randn(1, 4)
    config = sigec.SparseConfig(block_size=BLOCKS, cuda_graphs=graphs, cost_model=False)
    engine = sigec.compile(model, (x, t), config=config)
    y0 = engine.record(x, t)
    got = engine.edit(x, t)  # no change: an empty difference mask
    stats = engine.stats()
    assert torch.equal(got, y0) and stats["empty"] and stats["sparse_macs"] == 0
    assert not engine.edit_footprint()[0].any()
    mask = edit_masks(16, 16)["blob"]
    xe = apply_edit(x, mask, seed=1)
    y1 = engine.edit(xe, t)
    engine.commit()
    assert torch.equal(engine.edit(xe, t), y1)  # the committed edit is the record now
    assert torch.equal(engine.edit(apply_edit(x, mask, seed=2), t, mask=torch.zeros_like(mask)),
                       y1)  # an explicit empty mask: nothing recomputed  # fmt: skip


def test_dense_macs_match_an_independent_counter_for_every_conv_kind():
    """Transposed, string-padded, 1-D convs and matmuls run dense: they count in full in both
    the dense and the executed MACs (a model of only those reports 1.0x, not a saving)."""

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3, padding="same")
            self.t = torch.nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
            self.c1 = torch.nn.Conv1d(4, 4, 3, padding=1)
            self.o = torch.nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x):
            h = self.t(self.a(x))
            b, c, hh, ww = h.shape
            v = self.c1(h.reshape(b, c, hh * ww)).reshape(b, c, hh, ww)
            return self.o(v @ v.transpose(-1, -2) + h)

    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(1, 3, 8, 8)
    engine = sigec.compile(model, (x,), config=sigec.SparseConfig(cost_model=False))
    engine.record(x)
    engine.edit(apply_edit(x, edit_masks(8, 8)["pixel"], seed=1))
    stats = engine.stats()
    assert stats["dense_macs"] == _macs_by_flop_counter(model, (x,))
    only_dense = sum(v["dense"] for k, v in stats["macs_by_op"].items() if k != "conv")
    assert stats["sparse_macs"] >= only_dense  # the dense-run ops count in full
