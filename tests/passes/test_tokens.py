"""Token regions: layouts found by probing, attention cores recognised (both diffusers forms),
and the rewritten blocks computing what the dense model computes."""

import pytest
import torch

import sigec
from sigec.models.configs import build
from sigec.passes.analysis import analyze_roles, info
from sigec.passes.capture import capture
from sigec.passes.classify import analyze_ops
from sigec.passes.pipeline import classify_inputs
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import TokenNet

EXACT = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 4, "1x1": 4, "pointwise": 4})
FULL = sigec.SparseConfig(block_size={"3x3": 4, "1x1": 4, "pointwise": 4}, norm_stats="incremental")


def _analyzed(model, args, config=EXACT):
    cap = capture(model, args, {})
    analyze_roles(cap.gm, classify_inputs(cap.flat_inputs, cap.input_names, config))
    analyze_ops(cap.gm, config)
    return {n.name: n for n in cap.gm.graph.nodes}


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


def test_layouts_are_found_by_probing_the_view_chains():
    torch.manual_seed(0)
    nodes = _analyzed(TokenNet().eval(), (torch.randn(2, 3, 6, 5),))
    layouts = {info(n).layout for n in nodes.values() if info(n).layout}
    assert layouts == {"tokens", "nhwc"}
    reshapes = [n for n in nodes.values() if n.target == torch.ops.aten.reshape.default]
    assert info(reshapes[0]).layout == "tokens" and info(reshapes[0]).resolution == (6, 5)
    # the head split [B, heads, N, d] is 4-D but not a map; the map it comes back as is one
    splits = [n for n in nodes.values() if n.target == torch.ops.aten.transpose.int]
    assert all(not info(n).spatial for n in splits)
    back = [n for n in nodes.values() if n.target == torch.ops.aten.permute.default][-1]
    assert info(back).spatial and info(back).op == "view"
    sdpa = next(n for n in nodes.values() if "scaled_dot" in str(n.target))
    assert info(sdpa).op == "attention_part"


def test_a_transposed_map_is_not_the_map():
    class Transposed(torch.nn.Module):
        def forward(self, x):  # H and W swapped: same shape when square, different pixels
            return torch.nn.functional.conv2d(x.transpose(2, 3), torch.ones(1, 3, 1, 1))

    nodes = _analyzed(Transposed(), (torch.randn(1, 3, 4, 4),))
    t = next(n for n in nodes.values() if n.target == torch.ops.aten.transpose.int)
    assert not info(t).spatial and not info(t).layout
    conv = next(n for n in nodes.values() if n.target == torch.ops.aten.conv2d.default)
    assert info(conv).mode == "dense"


@pytest.mark.parametrize("mask_name", ["pixel", "blob", "full"])
def test_token_net_exact_equals_dense(mask_name):
    torch.manual_seed(0)
    model, x = TokenNet().eval(), torch.randn(2, 3, 8, 8)
    engine = sigec.compile(model, (x,), config=EXACT)
    engine.record(x)
    assert engine.stats()["dense_fallbacks"] == []
    mask = edit_masks(8, 8)[mask_name]
    xe = apply_edit(x, mask, seed=1)
    torch.testing.assert_close(engine.edit(xe), model(xe), rtol=1e-4, atol=1e-5)


def test_exact_self_attention_updates_keys_only_where_tokens_changed():
    """kv_projection="tiles": the key / value projections run on the changed tokens only."""
    torch.manual_seed(0)
    model, x = TokenNet().eval(), torch.randn(1, 3, 16, 16)
    config = sigec.SparseConfig(**{**EXACT.__dict__, "kv_projection": "tiles"})
    engine = sigec.compile(model, (x,), config=config)
    engine.record(x)
    mask = edit_masks(16, 16)["pixel"]
    engine.edit(apply_edit(x, mask, seed=1), mask=mask)
    by_op = engine.stats()["macs_by_op"]
    # a changed token changes every query's result: attention and what follows it are full...
    assert by_op["attention"]["sparse"] == by_op["attention"]["dense"]
    # ...but the query/key/value projections run only on the 2 tiles (32 tokens) that changed:
    # 3 linears of 8x8 weights skip 256 - 32 tokens; out and feed-forward follow the attention
    lin = by_op["linear"]
    assert engine.stats()["tiles"]["linear_1|k1x1|s1x1|p0x0|t4|u1"] == 2
    assert lin["sparse"] == lin["dense"] - 3 * 8 * 8 * (256 - 32)


def test_causal_attention_runs_dense_and_says_so():
    torch.manual_seed(0)
    model, x = TokenNet(causal=True).eval(), torch.randn(1, 3, 8, 8)
    engine = sigec.compile(model, (x,), config=EXACT)
    engine.record(x)
    reasons = " ".join(f["reason"] for f in engine.stats()["dense_fallbacks"])
    assert "attention" in reasons and "causal" in reasons
    mask = edit_masks(8, 8)["blob"]
    xe = apply_edit(x, mask, seed=1)
    torch.testing.assert_close(engine.edit(xe), model(xe), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("processor", ["sdpa", "baddbmm"])
def test_both_attention_processor_forms_run_sparse(processor):
    from diffusers.models.attention_processor import AttnProcessor

    model, args, kwargs = build("sd15-unet-tiny")
    if processor == "baddbmm":
        model.set_attn_processor(AttnProcessor())  # scores by baddbmm, softmax, bmm
    x = args[0]
    mask = edit_masks(*x.shape[-2:])["blob"]
    xe = apply_edit(x, mask, seed=2)
    want = _sample(model(xe, *args[1:], **kwargs))
    for config in (EXACT, FULL):
        engine = sigec.compile(model, args, kwargs, config=config)
        engine.record(*args, **kwargs)
        stats = engine.stats()  # (exact policy: group norms run dense, nothing else)
        assert all("group_norm" in f["op"] for f in stats["dense_fallbacks"])
        assert stats["rewrites"]["token_ops_mapped"] > 0
        ops = {str(n.target) for n in engine.edit_gm.graph.nodes}
        assert not any("bmm" in o or "softmax" in o or "scaled_dot" in o for o in ops)
        if config is EXACT:
            got = _sample(engine.edit(xe, *args[1:], mask=mask, **kwargs))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        else:  # truncated, incremental statistics, everything edited: the dense result
            full = torch.ones(x.shape[-2:], dtype=torch.bool)
            got = _sample(engine.edit(xe, *args[1:], mask=full, **kwargs))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["sd15-unet-tiny", "sd2-unet-tiny", "sdxl-unet-tiny", "sd-vae-decoder-tiny",
             "sd-vae-encoder-tiny"],
)  # fmt: skip
def test_truncated_full_edit_with_incremental_statistics_is_the_dense_result(name):
    model, args, kwargs = build(name)
    engine = sigec.compile(model, args, kwargs, config=FULL)
    engine.record(*args, **kwargs)
    x = args[0]
    full = torch.ones(x.shape[-2:], dtype=torch.bool)
    xe = apply_edit(x, full, seed=4)
    want = _sample(model(xe, *args[1:], **kwargs))
    got = _sample(engine.edit(xe, *args[1:], mask=full, **kwargs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cross_attention_keys_and_values_are_cached_at_record():
    model, args, kwargs = build("sd15-unet-tiny")
    engine = sigec.compile(model, args, kwargs, config=FULL)
    prog = engine.program
    text = next(n for n in prog.record_gm.graph.nodes if n.name == "encoder_hidden_states")
    kv = [u.name for u in text.users if u.target == torch.ops.aten.linear.default]
    assert len(kv) == 8  # to_k and to_v of 4 cross-attentions
    modes = {e.node: e.mode for e in prog.macs}
    assert all(modes[name] == "cached" for name in kv)
    assert set(kv) <= set(prog.statics)
    # the edit graph never reads the prompt embedding itself
    edit_text = next(n for n in engine.edit_gm.graph.nodes if n.name == "encoder_hidden_states")
    assert not edit_text.users


def test_a_transformer_block_needs_few_working_maps():
    """GEGLU's projection feeds two halves that meet again: the whole feed-forward (and the
    attention's output projection with its residual) runs as one expression each, so only a
    handful of token maps get working maps."""
    torch.manual_seed(0)
    model, x = TokenNet().eval(), torch.randn(1, 3, 8, 8)
    engine = sigec.compile(model, (x,), config=FULL)
    prog = engine.program
    assert prog.counters["tile_ops_inlined"] >= 6
    ff_in = next(
        n.name
        for n in prog.record_gm.graph.nodes
        if n.target == torch.ops.aten.linear.default and n.meta["val"].shape[-1] == 32
    )
    assert ff_in not in prog.maps  # inlined into the feed-forward's expression
    token_maps = [name for name in prog.maps if name in prog.layouts]
    # LayerNorm (3 users), q, k, v, attention, out+residual, ff+residual
    assert len(token_maps) <= 7, token_maps
