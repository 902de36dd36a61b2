"""Every pass: the graph before and after it computes the same thing, its counter moves, and a
negative case where it must not fire. Checked-in graph summaries guard against regressions."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sigec
from sigec.passes import base, convs, folds
from sigec.passes.pipeline import PIPELINE, build_program
from sigec.runtime import ops
from sigec.runtime.engine import SparseEngine
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import ConvNet, GroupNormNet, TokenNet, init_bn
from tests.passes.summary import SUMMARY_MODELS, summary_of

EXACT = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 4, "1x1": 4, "pointwise": 4})
TRUNC = sigec.SparseConfig(block_size={"3x3": 4, "1x1": 4, "pointwise": 4})


def _engine(model, args, config, passes=PIPELINE):
    return SparseEngine(build_program(model, args, {}, config, passes), config)


@pytest.mark.parametrize("k", range(1, len(PIPELINE) + 1), ids=[p.__name__ for p in PIPELINE])
@pytest.mark.parametrize("net", ["convnet", "groupnorm", "transformer"])
def test_every_pipeline_prefix_computes_the_dense_result(net, k):
    torch.manual_seed(0)
    if net == "convnet":
        model, args = init_bn(ConvNet()), (torch.randn(1, 3, 16, 18),)
    elif net == "transformer":
        model, args = TokenNet().eval(), (torch.randn(2, 3, 8, 8),)
    else:
        model, args = GroupNormNet().eval(), (torch.randn(1, 3, 16, 16), torch.randn(1, 4))
    engine = _engine(model, args, EXACT, PIPELINE[:k])
    before = engine.record(*args)
    torch.testing.assert_close(before, model(*args), rtol=1e-5, atol=1e-6)  # the record graph
    mask = edit_masks(*args[0].shape[-2:])["blob"]
    x = apply_edit(args[0], mask)
    after = engine.edit(x, *args[1:])  # the edit graph after pass k
    torch.testing.assert_close(after, model(x, *args[1:]), rtol=1e-4, atol=1e-5)


def _with_and_without(pass_fn, model, args, edited_args, counter):
    """Edit outputs of the full pipeline and of the pipeline without ``pass_fn`` (truncated).

    Also asserts that the pass fired in the first and, of course, not in the second."""
    outs = []
    for passes in (PIPELINE, tuple(p for p in PIPELINE if p is not pass_fn)):
        engine = _engine(model, args, TRUNC, passes)
        engine.record(*args)
        outs.append(engine.edit(*edited_args))
        fired = engine.program.counters.get(counter, 0)
        assert fired > 0 if passes is PIPELINE else fired == 0
    return outs


def _counters(model, args, config):
    return build_program(model, args, {}, config).counters


class _TwoUsers(nn.Module):
    """A conv whose output feeds a residual add *and* another op: no residual fusion."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.b(x + y) * torch.sigmoid(y)


class _CircularPad(nn.Module):
    """A circular pad before a conv: no read mode for it, so not folded (runs dense)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.c(F.pad(x, (1, 1, 1, 1), mode="circular"))


class _ReflectThenZeros(nn.Module):
    """A reflection pad before a conv with zero padding of its own: one read cannot do both."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.c(F.pad(x, (1, 1, 1, 1), mode="reflect"))


def test_positive_counters_on_the_conv_net():
    c = _counters(init_bn(ConvNet()), (torch.randn(1, 3, 16, 18),), TRUNC)
    assert c["convs_sparse"] == 6
    assert c["norms_folded"] == 1 and c["prologues_fused"] >= 2  # bn+leaky_relu, silu
    assert c["residuals_fused"] == 1 and c["pads_folded"] == 1
    assert c["upsamples_sparse"] == 1 and c["concats_fused"] == 1
    assert c["tile_ops"] == 0  # the concatenation is only built tile by tile, in the gather
    assert c["dense_fallbacks"] == 0


def test_negative_cases_where_rewrites_must_not_fire():
    x = torch.randn(1, 3, 12, 12)
    c = _counters(_TwoUsers().eval(), (x,), TRUNC)
    assert c["residuals_fused"] == 0 and c["convs_sparse"] == 2
    c = _counters(_CircularPad().eval(), (x,), TRUNC)
    assert c["pads_folded"] == 0 and c["dense_fallbacks"] == 1
    assert _counters(_ReflectThenZeros().eval(), (x,), TRUNC)["pads_folded"] == 0
    gn = GroupNormNet().eval()
    args = (torch.randn(1, 3, 16, 16), torch.randn(1, 4))
    assert _counters(gn, args, EXACT)["norms_folded"] == 0  # exact: statistics recomputed
    assert _counters(gn, args, TRUNC)["norms_folded"] == 2
    low = sigec.SparseConfig(sparse_min_resolution=32)  # every map is below it
    c = _counters(init_bn(ConvNet()), (torch.randn(1, 3, 16, 18),), low)
    assert c["convs_sparse"] == 0 and c["tile_ops"] == 0 and c["dense_fallbacks"] > 0


@pytest.mark.parametrize(
    "pass_fn, counter",
    [
        (folds.fold_biases, "biases_folded"),
        (convs.fuse_prologues, "prologues_fused"),
        (convs.fuse_residuals, "residuals_fused"),
        (folds.hoist_invariants, "invariants_hoisted"),
    ],
)
def test_truncated_fusions_do_not_change_the_result(pass_fn, counter):
    """Under the truncated policy the fusions are pure rewrites: the edit is the same without."""
    torch.manual_seed(0)
    model, args = GroupNormNet().eval(), (torch.randn(1, 3, 16, 16), torch.randn(1, 4))
    x = apply_edit(args[0], edit_masks(16, 16)["blob"])
    outs = _with_and_without(pass_fn, model, args, (x, args[1]), counter)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


class _CatRows(nn.Module):
    """A concatenation along rows, not channels: not fused into the conv's gather."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.c(torch.cat([x, x * 2], dim=2))


def test_concat_fusion_only_for_channels_and_keeps_the_result():
    x = torch.randn(1, 3, 12, 12)
    c = _counters(_CatRows().eval(), (x,), TRUNC)
    assert c["concats_fused"] == 0 and c["dense_fallbacks"] >= 1
    torch.manual_seed(0)
    model, args = init_bn(ConvNet()), (torch.randn(1, 3, 16, 18),)
    xe = apply_edit(args[0], edit_masks(16, 18)["blob"])
    outs = _with_and_without(convs.fuse_concats, model, args, (xe,), "concats_fused")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


class _HeadsView(nn.Module):
    """A 4-D tensor that is not a map ([B, heads, tokens, dim], as attention builds)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        n, c, hh, ww = h.shape
        heads = h.reshape(n, 2, c // 2, hh * ww).transpose(2, 3)  # [N, heads, tokens, dim]
        heads = heads * 2.0
        return self.b(heads.transpose(2, 3).reshape(n, c, hh, ww))


def test_reinterpreted_4d_tensors_are_not_maps():
    """A pointwise op on [B, heads, tokens, dim] must not be tiled as if it were an image."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    program = build_program(_HeadsView().eval(), (x,), {}, TRUNC)
    assert program.counters["tile_ops"] == 0
    reasons = " ".join(why for _, _, why in program.fallbacks)
    assert "non-map tensor" in reasons
    assert (4, 8) not in program.node_resolutions.values()  # no (tokens, dim) "resolution"


class _Chain(nn.Module):
    """Pointwise chains between convs: one single-use chain, one op with two users."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        z = torch.sigmoid(y * 2.0 + 1.0)  # three ops, one working map
        w = torch.tanh(z)  # w has two users: it stays materialised
        return self.b(w * z) + self.c(w)


def test_pointwise_chains_run_as_one_tile_op():
    torch.manual_seed(0)
    model, x = _Chain().eval(), torch.randn(1, 3, 12, 12)
    program = build_program(model, (x,), {}, TRUNC)
    # sigmoid(y*2+1) -> one op (2 inlined); tanh stays (2 users); w*z is its own
    assert program.counters["tile_ops_inlined"] == 2
    assert program.counters["tile_ops"] == 3
    engine = _engine(model, (x,), EXACT)
    engine.record(x)
    xe = apply_edit(x, edit_masks(12, 12)["corner"])
    torch.testing.assert_close(engine.edit(xe), model(xe), rtol=1e-4, atol=1e-5)


def test_incremental_statistics_keep_the_biased_map():
    gn = GroupNormNet().eval()
    args = (torch.randn(1, 3, 16, 16), torch.randn(1, 4))
    incremental = sigec.SparseConfig(norm_stats="incremental")
    assert _counters(gn, args, incremental)["biases_folded"] == 0
    assert _counters(gn, args, TRUNC)["biases_folded"] == 1


def test_static_subgraphs_are_cached_not_recomputed():
    gn = GroupNormNet().eval()
    program = build_program(gn, (torch.randn(1, 3, 16, 16), torch.randn(1, 4)), {}, TRUNC)
    assert program.counters["statics_cached"] == 1  # temb(t) is read from the record
    targets = {str(n.target) for n in program.edit_gm.graph.nodes}
    assert "aten.linear.default" not in targets


SUMMARIES = Path(__file__).parent / "summaries"


@pytest.mark.parametrize("name", SUMMARY_MODELS)
def test_graph_summary_matches_the_checked_in_one(name):
    """A pass change that alters this fails until the summary is regenerated on purpose:
    python -m tests.passes.summary --write tests/passes/summaries"""
    want = json.loads((SUMMARIES / f"{name}.json").read_text())
    got = json.loads(json.dumps(summary_of(name)))
    assert got == want


def test_hoisted_invariants_leave_the_edit_graph_and_are_recorded():
    torch.manual_seed(0)
    model, args = GroupNormNet().eval(), (torch.randn(1, 3, 16, 16), torch.randn(1, 4))
    engine = _engine(model, args, TRUNC)
    prog = engine.program
    assert prog.hoisted and prog.prelude_gm is not None
    targets = {n.target for n in engine.edit_gm.graph.nodes}
    assert ops.bias_through_affine not in targets  # now computed once, at record
    engine.record(*args)
    buffers = dict(engine.slots["0"].named_buffers())
    assert all(f"static__{name}" in buffers for name in prog.hoisted)


def test_dense_regions_group_the_dense_part_and_keep_the_result():
    """DDPM's low resolutions run dense: the pass moves them (with the dense attention block's
    map functions) into one region, runtime ops stay outside, and the edit is bit-identical to
    the pipeline without the pass (on the CPU regions run eagerly)."""
    from sigec.models.configs import MODELS, build
    from sigec.passes.regions import group_dense_regions
    from sigec.runtime.dense import DenseRegion

    model, args, kwargs = build("ddpm-tiny", seed=0)
    config = sigec.SparseConfig(**MODELS["ddpm-tiny"].sige_config)
    x = apply_edit(args[0], edit_masks(*args[0].shape[-2:])["blob"])
    outs = []
    for passes in (PIPELINE, tuple(p for p in PIPELINE if p is not group_dense_regions)):
        engine = SparseEngine(build_program(model, args, kwargs, config, passes), config)
        engine.record(*args, **kwargs)
        outs.append(engine.edit(x, *args[1:], **kwargs).sample)
        regions = [m for m in engine.edit_gm.modules() if isinstance(m, DenseRegion)]
        assert (len(regions) > 0) == (passes is PIPELINE)
        for region in regions:
            targets = {n.target for n in region.ops()}
            assert not targets & set(base.RUNTIME_MAP_OPS)  # only stateless dense work
            assert torch.ops.aten.group_norm.default in targets or len(region.ops()) >= 4
    assert torch.equal(outs[0], outs[1])


def test_short_runs_stay_in_the_edit_graph():
    counters = _counters(_CircularPad().eval(), (torch.randn(1, 3, 12, 12),), TRUNC)
    assert counters["dense_fallbacks"] == 1 and counters["dense_regions"] == 0


def test_a_region_inductor_cannot_compile_runs_eagerly_and_says_so(monkeypatch):
    from sigec.runtime.dense import DenseRegion

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_function(torch.ops.aten.relu.default, (x,)),))
    region = DenseRegion(torch.fx.GraphModule(torch.nn.Module(), graph), compile_on_cuda=True)

    def broken(*args, **kwargs):
        def fail(*a):
            raise RuntimeError("no backend")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(DenseRegion, "on_cuda", staticmethod(lambda inputs: True))
    t = torch.randn(5)
    with pytest.warns(UserWarning, match="runs eagerly.*no backend"):
        (out,) = region(t)
    assert torch.equal(out, t.relu())
    (again,) = region(t)  # no second try, no second warning
    assert torch.equal(again, out)


class _Repeats(nn.Module):
    """The same resize twice (merged), the same random op twice (never merged)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        a = self.conv(F.interpolate(x, scale_factor=0.5))
        b = self.conv(F.interpolate(x, scale_factor=0.5))
        noise = torch.rand_like(a) - torch.rand_like(a)
        return a + b, noise


def test_common_subexpressions_are_merged_but_not_random_ops():
    from sigec.passes.capture import capture

    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    gm = capture(_Repeats().eval(), (x,), {}).gm
    before = gm(x)[0]
    ctx = base.PassContext(TRUNC)
    result = folds.eliminate_common_subexpressions(gm, ctx)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.upsample_nearest2d.vec) == 1
    assert targets.count(torch.ops.aten.conv2d.default) == 1
    assert targets.count(torch.ops.aten.rand_like.default) == 2
    assert result.changed == ctx.counters["subexpressions_merged"] == 2
    torch.testing.assert_close(gm(x)[0], before, atol=0, rtol=0)
    assert gm(x)[1].abs().sum() > 0  # the two draws stay two draws


def _gather_scatter_calls(engine, args, kwargs, x, mask):
    """sigec::gather / sigec::scatter calls of one edit (a dispatch-mode count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = {"gather": 0, "scatter": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            name = func.__name__.split(".")[0]
            if name in calls:
                calls[name] += 1
            return func(*a, **(kw or {}))

    with Count():
        out = engine.edit(x, *args[1:], mask=mask, **kwargs)
    return calls, out.sample


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graph-path"])
def test_passed_tiles_skip_the_map_and_keep_the_result(cuda_graphs):
    """Scatter -> gather fusion on one tile list (``pass_tiles``): SD's transformer blocks hand
    LayerNorm outputs, queries and attention outputs to their readers as tile batches. The maps
    are gone (no buffers), each edit launches fewer gathers and scatters, and the result is
    bit-identical to building the maps."""
    from sigec.models.configs import MODELS, build
    from sigec.runtime.masks import blob_mask

    model, args, kwargs = build("sd15-unet-tiny", seed=0)
    mask = blob_mask(*args[0].shape[-2:], 0.1, seed=0, num_blobs=1)
    x = torch.where(mask, torch.randn_like(args[0]), args[0])
    runs = {}
    for passing in (False, True):
        config = sigec.SparseConfig(**MODELS["sd15-unet-tiny"].sige_config, pass_tiles=passing,
                                    cuda_graphs=cuda_graphs)  # fmt: skip
        engine = sigec.compile(model, args, kwargs, config=config)
        engine.record(*args, **kwargs)
        engine.edit(x * 0.5, *args[1:], mask=mask, **kwargs)  # a previous edit to undo
        runs[passing] = (engine, *_gather_scatter_calls(engine, args, kwargs, x, mask))
    (plain, calls0, out0), (fused, calls1, out1) = runs[False], runs[True]
    prog = fused.program
    passed = set(plain.program.maps) - set(prog.maps)
    assert len(passed) == prog.counters["tiles_passed"] > 0
    assert passed <= set(plain.program.private_maps)
    buffers = dict(fused.live.named_buffers())
    assert not any(f"work__{name}" in buffers for name in passed)
    assert fused.stats()["live_bytes"] < plain.stats()["live_bytes"]  # private maps: no cache
    assert calls1["gather"] < calls0["gather"] and calls1["scatter"] < calls0["scatter"]
    assert calls0["scatter"] - calls1["scatter"] == len(passed)  # one scatter per passed map
    assert torch.equal(out0, out1)


def test_maps_read_with_a_halo_are_never_passed():
    """GauGAN's and DDPM's tile ops feed convolutions (which read halos) or other tile lists:
    nothing to pass there."""
    from sigec.models.configs import MODELS, build

    for name in ("gaugan-tiny", "ddpm-tiny"):
        model, args, kwargs = build(name, seed=0)
        config = sigec.SparseConfig(**MODELS[name].sige_config)
        prog = build_program(model, args, kwargs, config)
        assert prog.counters["tiles_passed"] == 0


def test_passing_tiles_without_the_batch_size_is_refused():
    """A hand-built graph that passes tile batches must say N: the batch has N*M rows."""
    with pytest.raises(ValueError, match="needs batch="):
        ops.tile_op(None, {}, "sigec.affine", (), {}, ((), {}), name="m", tile_key="k",
                    as_tiles=torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="needs batch="):
        ops.sparse_attention(None, {}, torch.zeros(4, 2, 2, 2), None, None, heads=1, scale=None,
                             name="m", tile_key="k", q_tiles=True)  # fmt: skip


def test_attention_on_an_empty_passed_batch_returns_an_empty_batch():
    """An exact tile list can be empty: no attention runs on zero query rows."""
    from sigec.runtime.masks import TileSet

    empty = torch.zeros(0, 2, dtype=torch.int32)
    tiles = {"k": TileSet(empty, empty, (2, 2), (2, 2), None)}
    v = torch.randn(2, 6, 4, 4)
    y = ops.sparse_attention(None, tiles, torch.zeros(0, 8, 2, 2), v, v, heads=2, scale=None,
                             name="m", tile_key="k", q_tiles=True, as_tiles=torch.float32,
                             batch=2)  # fmt: skip
    assert y.shape == (0, 6, 2, 2) and y.dtype == torch.float32


@pytest.mark.parametrize(
    "net", [_CircularPad, _ReflectThenZeros], ids=["circular", "reflect+zeros"]
)
def test_pads_that_stay_keep_the_exact_result(net):
    torch.manual_seed(0)
    model, x = net().eval(), torch.randn(1, 3, 12, 12)
    engine = sigec.compile(model, (x,), config=EXACT)
    engine.record(x)
    xe = apply_edit(x, edit_masks(12, 12)["corner"], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(engine.edit(xe), model(xe), rtol=1e-5, atol=1e-6)


class _Up(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.b(F.interpolate(self.a(x), scale_factor=self.factor, mode="nearest"))


@pytest.mark.parametrize("factor,sparse", [(2, True), (4, True), (8, False)])
def test_upsampling_runs_sparse_when_its_factor_divides_the_pointwise_tile(factor, sparse):
    """Default pointwise tiles are 4: 2x and 4x upsampling run on tiles; 8x runs dense, and the
    fallback names the knob that would make it sparse."""
    program = build_program(_Up(factor).eval(), (torch.randn(1, 3, 8, 8),), {},
                            sigec.SparseConfig())  # fmt: skip
    on_tiles = program.counters.get("upsamples_sparse", 0) + program.counters["upsamples_read"]
    assert on_tiles == int(sparse)
    reasons = " ".join(why for _, _, why in program.fallbacks)
    assert ("does not divide the pointwise tile size (4)" in reasons) == (not sparse)
    assert ("block_size={'pointwise'" in reasons) == (not sparse)


class _UpConv(nn.Module):
    """conv -> SiLU -> nearest upsampling -> conv (padded with ``mode``); ``tap``: the upsampled
    map is also read by an add (not a conv), so it must stay a map."""

    def __init__(self, factor: int, mode: str = "zeros", tap: bool = False):
        super().__init__()
        self.factor, self.mode, self.tap = factor, mode, tap
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 3, padding=1 if mode == "zeros" else 0)

    def forward(self, x):
        u = F.interpolate(F.silu(self.a(x)), scale_factor=self.factor, mode="nearest")
        v = u if self.mode == "zeros" else F.pad(u, (1, 1, 1, 1), mode=self.mode)
        y = self.b(v)
        return y + u[:, :3] if self.tap else y


@pytest.mark.parametrize("factor, mode", [(2, "zeros"), (4, "zeros"), (2, "reflect")])
def test_a_conv_reads_an_upsampling_through_a_lookup(factor, mode):
    """``fold_upsamples``: the conv reads the upsampling's input (the SiLU folds into the same
    read), so the upsampled map has no working map and no cache; the edit still equals the
    dense model (exact policy), and the truncated edit equals the one without the pass."""
    torch.manual_seed(0)
    model, x = _UpConv(factor, mode).eval(), torch.randn(1, 3, 8, 8)
    xe = apply_edit(x, edit_masks(8, 8)["blob"], seed=1)
    engine = _engine(model, (x,), EXACT)
    engine.record(x)
    with torch.no_grad():
        torch.testing.assert_close(engine.edit(xe), model(xe), rtol=1e-5, atol=1e-6)
    program = engine.program
    assert program.counters["upsamples_read"] == 1
    ups = [n for n in program.record_gm.graph.nodes if "upsample" in str(n.target)]
    assert ups and not any(n.name in program.maps for n in ups)
    convs_ = [n for n in program.edit_gm.graph.nodes if n.target is ops.sparse_conv2d]
    assert [n.kwargs.get("upsample", 1) for n in convs_] == [1, factor]
    assert convs_[1].kwargs.get("act") == "silu"  # the activation before the upsampling
    with_pass, without = _with_and_without(convs.fold_upsamples, model, (x,), (xe,),
                                           "upsamples_read")  # fmt: skip
    torch.testing.assert_close(with_pass, without, rtol=1e-6, atol=1e-6)


def test_an_upsampling_read_by_other_ops_stays_a_map():
    torch.manual_seed(0)
    model, x = _UpConv(2, tap=True).eval(), torch.randn(1, 3, 8, 8)
    engine = _engine(model, (x,), EXACT)
    engine.record(x)
    assert engine.program.counters["upsamples_read"] == 0
    assert engine.program.counters["upsamples_sparse"] == 1
    xe = apply_edit(x, edit_masks(8, 8)["blob"], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(engine.edit(xe), model(xe), rtol=1e-5, atol=1e-6)
    off = sigec.SparseConfig(**{**EXACT.__dict__, "upsample_reads": False})
    assert build_program(_UpConv(2).eval(), (x,), {}, off).counters["upsamples_read"] == 0


def test_dense_key_value_projections_cache_one_map_instead_of_two():
    """kv_projection="dense": the SD UNet's self-attention key / value Linears run dense (with
    the reason in the program), the slot caches less (the normalised tokens instead of K and
    V), and an edit gives what the default's edit gives (the same K and V values, projected
    from the cached tokens); the record is the dense model's either way."""
    from sigec.models.configs import MODELS, build
    from sigec.passes.classify import kv_projections
    from sigec.runtime.masks import blob_mask

    model, args, kwargs = build("sd15-unet-tiny", seed=0)
    mask = blob_mask(*args[0].shape[-2:], 0.1, seed=0, num_blobs=1)
    x = torch.where(mask, torch.randn_like(args[0]), args[0])
    runs = {}
    for kv in ("tiles", "dense"):
        config = sigec.SparseConfig(**MODELS["sd15-unet-tiny"].sige_config, kv_projection=kv)
        engine = sigec.compile(model, args, kwargs, config=config)
        rec = engine.record(*args, **kwargs)
        torch.testing.assert_close(rec.sample, model(*args, **kwargs).sample, rtol=1e-4, atol=1e-5)
        runs[kv] = (engine, engine.edit(x, *args[1:], mask=mask, **kwargs).sample)
    (tiles, out_tiles), (dense, out_dense) = runs["tiles"], runs["dense"]
    projections = kv_projections(dense.program.record_gm)
    assert projections and len(projections) % 2 == 0  # a key and a value Linear per attention
    reasons = {n.name: n.meta["sigec"].reason for n in projections}
    assert all("kv_projection='dense'" in r for r in reasons.values()), reasons
    assert not any(n.meta["sigec"].mode == "dense" for n in kv_projections(tiles.program.record_gm))
    assert dense.stats()["cache_bytes"] < tiles.stats()["cache_bytes"]
    torch.testing.assert_close(out_dense, out_tiles, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="kv_projection"):
        sigec.SparseConfig(kv_projection="host")
