"""The static edit path (``cuda_graphs=True``), run uncaptured on the CPU: a bounded set of edit
shapes made in warm-up serves every mask, survives new records, and is shared by every slot;
its edits equal the eager path's (to float rounding: padding rows change the conv's batch)."""

import dataclasses

import pytest
import torch

import sigec
from sigec.runtime.masks import edit_sequence
from sigec.runtime.sizes import sample_counts
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import GroupNormNet

BLOCKS = {"3x3": 4, "1x1": 4, "pointwise": 4}
STATIC = sigec.SparseConfig(block_size=BLOCKS, cuda_graphs=True)
CLOSE = dict(rtol=1e-5, atol=1e-5)


def _model():
    torch.manual_seed(0)
    return GroupNormNet().eval(), torch.randn(1, 3, 32, 32), torch.randn(1, 4)


def _engines(model, x, t, config=STATIC):
    """The static engine and an eager one, both recorded on (x, t) in slot 0."""
    engines = []
    for graphs in (True, False):
        e = sigec.compile(model, (x, t), config=dataclasses.replace(config, cuda_graphs=graphs))
        e.record(x, t)
        engines.append(e)
    return engines


def test_a_hundred_new_masks_use_the_graphs_made_in_warm_up():
    """A painting session of 100 new masks (strokes and blobs, most committed): the engine's
    graphs are the ones warm-up made (at most 16, none added), each edit runs the smallest class
    that holds its tiles, and every 10th edit matches the eager engine."""
    model, x, t = _model()
    static, eager = _engines(model, x, t)
    path = static.path
    held = static.stats()["graphs"]["held"]
    made = list(path.entries)
    assert 2 <= held <= 16 and len(path.classes) <= STATIC.size_classes
    keys = path.classes.keys
    current = x
    for e in edit_sequence(32, 32, 100, seed=3, fractions=(0.003, 0.3)):
        xe = apply_edit(current, e["mask"], seed=e["index"])
        got = static.edit(xe, t, mask=e["mask"])
        counts = sample_counts(static.program, e["mask"][None], keys, STATIC.mask_threshold,
                               STATIC.mask_level_dilation)[0].tolist()  # fmt: skip
        s = static.stats()["size_class"]
        assert s == path.classes.choose(counts)  # the smallest class that holds them
        assert all(c <= cap for c, cap in zip(counts, path.classes.caps[s], strict=True))
        if e["index"] % 10 == 0:
            torch.testing.assert_close(got, eager.edit(xe, t, mask=e["mask"]), **CLOSE)
            if e["commit"]:
                eager.commit()
        elif e["commit"]:  # keep the eager engine's original in step
            eager.edit(xe, t, mask=e["mask"])
            eager.commit()
        if e["commit"]:
            static.commit()
            current = xe
    stats = static.stats()
    assert stats["graphs"]["held"] == held and path.entries == made
    assert stats["graphs"]["captured_in_edits"] == 0


def test_size_classes_are_ordered_by_cost_and_the_last_holds_every_grid():
    model, x, t = _model()
    static, _ = _engines(model, x, t)
    classes, prog = static.path.classes, static.program
    caps = torch.tensor(classes.caps)
    assert caps[-1].tolist() == [static.path.grid[k] for k in classes.keys]
    assert (caps <= caps[-1]).all() and (caps >= 1).all()
    assert list(classes.seconds) == sorted(classes.seconds)
    assert len(set(classes.caps)) == len(classes)  # no class twice
    for s, sample in enumerate(classes.samples):  # warm-up times each class on a mask it runs
        counts = sample_counts(prog, sample[None], classes.keys, STATIC.mask_threshold,
                               STATIC.mask_level_dilation)[0].tolist()  # fmt: skip
        assert classes.choose(counts) == s or s == len(classes) - 1
    fewer = sigec.compile(model, (x, t), config=dataclasses.replace(STATIC, size_classes=3))
    fewer.record(x, t)
    assert len(fewer.path.classes) <= 3 and fewer.stats()["graphs"]["held"] <= 5


def test_a_new_record_keeps_the_graphs():
    """Opening a new image records into the same buffers: no warm-up, the same graphs, and
    edits equal an engine that recorded the new image first."""
    model, x, t = _model()
    static, _ = _engines(model, x, t)
    made, report = list(static.path.entries), static.path.warmup_report
    mask = edit_masks(32, 32)["blob"]
    static.edit(apply_edit(x, mask, seed=1), t)  # an uncommitted edit the new record drops
    x2 = torch.randn_like(x)
    static.record(x2, t)
    assert static.path.entries == made and static.path.warmup_report is report
    fresh, _ = _engines(model, x2, t)
    xe = apply_edit(x2, mask, seed=2)
    torch.testing.assert_close(static.edit(xe, t), fresh.edit(xe, t), rtol=0, atol=0)
    static.commit()  # commits the edit of the new image, not the dropped one
    fresh.commit()
    xe2 = apply_edit(xe, edit_masks(32, 32)["corner"], seed=3)
    torch.testing.assert_close(static.edit(xe2, t), fresh.edit(xe2, t), rtol=0, atol=0)


@pytest.mark.parametrize("graphs", [True, False], ids=["static", "eager"])
def test_slots_share_the_graphs_and_the_working_set(graphs):
    """Ten slots (one per timestep, like a trajectory) add no graph; edits of each slot equal
    an engine that recorded only that slot, in any order, with commits in between."""
    model, x, _ = _model()
    config = dataclasses.replace(STATIC, cuda_graphs=graphs)
    engine = sigec.compile(model, (x, torch.zeros(1, 4)), config=config)
    ts = [torch.full((1, 4), 0.1 * i) for i in range(10)]
    for i, t in enumerate(ts):
        engine.record(x, t, slot=i)
    held = engine.stats()["graphs"]["held"]
    singles = []
    for t in ts[:3]:
        single = sigec.compile(model, (x, t), config=config)
        single.record(x, t)
        singles.append(single)
    masks = edit_masks(32, 32)
    order = [0, 1, 2, 1, 0, 2, 2, 2]
    shapes = ["blob", "corner", "blobs", "border", "blob", "blobs", "corner", "pixel"]
    current = [x, x, x]
    for step, i in enumerate(order):
        mask = masks[shapes[step]]  # another mask each time: an undo must restore the slot's
        xe = apply_edit(current[i], mask, seed=step)
        got = engine.edit(xe, ts[i], slot=i)
        torch.testing.assert_close(got, singles[i].edit(xe, ts[i]), rtol=0, atol=0)
        if step % 2 == 0:
            engine.commit(slot=i)
            singles[i].commit()
            current[i] = xe
    assert engine.stats()["graphs"]["held"] == held
    assert engine.stats(slot=9)["cache_bytes"] == engine.stats(slot=0)["cache_bytes"]
    # a slot switch is one copy per dtype: every slot's caches live in one flat tensor per dtype,
    # packed at its record (so its first edit pays no set-up), edited or not
    for i in (0, 1, 2, 9):
        slot = engine.slots[str(i)]
        flat = slot._flats[x.dtype]
        cache = slot.cache(slot.map_names[-1])
        assert cache.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_an_edit_of_another_slot_replaces_the_uncommitted_one():
    """One working set: an edit of slot 1 replaces slot 0's uncommitted edit, so committing
    slot 0 afterwards says so instead of committing nothing silently."""
    model, x, _ = _model()
    engine = sigec.compile(model, (x, torch.zeros(1, 4)), config=STATIC)
    t0, t1 = torch.zeros(1, 4), torch.ones(1, 4)
    engine.record(x, t0, slot=0)
    engine.record(x, t1, slot=1)
    mask = edit_masks(32, 32)["blob"]
    engine.edit(apply_edit(x, mask, seed=1), t0, slot=0)
    engine.edit(apply_edit(x, mask, seed=2), t1, slot=1)
    with pytest.raises(sigec.EditReplacedError, match="slot '0'.*replaced by an edit of slot"):
        engine.commit(slot=0)
    engine.commit(slot=1)  # slot 1's edit is the one in the working set
    engine.edit(apply_edit(x, mask, seed=3), t0, slot=0)
    engine.commit(slot=0)  # a new edit of slot 0 can be committed again


def test_a_refused_edit_of_another_slot_leaves_the_pending_edit_in_place():
    """The stale check rides on the edit's one host sync, after the working set switched: a
    refused edit of slot 1 must put slot 0's uncommitted edit back, so that committing it
    works and commits that edit (not the refused one, not nothing)."""
    model, x, _ = _model()
    t0, t1 = torch.zeros(1, 4), torch.ones(1, 4)
    engines = []
    for _ in range(2):
        e = sigec.compile(model, (x, t0), config=STATIC)
        e.record(x, t0, slot=0)
        e.record(x, t1, slot=1)
        engines.append(e)
    engine, ref = engines
    mask = edit_masks(32, 32)["blob"]
    xe = apply_edit(x, mask, seed=1)
    engine.edit(xe, t0, slot=0)
    with pytest.raises(sigec.StaleCacheError):
        engine.edit(apply_edit(x, mask, seed=2), t1 + 1, slot=1)
    engine.commit(slot=0)  # no EditReplacedError: the refused call replaced nothing
    ref.edit(xe, t0, slot=0)
    ref.commit(slot=0)
    xe2 = apply_edit(xe, edit_masks(32, 32)["corner"], seed=3)
    for s, t, v in ((0, t0, xe2), (1, t1, xe), (0, t0, xe)):
        torch.testing.assert_close(engine.edit(v, t, slot=s), ref.edit(v, t, slot=s),
                                   rtol=0, atol=0)  # fmt: skip
    # nothing pending in slot 0 when slot 1's edit is refused: the next edit reloads cleanly
    engine.commit(slot=0)
    ref.commit(slot=0)
    with pytest.raises(sigec.StaleCacheError):
        engine.edit(xe2, t1 * 3, slot=1)
    torch.testing.assert_close(engine.edit(xe2, t0, slot=0), ref.edit(xe2, t0, slot=0),
                               rtol=0, atol=0)  # fmt: skip


def test_warm_up_runs_at_the_first_record_or_else_the_first_edit():
    model, x, t = _model()
    engine = sigec.compile(model, (x, t), config=STATIC)
    engine.record(x, t, warmup=False)
    assert not engine.path.warmed
    engine.edit(apply_edit(x, edit_masks(32, 32)["blob"]), t)
    warm = engine.stats()["warmup"]
    assert warm["ran_in_first_edit"] and warm["warmup_s"] >= 0 and warm["classes"]
    engine2 = sigec.compile(model, (x, t), config=STATIC)
    engine2.record(x, t)
    report = engine2.stats()["warmup"]
    assert not report["ran_in_first_edit"] and len(report["choice"]) == len(engine2.path.classes)


def test_the_static_path_matches_the_eager_path_on_an_attention_unet():
    """Self- and cross-attention on padded tile lists: the static edit is the eager one (both
    without the cost model, which would send the eager edit to the dense model by MACs)."""
    from sigec.models.configs import MODELS, build

    model, args, kwargs = build("sd15-unet-tiny", seed=0)
    base = dict(MODELS["sd15-unet-tiny"].sige_config)
    eager, static = (sigec.compile(model, args, kwargs, config=sigec.SparseConfig(
        **base, cuda_graphs=g, cost_model=False)) for g in (False, True))  # fmt: skip
    for e in (eager, static):
        e.record(*args, **kwargs)
    x = args[0]
    xe = apply_edit(x, edit_masks(*x.shape[-2:])["blob"], seed=0)
    want = eager.edit(xe, *args[1:], **kwargs).sample
    torch.testing.assert_close(static.edit(xe, *args[1:], **kwargs).sample, want, **CLOSE)


def test_the_warm_up_dry_run_leaves_no_trace(monkeypatch):
    """On CUDA, warm-up first runs every class's graph dry (``sigec.kernels.precompiling``: the
    tile kernels only compile, so their outputs are garbage). Here the dry run is forced on the
    CPU with kernels that write NaN: the graphs captured after it, and every edit, must not see
    any of it (the count graph undoes each dry run's tiles, like any warm-up edit's)."""
    import contextlib
    import importlib

    import sigec.runtime.static_path as static_path

    # the modules (the package exports ops of the same names)
    conv, gather, scatter = (importlib.import_module(f"sigec.kernels.{m}")
                             for m in ("conv", "gather", "scatter"))  # fmt: skip

    nan = float("nan")
    real = (scatter.scatter_reference, conv.tile_conv_reference, gather.gather_reference)

    def garbage_scatter(out, tiles, *a, **kw):
        return real[0](out, torch.full_like(tiles, nan), *a, **kw)

    def garbage_conv(out, parts, *a, **kw):
        return real[1](out, [torch.full_like(p, nan) for p in parts], *a, **kw)

    def garbage_gather(*a, **kw):
        return real[2](*a, **kw).fill_(nan)

    dry_runs = []

    @contextlib.contextmanager
    def dry(workers):
        dry_runs.append(workers)
        with monkeypatch.context() as m:
            m.setattr(scatter, "scatter_reference", garbage_scatter)
            m.setattr(conv, "tile_conv_reference", garbage_conv)
            m.setattr(gather, "gather_reference", garbage_gather)
            yield True

    monkeypatch.setattr(static_path, "precompiling", dry)
    monkeypatch.setattr(static_path.StaticPath, "_precompile_here", lambda self: True)
    model, x, t = _model()
    static, eager = _engines(model, x, t)
    assert dry_runs == [STATIC.compile_workers] and static.path.warmup_report["precompiled"]
    current = x
    for e in edit_sequence(32, 32, 12, seed=5, fractions=(0.003, 0.3)):
        xe = apply_edit(current, e["mask"], seed=e["index"])
        got = static.edit(xe, t, mask=e["mask"])
        assert not got.isnan().any()
        torch.testing.assert_close(got, eager.edit(xe, t, mask=e["mask"]), **CLOSE)
        if e["commit"]:
            static.commit()
            eager.commit()
            current = xe
