"""Speculative launches on the CUDA-graph path (``SparseConfig.speculate``), run uncaptured on
the CPU: the graph of the previous edit's capacities runs before the counts are read; it is kept
when the new counts fit, undone otherwise, and undone on a stale input. Every step is compared
with an engine that never speculates: outputs, working maps and caches."""

import dataclasses

import pytest
import torch

import sigec
from sigec.runtime.masks import blob_mask
from tests.masks_for_tests import apply_edit
from tests.nets import GroupNormNet

BLOCKS = {"3x3": 4, "1x1": 4, "pointwise": 4}


def _pair():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x, t = torch.randn(1, 3, 32, 32), torch.randn(1, 4)
    config = sigec.SparseConfig(block_size=BLOCKS, cuda_graphs=True, speculate=True)
    engines = []
    for speculate in (True, False):
        engine = sigec.compile(
            model, (x, t), config=dataclasses.replace(config, speculate=speculate)
        )
        engine.record(x, t)
        engines.append(engine)
    return model, x, t, engines


def _same_state(a, b):
    """Outputs aside: every cache and every working map with a cache agree in slot 0 (a private
    map's working buffer is read only where the current edit wrote it first)."""
    private = {f"work__{n}" for n in a.program.private_maps}
    bufs_b = dict(b.slots["0"].named_buffers())
    for key, buf in a.slots["0"].named_buffers():
        if key not in private:
            torch.testing.assert_close(buf, bufs_b[key], rtol=1e-5, atol=1e-5, msg=key)


def _mask(fraction, seed):
    return blob_mask(32, 32, fraction, seed=seed, num_blobs=1)


def test_speculative_edits_equal_edits_without_speculation():
    """Same size (kept), larger (too small: undone), smaller (kept, more padding), empty,
    commits in between."""
    _, x, t, (spec, plain) = _pair()
    steps = [("edit", 0.05, 1), ("edit", 0.05, 2), ("edit", 0.05, 3), ("edit", 0.3, 4),
             ("edit", 0.3, 5), ("commit",), ("edit", 0.02, 6), ("edit", 0.02, 7),
             ("edit", 0.0, 8), ("edit", 0.02, 9), ("commit",), ("edit", 0.02, 10)]  # fmt: skip
    base = current = x
    for step in steps:
        if step[0] == "commit":
            spec.commit()
            plain.commit()
            base = current
        else:
            _, fraction, seed = step
            current = apply_edit(base, _mask(fraction, seed), seed=seed)
            got, want = spec.edit(current, t), plain.edit(current, t)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for f, g in zip(spec.edit_footprint(), plain.edit_footprint(), strict=True):
                assert (f is None and g is None) or torch.equal(f, g)
        _same_state(spec, plain)
    runner = spec.slots["0"].graphs
    assert runner.speculated >= 4 and runner.missed >= 1  # kept, and undone for growth
    assert plain.slots["0"].graphs.speculated == 0


@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "committed"])
def test_stale_input_after_a_speculative_launch_undoes_it(committed):
    """The speculative graph already wrote the refused edit's tiles: they are undone and the
    previous edit (if uncommitted) is recomputed, so a commit still commits it."""
    _, x, t, (spec, plain) = _pair()
    first = apply_edit(x, _mask(0.05, 1), seed=1)
    second = apply_edit(x, _mask(0.05, 2), seed=2)
    for engine in (spec, plain):
        engine.edit(first, t)
        engine.edit(second, t)  # the speculation for the next edit now exists
        if committed:
            engine.commit()
    runner = spec.slots["0"].graphs
    before = runner.speculated
    with pytest.raises(sigec.StaleCacheError):
        spec.edit(apply_edit(x, _mask(0.05, 3), seed=3), t + 1)
    assert runner.speculated == before  # the launch was not kept
    _same_state(spec, plain)
    for f, g in zip(spec.edit_footprint(), plain.edit_footprint(), strict=True):
        assert torch.equal(f, g)
    spec.commit()
    plain.commit()
    _same_state(spec, plain)
    third = apply_edit(second, _mask(0.05, 4), seed=4)
    torch.testing.assert_close(spec.edit(third, t), plain.edit(third, t), rtol=1e-5, atol=1e-5)


def test_speculating_the_dense_graph():
    """Where the cost model picked dense, the dense model is what speculation launches; an edit
    whose own choice is sparse then runs its sparse graph."""
    model, x, t, (spec, plain) = _pair()
    masks = [_mask(0.05, s) for s in (1, 2, 3)]
    edits = [apply_edit(x, m, seed=s) for s, m in enumerate(masks)]
    for engine in (spec, plain):
        engine.edit(edits[0], t)  # creates the runner
        engine.slots["0"].graphs.default_choice = "dense"
    for e in edits[1:]:
        got = spec.edit(e, t)
        torch.testing.assert_close(got, model(e, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, plain.edit(e, t), rtol=1e-5, atol=1e-5)
    runner = spec.slots["0"].graphs
    assert runner.speculated >= 1 and runner.ran_dense
    for engine in (spec, plain):
        engine.slots["0"].graphs.default_choice = "sparse"
    got = spec.edit(edits[0], t)  # speculates dense, then runs sparse
    torch.testing.assert_close(got, plain.edit(edits[0], t), rtol=1e-5, atol=1e-5)
    assert not runner.ran_dense
    spec.commit()
    plain.commit()
    _same_state(spec, plain)


def test_a_too_small_speculation_followed_by_a_dense_edit_is_undone_later():
    """After a commit (no dirty rows), a larger edit misses its speculation; where the cost
    model runs that size dense, the speculative tiles stay in the working maps until the next
    edit, which must undo them (the runner counts them as dirtied)."""
    _, x, t, (spec, plain) = _pair()
    small = [apply_edit(x, _mask(0.05, s), seed=s) for s in (1, 2, 4, 5)]
    big = [apply_edit(x, _mask(0.3, s), seed=s) for s in (3, 6)]
    runner = None
    for engine in (spec, plain):  # graphs for both sizes, each after the other
        for e in (small[0], small[1], "commit", big[0], small[2], "commit"):
            _ = engine.commit() if isinstance(e, str) else engine.edit(e, t)
        runner = runner or engine.slots["0"].graphs
    small_caps = tuple(runner.last_caps[k] for k in runner.keys)

    class SparseOnlySmall(dict):  # the cost model's verdicts: dense for every other size
        def get(self, key, default=None):
            return "sparse" if key[0] == small_caps else "dense"

    for engine in (spec, plain):
        engine.slots["0"].graphs.choice = SparseOnlySmall()
    missed = runner.missed
    torch.testing.assert_close(spec.edit(big[1], t), plain.edit(big[1], t), rtol=1e-5, atol=1e-5)
    assert runner.missed == missed + 1 and runner.ran_dense
    for engine in (spec, plain):
        engine.slots["0"].graphs.choice = {}  # sparse again
    torch.testing.assert_close(spec.edit(small[3], t), plain.edit(small[3], t), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    _same_state(spec, plain)
    spec.commit()
    plain.commit()
    _same_state(spec, plain)
