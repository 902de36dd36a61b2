"""Slot caches kept on the host (``engine.place``) and prefetched for the next slot
(``edit(..., next_slot=...)``): edits and commits equal an engine whose slots all stay on the
device, bit for bit; a prefetched copy of values a record or commit replaced is never used; the
bytes are accounted where they live. On the CPU the host slots take the same code path (staging
copy, version tags) with plain copies; the GPU tests run it with pinned memory and streams."""

import dataclasses

import pytest
import torch

import sigec
from tests.masks_for_tests import apply_edit, edit_masks
from tests.nets import GroupNormNet

BLOCKS = {"3x3": 4, "1x1": 4, "pointwise": 4}
STATIC = sigec.SparseConfig(block_size=BLOCKS, cuda_graphs=True)


def _engines(graphs: bool, slots: int = 4):
    """Two engines over the same model and records of ``slots`` timesteps; in the first, slots
    1.. live on the host."""
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    x = torch.randn(1, 3, 32, 32)
    ts = [torch.full((1, 4), 0.2 * i) for i in range(slots)]
    config = dataclasses.replace(STATIC, cuda_graphs=graphs)
    engines = []
    for _ in range(2):
        e = sigec.compile(model, (x, ts[0]), config=config)
        for i, t in enumerate(ts):
            e.record(x, t, slot=i)
        engines.append(e)
    host, device = engines
    for i in range(1, slots):
        host.place(i, "host")
    return host, device, x, ts


@pytest.mark.parametrize("graphs", [True, False], ids=["static", "eager"])
def test_host_slots_edit_and_commit_like_device_slots(graphs):
    """A trajectory-like order (0, 1, 2, 3, 0, ...) with the next slot prefetched, commits on
    every other pass, and a repeated edit of one slot (its undo reads the host cache)."""
    host, device, x, ts = _engines(graphs)
    assert host.placement() == {"0": "device", "1": "host", "2": "host", "3": "host"}
    masks = list(edit_masks(32, 32).values())
    current = [x] * 4
    order = [0, 1, 2, 3, 0, 1, 2, 3, 2, 2, 3, 0]
    for step, i in enumerate(order):
        xe = apply_edit(current[i], masks[step % len(masks)], seed=step)
        nxt = order[step + 1] if step + 1 < len(order) else None
        got = host.edit(xe, ts[i], slot=i, next_slot=nxt)
        want = device.edit(xe, ts[i], slot=i)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if step % 3 == 1:
            host.commit(slot=i)
            device.commit(slot=i)
            current[i] = xe
    cache = host.stats()["cache"]
    assert cache["prefetch_hits"] >= 6  # every switch to a host slot but the first was staged
    # a prefetch asked for by hand: the next switch to that slot is served by it
    assert host.prefetch(1) and not host.prefetch(0)  # slot 0 lives on the device
    hits = cache["prefetch_hits"]
    xe = apply_edit(current[1], masks[0], seed=99)
    torch.testing.assert_close(host.edit(xe, ts[1], slot=1), device.edit(xe, ts[1], slot=1),
                               rtol=0, atol=0)  # fmt: skip
    assert host.stats()["cache"]["prefetch_hits"] == hits + 1
    assert cache["host_bytes"] == sum(host.slots[str(i)].host_bytes() for i in (1, 2, 3)) > 0


def test_a_prefetched_copy_of_replaced_values_is_not_used():
    """Slot 1 prefetched, then recorded again (a new image) or committed: its next edit must
    see the new values (a miss, copied from the host), not the staged old ones."""
    host, device, x, ts = _engines(graphs=True)
    mask = edit_masks(32, 32)["blob"]
    x2 = torch.randn_like(x)
    host.edit(apply_edit(x, mask, seed=1), ts[0], slot=0, next_slot=1)  # stages slot 1
    for e in (host, device):
        e.record(x2, ts[1], slot=1)
    assert host.placement()["1"] == "host"  # recorded in place
    misses = host.stats()["cache"]["host_loads"]
    xe = apply_edit(x2, mask, seed=2)
    torch.testing.assert_close(host.edit(xe, ts[1], slot=1), device.edit(xe, ts[1], slot=1),
                               rtol=0, atol=0)  # fmt: skip
    assert host.stats(slot=1)["cache"]["host_loads"] == misses + 1
    for e in (host, device):
        e.commit(slot=1)
    host.edit(apply_edit(x, mask, seed=3), ts[2], slot=2, next_slot=1)  # stages committed 1
    hits = host.stats()["cache"]["prefetch_hits"]
    xe2 = apply_edit(xe, edit_masks(32, 32)["corner"], seed=4)
    torch.testing.assert_close(host.edit(xe2, ts[1], slot=1), device.edit(xe2, ts[1], slot=1),
                               rtol=0, atol=0)  # fmt: skip
    assert host.stats(slot=1)["cache"]["prefetch_hits"] == hits + 1


def test_placing_slots_moves_their_bytes_and_back():
    host, device, x, ts = _engines(graphs=True, slots=3)
    per_slot = host.slots["1"].nbytes()
    staging = host.live.staging.nbytes()
    assert staging == host.live.packed_bytes() == host.slots["1"].host_bytes() > 0
    assert host.cache_bytes("host") == 2 * host.slots["1"].host_bytes()
    assert host.cache_bytes("device") + host.cache_bytes("host") == host.cache_bytes()
    assert host.cache_bytes() == device.cache_bytes() + staging
    assert host.stats(slot=1)["cache"]["where"] == "host"
    for i in (1, 2):
        host.place(i, "device")
    assert host.cache_bytes("host") == 0 and host.slots["2"].nbytes() == per_slot
    mask = edit_masks(32, 32)["blobs"]
    xe = apply_edit(x, mask, seed=5)
    torch.testing.assert_close(host.edit(xe, ts[2], slot=2), device.edit(xe, ts[2], slot=2),
                               rtol=0, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match="expected one of \\('host', 'device'\\)"):
        host.place(1, "gpu")
    with pytest.raises(sigec.NotRecordedError):
        host.place(7, "host")
