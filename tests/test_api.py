"""End-to-end tests of sigec.compile: the exact oracle, the truncated policy's guarantees, commit,
slots, errors, stats and moving the engine."""

import dataclasses

import pytest
import torch

import sigec
from sigec.models.configs import MODELS, TINY_MODELS, build
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import BoolMaskNet, ConvNet, FFTNet, FlipNet, GroupNormNet, init_bn

EXACT = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 4, "1x1": 4, "pointwise": 4})


def _dense(model, args, kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out.sample if hasattr(out, "sample") else out


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


def _tiny(name):
    torch.manual_seed(0)
    if name == "convnet":
        model = init_bn(ConvNet())
        return model, (torch.randn(2, 3, 20, 22),), {}
    if name == "groupnorm-net":
        model = GroupNormNet().eval()
        return model, (torch.randn(1, 3, 16, 16), torch.randn(1, 4)), {}
    return build(name, seed=0)


EXACT_MODELS = ["convnet", "groupnorm-net", *TINY_MODELS]


@pytest.fixture(scope="module", params=EXACT_MODELS)
def exact_engine(request):
    model, args, kwargs = _tiny(request.param)
    engine = sigec.compile(model, args, kwargs, config=EXACT)
    engine.record(*args, **kwargs)
    return request.param, model, args, kwargs, engine


@pytest.mark.parametrize("mask_name", list(edit_masks(4, 4)))
def test_exact_policy_equals_dense_on_the_edited_input(exact_engine, mask_name):
    name, model, args, kwargs, engine = exact_engine
    x = args[0]
    mask = edit_masks(*x.shape[-2:])[mask_name]
    x_edit = apply_edit(x, mask, seed=3)
    want = _dense(model, (x_edit, *args[1:]), kwargs)
    got = _sample(engine.edit(x_edit, *args[1:], **kwargs))  # mask from the difference
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got = _sample(engine.edit(x_edit, *args[1:], mask=mask, **kwargs))  # the explicit mask
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_exact_convnet_is_really_sparse():
    model, args, kwargs = _tiny("convnet")
    engine = sigec.compile(model, args, kwargs, config=EXACT)
    engine.record(*args)
    mask = edit_masks(20, 22)["pixel"]
    engine.edit(apply_edit(args[0], mask), mask=mask)
    stats = engine.stats()
    assert stats["dense_fallbacks"] == []
    assert stats["sparse_macs"] < stats["dense_macs"] / 2
    assert stats["rewrites"]["convs_sparse"] == 6
    assert stats["rewrites"]["pads_folded"] == 1
    assert stats["rewrites"]["residuals_fused"] == 1
    assert stats["rewrites"]["norms_folded"] == 1


TRUNCATED_MODELS = ["convnet", "groupnorm-net", "ddpm-tiny", "gaugan-tiny", "sd15-unet-tiny"]


@pytest.fixture(scope="module", params=TRUNCATED_MODELS)
def truncated_engine(request):
    model, args, kwargs = _tiny(request.param)
    cfg = MODELS[request.param].sige_config if request.param in MODELS else {}
    # cost_model off: these tests check what sparse edits do (on tiny models a large edit
    # executes more MACs than the dense model, which the cost model would run instead)
    engine = sigec.compile(model, args, kwargs, config=sigec.SparseConfig(**cfg, cost_model=False))
    y0 = _sample(engine.record(*args, **kwargs))
    return model, args, kwargs, engine, y0


def test_record_returns_the_dense_output(truncated_engine):
    model, args, kwargs, engine, y0 = truncated_engine
    # (channels-last weights: the same sums in another order)
    torch.testing.assert_close(y0, _dense(model, args, kwargs), rtol=1e-4, atol=1e-5)


def test_truncated_no_change_edit_returns_the_record_exactly(truncated_engine):
    model, args, kwargs, engine, y0 = truncated_engine
    got = _sample(engine.edit(*args, **kwargs))
    assert torch.equal(got, y0)


@pytest.mark.parametrize("mask_name", ["pixel", "border", "blob"])
def test_truncated_outside_footprint_is_bit_exact(truncated_engine, mask_name):
    model, args, kwargs, engine, y0 = truncated_engine
    x = args[0]
    mask = edit_masks(*x.shape[-2:])[mask_name]
    y = _sample(engine.edit(apply_edit(x, mask), *args[1:], **kwargs))
    (footprint,) = engine.edit_footprint()
    assert footprint is not None and footprint.any()
    assert not footprint.all()
    outside = ~footprint
    assert torch.equal(y[..., outside], y0[..., outside])
    if (y0.abs() < 0.999).float().mean() > 0.5:  # the random tiny GauGAN saturates its tanh
        assert not torch.equal(y[..., footprint], y0[..., footprint])


def test_commit_then_edit_is_an_edit_of_the_new_original():
    model, args, kwargs = _tiny("convnet")
    engine = sigec.compile(model, args, kwargs, config=EXACT)
    engine.record(*args)
    masks = edit_masks(20, 22)
    x1 = apply_edit(args[0], masks["blob"], seed=1)
    y1 = engine.edit(x1)
    engine.commit()
    assert torch.equal(engine.edit(x1), y1)  # x1 is the original now: nothing changed
    x2 = apply_edit(x1, masks["corner"], seed=2)
    torch.testing.assert_close(engine.edit(x2), _dense(model, (x2,), {}), rtol=1e-4, atol=1e-5)
    tiles = sum(engine.stats()["tiles"].values())
    engine.edit(x2, mask=masks["corner"] | masks["blob"])
    assert sum(engine.stats()["tiles"].values()) > tiles  # the diff was against x1, not x


def test_truncated_commit_keeps_edits_incremental():
    model, args, kwargs = _tiny("gaugan-tiny")
    engine = sigec.compile(model, args, kwargs)
    engine.record(*args)
    x1 = apply_edit(args[0], edit_masks(32, 64)["blob"], seed=1)
    y1 = engine.edit(x1)
    engine.commit()
    assert torch.equal(engine.edit(x1), y1)


def test_slots_are_independent_and_stale_inputs_are_refused():
    model, args, kwargs = _tiny("groupnorm-net")
    x, t = args
    t2 = t + 1
    engine = sigec.compile(model, args, config=EXACT)
    engine.record(x, t, slot=0)
    engine.record(x, t2, slot="step-2")
    mask = edit_masks(16, 16)["blob"]
    xe = apply_edit(x, mask)
    torch.testing.assert_close(engine.edit(xe, t, slot=0), _dense(model, (xe, t), {}),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(engine.edit(xe, t2, slot="step-2"), _dense(model, (xe, t2), {}),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(sigec.StaleCacheError, match="input 1 differs from the one recorded"):
        engine.edit(xe, t2, slot=0)
    with pytest.raises(sigec.NotRecordedError, match="slot 7 has no record"):
        engine.edit(xe, t, slot=7)
    with pytest.raises(sigec.NotRecordedError):
        engine.commit(slot=7)


def test_user_errors_are_typed_and_say_what_to_do():
    model, args, _ = _tiny("convnet")
    engine = sigec.compile(model, args)
    with pytest.raises(sigec.NotRecordedError, match="call engine.record"):
        engine.edit(*args)
    engine.record(*args)
    x = args[0]
    with pytest.raises(sigec.MaskError, match=r"expected shape \[20, 22\]"):
        engine.edit(x, mask=torch.ones(10, 11, dtype=torch.bool))
    with pytest.raises(sigec.MaskError, match="torch.bool"):
        engine.edit(x, mask=torch.ones(20, 22))
    with pytest.raises(sigec.InputMismatchError, match="compile another engine"):
        engine.edit(torch.randn(2, 3, 24, 22))
    with pytest.raises(sigec.InputMismatchError, match="engine.to"):
        engine.edit(x.double())
    with pytest.raises(sigec.InputMismatchError, match="structure|keyword"):
        engine.edit(x, x)
    with pytest.raises(TypeError, match="nn.Module"):
        sigec.compile(lambda v: v, args)
    with pytest.raises(sigec.CaptureError, match="no image input"):
        sigec.compile(torch.nn.Linear(3, 3), (torch.randn(2, 3),))


def test_unsupported_op_falls_back_to_dense_and_says_so():
    model = FlipNet().eval()
    x = torch.randn(1, 3, 12, 12)
    engine = sigec.compile(model, (x,), config=EXACT)
    engine.record(x)
    reasons = [f["reason"] for f in engine.stats()["dense_fallbacks"]]
    assert any("unsupported op aten.flip" in r for r in reasons)
    mask = edit_masks(12, 12)["corner"]
    xe = apply_edit(x, mask)
    torch.testing.assert_close(engine.edit(xe), _dense(model, (xe,), {}), rtol=1e-4, atol=1e-5)


def test_compile_does_not_mutate_the_model():
    model, args, _ = _tiny("convnet")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = sigec.compile(model, args)
    engine.record(*args)
    engine.to(torch.float64)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype
               for k in before)  # fmt: skip


def test_to_dtype_moves_weights_and_caches():
    model, args, _ = _tiny("convnet")
    engine = sigec.compile(model, args, config=EXACT)
    engine.record(*args)
    engine.to(torch.float64)
    assert all(
        b.dtype == torch.float64 for b in engine.slots["0"].buffers() if b.is_floating_point()
    )
    x = args[0].double()
    mask = edit_masks(20, 22)["blob"]
    xe = apply_edit(x, mask)
    want = _dense(model.double(), (xe,), {})
    torch.testing.assert_close(engine.edit(xe), want, rtol=1e-4, atol=1e-5)


def test_stats_report_macs_fractions_and_cache_bytes():
    model, args, kwargs = _tiny("gaugan-tiny")
    engine = sigec.compile(
        model, args, config=sigec.SparseConfig(**MODELS["gaugan-tiny"].sige_config)
    )
    assert engine.stats()["sparse_macs"] is None  # nothing edited yet
    engine.record(*args)
    engine.edit(*args, mask=edit_masks(32, 64)["pixel"])
    small = engine.stats()
    engine.edit(*args, mask=edit_masks(32, 64)["full"])
    full = engine.stats()
    assert small["dense_macs"] == full["dense_macs"] > 0
    assert small["sparse_macs"] < full["sparse_macs"]
    assert small["cache_bytes"] > 0
    assert set(small["active_fraction"]) >= {"32x64", "16x32"}
    assert all(0 < f <= 1 for f in small["active_fraction"].values())
    assert full["active_fraction"]["32x64"] == 1.0
    assert sum(v["dense"] for v in small["macs_by_resolution"].values()) == small["dense_macs"]


def test_diffusers_output_type_is_kept():
    model, args, kwargs = _tiny("ddpm-tiny")
    engine = sigec.compile(model, args, kwargs)
    out = engine.record(*args)
    assert type(out).__name__ == "UNet2DOutput"
    assert isinstance(engine.edit(*args), type(out))


@pytest.mark.parametrize("policy", ["exact", "truncated"])
def test_grid_padded_tile_lists_give_the_same_result(policy):
    model, args, kwargs = _tiny("convnet")
    sizes = {"3x3": 4, "1x1": 4, "pointwise": 4}
    results = []
    for lists in ("exact", "grid"):
        config = sigec.SparseConfig(mask_policy=policy, block_size=sizes, tile_lists=lists)
        engine = sigec.compile(model, args, config=config)
        engine.record(*args)
        mask = edit_masks(20, 22)["blobs"]
        results.append(engine.edit(apply_edit(args[0], mask), mask=mask))
        ts = next(iter(engine.path.last.tiles.used().values()))
        assert (ts.num_active is not None) == (lists == "grid")
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_keyword_inputs_pass_through_and_are_checked():
    model, (x, t), _ = _tiny("groupnorm-net")
    engine = sigec.compile(model, (x,), {"t": t}, config=EXACT)
    engine.record(x, t=t)
    mask = edit_masks(16, 16)["corner"]
    xe = apply_edit(x, mask)
    torch.testing.assert_close(engine.edit(xe, t=t), _dense(model, (xe, t), {}), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    with pytest.raises(sigec.StaleCacheError, match="input t differs"):
        engine.edit(xe, t=t * 2)
    with pytest.raises(sigec.InputMismatchError, match="missing \\['t'\\]"):
        engine.edit(xe)


class _TwoMaps(torch.nn.Module):
    """An image and a 4-D conditioning map that is not an image (e.g. a style map)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x, style):
        return self.b(self.a(x) * style)


def test_spatial_inputs_names_the_images():
    torch.manual_seed(0)
    model = _TwoMaps().eval()
    x, style = torch.randn(1, 3, 12, 12), torch.randn(1, 4, 12, 12)
    config = sigec.SparseConfig(mask_policy="exact", spatial_inputs=("0",))
    engine = sigec.compile(model, (x, style), config=config)
    assert engine.program.input_kinds == ["spatial", "tensor"]
    engine.record(x, style)
    xe = apply_edit(x, edit_masks(12, 12)["pixel"])
    torch.testing.assert_close(engine.edit(xe, style), _dense(model, (xe, style), {}),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(sigec.StaleCacheError):
        engine.edit(xe, style + 1)
    default = sigec.compile(model, (x, style))  # by default both 4-D inputs are images
    assert default.program.input_kinds == ["spatial", "spatial"]


@pytest.mark.parametrize("policy", ["exact", "truncated"])
def test_an_edit_forgets_the_previous_uncommitted_edit(policy):
    """Edit A then edit B (elsewhere, smaller) == a fresh engine's edit B: restore undid A."""
    model, args, kwargs = _tiny("gaugan-tiny")
    x = args[0]
    masks = edit_masks(*x.shape[-2:])
    config = sigec.SparseConfig(mask_policy=policy, block_size={"3x3": 4, "1x1": 4, "pointwise": 4})
    engine = sigec.compile(model, args, config=config)
    engine.record(x)
    engine.edit(apply_edit(x, masks["blobs"], seed=1))
    xb = apply_edit(x, masks["corner"], seed=2)
    got = engine.edit(xb)
    fresh = sigec.compile(model, args, config=config)
    fresh.record(x)
    assert torch.equal(got, fresh.edit(xb))


def _same_edits(engine, reference, args, kwargs, mask_names, commit_after, atol=0.0):
    """Run the same edits on two recorded engines (both commit after ``commit_after``): every
    output must be bit-identical (or within ``atol``: tile batches of other sizes let the CPU's
    conv pick other blockings, which moves float rounding)."""
    x = args[0]
    masks = edit_masks(*x.shape[-2:])
    for i, mask_name in enumerate(mask_names):
        xe = apply_edit(x, masks[mask_name], seed=i)
        got = _sample(engine.edit(xe, *args[1:], mask=masks[mask_name], **kwargs))
        want = _sample(reference.edit(xe, *args[1:], mask=masks[mask_name], **kwargs))
        torch.testing.assert_close(got, want, rtol=0 if not atol else 1e-5, atol=atol,
                                   msg=mask_name)  # fmt: skip
        if mask_name == commit_after:
            engine.commit()
            reference.commit()
            x = xe


@pytest.mark.parametrize("name", ["sd15-unet-tiny", "gaugan-tiny"])
def test_static_shape_graph_path_gives_the_eager_result(name):
    """The static (CUDA-graph) path (size classes, undo in the count graph, commit by copy) runs
    uncaptured off CUDA: it must reproduce the eager engine across commits (to float rounding:
    its tile batches carry padding rows)."""
    model, args, kwargs = _tiny(name)
    base = dict(block_size={"3x3": 4, "1x1": 4, "pointwise": 4}, norm_stats="incremental")
    eager = sigec.compile(model, args, kwargs, config=sigec.SparseConfig(**base))
    graphed = sigec.compile(model, args, kwargs,
                            config=sigec.SparseConfig(**base, cuda_graphs=True))  # fmt: skip
    for e in (eager, graphed):
        e.record(*args, **kwargs)
    # incremental statistics subtract sums of squares: padding rows' other conv blockings move
    # the rounding by up to ~1e-5 after a commit (fp32, values ~1)
    _same_edits(graphed, eager, args, kwargs, ["blob", "pixel", "full", "blob", "border"], "full",
                atol=5e-5)  # fmt: skip
    assert graphed.stats()["graphs"]["held"] <= 16


def test_cuda_graphs_need_the_truncated_policy():
    with pytest.raises(ValueError, match="truncated"):
        sigec.SparseConfig(mask_policy="exact", cuda_graphs=True)


def test_a_dense_edit_from_the_cost_model_commits_by_recording_again():
    """When the cost model runs the dense model for an edit, the output is the dense model's, the
    caches stay untouched, and commit records the edited input again (in place)."""
    model, args, kwargs = _tiny("gaugan-tiny")
    config = sigec.SparseConfig(block_size={"3x3": 4, "1x1": 4, "pointwise": 4}, cuda_graphs=True)
    engine = sigec.compile(model, args, kwargs, config=config)
    engine.record(*args)
    x = args[0]
    masks = edit_masks(*x.shape[-2:])
    engine.edit(apply_edit(x, masks["blob"], seed=1), mask=masks["blob"])  # a sparse edit
    path = engine.path
    path.choice = ["dense"] * len(path.choice)  # what the cost model picks for large edits
    xe = apply_edit(x, masks["full"], seed=2)
    torch.testing.assert_close(engine.edit(xe, mask=masks["full"]), _dense(model, (xe,), {}),
                               rtol=0, atol=0)  # fmt: skip
    assert engine.stats()["ran_dense"] and engine.edit_footprint() == [None]
    engine.commit()
    path.choice = ["sparse"] * len(path.choice)
    fresh = sigec.compile(model, (xe,), kwargs, config=config)
    fresh.record(xe)
    x2 = apply_edit(xe, masks["blob"], seed=3)
    assert torch.equal(engine.edit(x2, mask=masks["blob"]), fresh.edit(x2, mask=masks["blob"]))


def test_channels_last_maps_give_the_same_edit():
    model, args, kwargs = _tiny("sd15-unet-tiny")
    base = dict(block_size={"3x3": 4, "1x1": 4, "pointwise": 4})
    plain = sigec.compile(model, args, kwargs, config=sigec.SparseConfig(**base))
    cl = sigec.compile(model, args, kwargs, config=sigec.SparseConfig(**base, channels_last=True))
    for e in (plain, cl):
        e.record(*args, **kwargs)
    maps = [b for n, b in cl.live.named_buffers() if n.startswith("work__")]
    maps += [b for n, b in cl.slots["0"].named_buffers() if n.startswith("cache__")]
    assert all(b.is_contiguous(memory_format=torch.channels_last) for b in maps)
    x = args[0]
    mask = edit_masks(*x.shape[-2:])["blob"]
    xe = apply_edit(x, mask, seed=1)
    want = _sample(plain.edit(xe, *args[1:], mask=mask, **kwargs))
    got = _sample(cl.edit(xe, *args[1:], mask=mask, **kwargs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_private_maps_need_no_cache_and_change_nothing(graphs):
    """Maps read only at the tiles their producer writes (a transformer block's LayerNorm,
    queries, attention output, residual sums) keep no cache; edits and commits are unchanged."""
    import dataclasses

    from sigec.runtime.engine import SparseEngine

    model, args, kwargs = _tiny("sd15-unet-tiny")
    # pass_tiles off: with it, most private maps are not built at all (tests/passes)
    config = sigec.SparseConfig(block_size={"3x3": 4, "1x1": 4, "pointwise": 4},
                                cuda_graphs=graphs, pass_tiles=False)  # fmt: skip
    engine = sigec.compile(model, args, kwargs, config=config)
    prog = engine.program
    assert len(prog.private_maps) >= 20
    full = SparseEngine(dataclasses.replace(prog, private_maps=frozenset()), config)
    for e in (engine, full):
        e.record(*args, **kwargs)
    buffers = dict(engine.slots["0"].named_buffers())
    work = dict(engine.live.named_buffers())
    assert all(f"cache__{m}" not in buffers and f"work__{m}" in work for m in prog.private_maps)
    assert engine.stats()["cache_bytes"] < full.stats()["cache_bytes"]
    _same_edits(engine, full, args, kwargs, ["blob", "pixel", "blobs", "blob"], "pixel")


@pytest.mark.parametrize("graphs", [False, True])
def test_shortcut_residuals_need_no_cache(graphs):
    """A ResBlock's 1x1 shortcut conv adds the block's conv output as its residual; it takes that
    conv's tile size, so it reads the residual only at the tiles the conv wrote: the residual
    map keeps no cache (DDPM's up blocks). The working map of such a map is never restored, so a
    read outside those tiles would see another edit's values: every edit must equal an engine
    that caches them all."""
    import dataclasses

    from sigec.runtime import ops
    from sigec.runtime.engine import SparseEngine

    model, args, kwargs = _tiny("ddpm-tiny")
    config = sigec.SparseConfig(block_size={"3x3": 6, "1x1": 4, "pointwise": 4},
                                cuda_graphs=graphs)  # fmt: skip
    engine = sigec.compile(model, args, kwargs, config=config)
    prog = engine.program
    residuals, tiles = set(), set()
    for n in prog.edit_gm.graph.nodes:
        r = n.kwargs.get("residual") if n.target is ops.sparse_conv2d else None
        req = prog.tile_requests[n.kwargs["tile_key"]] if r is not None else None
        if req is not None and req.kernel == (1, 1) and r.target is ops.sparse_conv2d:
            theirs = prog.tile_requests[r.kwargs["tile_key"]]
            assert theirs.kernel == (3, 3) and req.tile == theirs.tile  # not the 1x1 size
            tiles.add(req.tile)
            residuals.add(r.kwargs["name"])
    assert residuals and residuals <= prog.private_maps and (6, 6) in tiles  # 6, not 1x1's 4
    full = SparseEngine(dataclasses.replace(prog, private_maps=frozenset()), config)
    for e in (engine, full):
        e.record(*args, **kwargs)
    buffers = dict(engine.slots["0"].named_buffers())
    assert all(f"cache__{m}" not in buffers for m in residuals)
    assert engine.stats()["cache_bytes"] < full.stats()["cache_bytes"]
    _same_edits(engine, full, args, kwargs, ["blob", "corner", "pixel", "blobs", "blob"], "corner")


def test_fit_tiles_shrinks_overhanging_tiles_and_stays_exact():
    config = sigec.SparseConfig(block_size={"3x3": 6, "1x1": 4}, fit_tiles=True)
    assert config.tile_for(3, 3, (8, 8)) == 4  # 6x6 tiles would cover 12x12
    assert config.tile_for(3, 3, (64, 64)) == 6  # 66x66: a small overhang is kept
    assert sigec.SparseConfig().tile_for(3, 3, (8, 8)) == 4  # on by default
    assert sigec.SparseConfig(fit_tiles=False).tile_for(3, 3, (8, 8)) == 6
    model, args, kwargs = _tiny("gaugan-tiny")
    exact = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 6, "1x1": 4},
                               fit_tiles=True)  # fmt: skip
    engine = sigec.compile(model, args, kwargs, config=exact)
    engine.record(*args)
    tiles = {req.tile[0] for req in engine.program.tile_requests.values() if req.kernel == (3, 3)}
    assert {4, 6} <= tiles and max(tiles) == 6  # small maps get smaller tiles
    mask = edit_masks(*args[0].shape[-2:])["blob"]
    xe = apply_edit(args[0], mask, seed=2)
    torch.testing.assert_close(engine.edit(xe, mask=mask), _dense(model, (xe,), {}),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_low_res_tiles_sizes():
    """low_res_tiles: a conv's tile is at most an eighth of its map's smaller side (at least 2);
    a pointwise op's too, to a multiple of its upsampling factor where one fits."""
    on = sigec.SparseConfig(low_res_tiles=True)
    assert on.tile_for(3, 3, (16, 16)) == 2 and on.tile_for(3, 3, (8, 16)) == 2
    assert on.tile_for(3, 3, (32, 64)) == 4 and on.tile_for(3, 3, (64, 64)) == 6
    assert on.tile_for(1, 1, (32, 32)) == 4 and sigec.SparseConfig().tile_for(3, 3, (16, 16)) == 6
    assert on.pointwise_tile((16, 16)) == 2 and on.pointwise_tile((64, 64)) == 4
    assert on.pointwise_tile((16, 16), factor=2) == 2
    assert on.pointwise_tile((16, 16), factor=4) == 4  # no multiple of 4 below the cap: kept
    assert sigec.SparseConfig().pointwise_tile((16, 16)) == 4


@pytest.mark.parametrize("name", TINY_MODELS)
def test_low_res_tiles_cut_macs_and_stay_exact(name):
    """With low_res_tiles the exact policy still equals dense on every tiny model, and the
    truncated edit executes fewer MACs than without (at most as many where no map is small)."""
    model, args, kwargs = _tiny(name)
    x = args[0]
    mask = edit_masks(*x.shape[-2:])["blob"]
    xe = apply_edit(x, mask, seed=2)
    exact = sigec.SparseConfig(mask_policy="exact", low_res_tiles=True)
    engine = sigec.compile(model, args, kwargs, config=exact)
    engine.record(*args, **kwargs)
    torch.testing.assert_close(_sample(engine.edit(xe, *args[1:], mask=mask, **kwargs)),
                               _dense(model, (xe, *args[1:]), kwargs), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    macs = {}
    for low in (False, True):
        config = sigec.SparseConfig(**MODELS[name].sige_config, low_res_tiles=low)
        engine = sigec.compile(model, args, kwargs, config=config)
        engine.record(*args, **kwargs)
        engine.edit(xe, *args[1:], mask=mask, **kwargs)
        macs[low] = engine.stats()["sparse_macs"]
        tiles = {r.tile[0] for r in engine.program.tile_requests.values() if r.kernel == (3, 3)}
    assert macs[True] <= macs[False]
    if name in ("sd15-unet-tiny", "gaugan-tiny"):
        assert macs[True] < macs[False] and 2 in tiles  # their small maps get 2x2 tiles


def test_compile_after_a_forward_with_grad_enabled():
    """Spectral norm keeps a computed ``weight`` attribute after a forward with grad enabled;
    compiling must still work and leave the model untouched."""
    model, args, kwargs = _tiny("gaugan-tiny")
    with torch.enable_grad():
        model(*args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = sigec.compile(model, args, kwargs, config=EXACT)
    torch.testing.assert_close(engine.record(*args), _dense(model, args, {}), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kernel", ["fused", "tiles"])
@pytest.mark.parametrize("name", ["sd15-unet-tiny", "gaugan-tiny"])
def test_fused_conv_kernel_in_the_edit_path(name, kernel, monkeypatch):
    """The fused Triton conv (run here by the CPU interpreter) inside real edits: concatenated
    skip inputs, folded norm + activation prologues (in the kernel, or for "tiles" in the
    gather before it), residuals, strided convs and capacity padding rows all agree with the
    gather -> conv -> scatter path."""
    from sigec.kernels import conv as conv_module

    calls = []

    def triton_on_cpu(*args, **kwargs):
        calls.append(len(args[1]))
        conv_module.tile_conv_triton(*args, check_values=False, **kwargs)

    model, args, kwargs = _tiny(name)
    base = dict(block_size={"3x3": 4, "1x1": 4, "pointwise": 4}, cuda_graphs=True)
    fused = sigec.compile(model, args, kwargs,
                          config=sigec.SparseConfig(**base, conv_kernel=kernel))  # fmt: skip
    cudnn = sigec.compile(model, args, kwargs,
                          config=sigec.SparseConfig(**base, conv_kernel="cudnn"))  # fmt: skip
    for e in (fused, cudnn):
        e.record(*args, **kwargs)
    masks = edit_masks(*args[0].shape[-2:])
    xe = apply_edit(args[0], masks["blob"], seed=1)
    want = _sample(cudnn.edit(xe, *args[1:], mask=masks["blob"], **kwargs))
    monkeypatch.setattr(conv_module, "tile_conv_reference", triton_on_cpu)
    got = _sample(fused.edit(xe, *args[1:], mask=masks["blob"], **kwargs))
    assert calls, "the fused kernel never ran"
    if name == "sd15-unet-tiny":
        assert 2 in calls  # a decoder conv read its skip concat without building it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _recorded_graph_engine():
    """groupnorm-net on the CUDA-graph path (uncaptured on the CPU), recorded on its input."""
    model, args, _ = _tiny("groupnorm-net")
    config = sigec.SparseConfig(block_size={"3x3": 4, "1x1": 4, "pointwise": 4}, cuda_graphs=True)
    engine = sigec.compile(model, args, config=config)
    engine.record(*args)
    return model, args, config, engine


def test_graph_path_refuses_stale_inputs_before_touching_anything():
    """With CUDA graphs the stale check is read with the tile counts (one sync); a stale input
    raises with the caches untouched and the previous inputs, mask and tile lists put back, so
    a later commit still records the right input."""
    model, args, config, engine = _recorded_graph_engine()
    x, t = args
    mask = edit_masks(16, 16)["blob"]
    xe = apply_edit(x, mask)
    first = engine.edit(xe, t)
    footprint = engine.edit_footprint()
    path = engine.path
    inputs_before = [b.clone() for b in path.static_inputs]
    other = edit_masks(16, 16)["corner"]
    with pytest.raises(sigec.StaleCacheError, match="input 1 differs from the one recorded"):
        engine.edit(apply_edit(x, other, seed=5), t + 1)
    # the refused edit's inputs, mask and tile lists are gone again
    for got, want in zip(engine.edit_footprint(), footprint, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(path.static_inputs, inputs_before, strict=True):
        assert torch.equal(got, want)
    engine.commit()  # commits the first edit, not the refused one
    torch.testing.assert_close(engine.edit(xe, t), first, rtol=0, atol=0)
    eager = sigec.compile(model, args, config=dataclasses.replace(config, cuda_graphs=False))
    eager.record(x, t)
    torch.testing.assert_close(first, eager.edit(xe, t), rtol=0, atol=0)


def test_graph_path_refused_first_edit_then_dense_commit():
    """A refused first edit leaves the record's inputs in place; a later edit that the cost
    model runs dense commits by recording its own inputs, not the refused ones."""
    model, args, config, engine = _recorded_graph_engine()
    x, t = args
    mask = edit_masks(16, 16)["blob"]
    with pytest.raises(sigec.StaleCacheError):
        engine.edit(apply_edit(x, mask, seed=5), t + 1)
    path = engine.path
    assert torch.equal(path.static_inputs[0], x) and torch.equal(path.static_inputs[1], t)
    path.choice = ["dense"] * len(path.choice)  # what the cost model picks for a large edit
    xe = apply_edit(x, mask)
    got = engine.edit(xe, t)
    torch.testing.assert_close(got, model(xe, t), rtol=1e-5, atol=1e-5)
    engine.commit()
    xe2 = apply_edit(xe, edit_masks(16, 16)["corner"], seed=7)
    path.choice = ["sparse"] * len(path.choice)
    fresh = sigec.compile(model, args, config=dataclasses.replace(config, cuda_graphs=False))
    fresh.record(xe, t)  # what the commit must have recorded: the accepted edit's inputs
    torch.testing.assert_close(engine.edit(xe2, t), fresh.edit(xe2, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("conv_kernel", "triton", "conv_kernel: expected one of"),
        ("dense_regions", "compiled", "dense_regions: expected 'inductor' or 'eager'"),
        ("tile_expressions", "jit", "tile_expressions: expected 'inductor' or 'eager'"),
        ("dense_backend", "tvm", "dense_backend: expected 'inductor' or 'eager'"),
        ("count_graph", "cuda", "count_graph: expected 'inductor' or 'eager'"),
        ("compile_workers", -1, "compile_workers: expected an int >= 0"),
        ("tile_lists", "all", "tile_lists: expected 'exact' or 'grid'"),
        ("norm_stats", "running", "norm_stats: expected one of"),
    ],
)
def test_bad_config_values_are_refused_with_the_choices(field, value, words):
    with pytest.raises(ValueError, match=words):
        sigec.SparseConfig(**{field: value})


@pytest.mark.parametrize("field", ["low_res_tiles", "fit_tiles", "cuda_graphs", "channels_last"])
def test_switches_must_be_booleans(field):
    """A switch given as a string or a number (``--set low_res_tiles=yes``) is refused."""
    for value in ("yes", "False", 1):
        with pytest.raises(TypeError, match=f"{field}: expected True or False"):
            sigec.SparseConfig(**{field: value})
    assert getattr(sigec.SparseConfig(**{field: False}), field) is False


def test_auto_conv_kernel_follows_the_measured_rule():
    """conv_kernel="auto": fused without a prologue and with a short reduction, the conv on
    gathered windows for the others up to 320 output channels, else cuDNN (docs/results.md,
    per-shape measurement); "fused" / "tiles" / "cudnn" force one, except where a path cannot
    run the conv (transposed, grouped, more than two fused inputs)."""
    from sigec.runtime.ops import FUSED_MAX_K, TILES_MAX_COUT, conv_path

    short = torch.empty(8, 128, 3, 3)  # C_in * 9 = 1152
    long = torch.empty(8, 1280, 3, 3)  # 11520
    wide = torch.empty(TILES_MAX_COUT + 1, 128, 3, 3)
    assert short[0].numel() <= FUSED_MAX_K < long[0].numel()
    scale = torch.ones(1, 128)

    def path(kernel, sc, sh, act, w, groups=1, parts=1, transposed=None):
        return conv_path(kernel, sc, sh, act, w, groups, parts, transposed)

    assert path("auto", None, None, "identity", short) == "fused"
    assert path("auto", scale, scale, "silu", short) == "tiles"  # a prologue: on the windows
    assert path("auto", None, None, "silu", short) == "tiles"
    assert path("auto", None, None, "identity", long) == "tiles"  # long reduction
    assert path("auto", scale, scale, "silu", wide) == "cudnn"  # many output channels
    assert path("auto", None, None, "identity", wide[:, :, :1, :1]) == "fused"
    assert path("fused", scale, scale, "silu", long) == "fused"
    assert path("fused", scale, scale, "silu", long, parts=3) == "tiles"
    assert path("tiles", scale, scale, "silu", short) == "tiles"
    assert path("cudnn", None, None, "identity", short) == "cudnn"
    assert path("tiles", None, None, "identity", short, groups=2) == "cudnn"
    assert path("fused", None, None, "identity", short, transposed=(1, 1, 0, 0)) == "cudnn"
    assert path("auto", scale, scale, "silu", short, transposed=(1, 1, 0, 0)) == "cudnn"


def test_a_nan_painted_in_is_edited_and_a_recorded_nan_repaired():
    """NaN differences count as edits (both ways): the result follows the dense model."""
    model, args, kwargs = _tiny("convnet")
    engine = sigec.compile(model, args, config=EXACT)
    engine.record(*args)
    x = args[0].clone()
    x[0, 1, 7, 9] = float("nan")
    got = engine.edit(x)
    want = _dense(model, (x,), {})
    assert want.isnan().any() and not want.isnan().all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    engine.commit()  # a record with a NaN in it ...
    x2 = x.clone()
    x2[0, 1, 7, 9] = 0.25  # ... that the next edit repairs
    got = engine.edit(x2)
    assert not got.isnan().any()
    torch.testing.assert_close(got, _dense(model, (x2,), {}), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("net", [BoolMaskNet, FFTNet], ids=["bool", "complex"])
@pytest.mark.parametrize("policy", ["exact", "truncated"])
def test_maps_of_a_dtype_tiles_cannot_hold_run_dense(net, policy):
    """Bool and complex 4-D intermediates used to compile, record, then crash inside gather at
    edit time; they run dense, say why, and the exact policy still equals the dense model."""
    torch.manual_seed(0)
    model, x = net().eval(), torch.randn(1, 3, 16, 16)
    config = sigec.SparseConfig(mask_policy=policy, block_size={"3x3": 4, "1x1": 4,
                                                                "pointwise": 4})  # fmt: skip
    engine = sigec.compile(model, (x,), config=config)
    engine.record(x)
    xe = apply_edit(x, edit_masks(16, 16)["blob"], seed=1)
    got = engine.edit(xe)
    reasons = " ".join(f["reason"] for f in engine.stats()["dense_fallbacks"])
    assert ("torch.bool" if net is BoolMaskNet else "torch.complex64") in reasons
    assert "tiles hold floating maps" in reasons
    if policy == "exact":
        torch.testing.assert_close(got, _dense(model, (xe,), {}), rtol=1e-4, atol=1e-5)


def test_a_mask_without_data_is_a_typed_error():
    model, args, _ = _tiny("convnet")
    engine = sigec.compile(model, args, config=EXACT)
    engine.record(*args)
    with pytest.raises(sigec.MaskError, match="meta tensor has no values"):
        engine.edit(args[0], mask=torch.zeros(20, 22, dtype=torch.bool, device="meta"))
    assert sigec.CheckpointError.__name__ in sigec.__all__
