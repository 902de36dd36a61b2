"""Tests for sigec/kernels/restore.py: only the listed tiles come back, bit-exact."""

import pytest
import torch

from sigec.kernels import restore, restore_reference, restore_triton
from sigec.kernels.restore import RestoreBatch
from tests.kernels.cases import TILE_CASES, corners_tensor, vector_restore_items


def mask_oracle(work, cache, corners, th, tw):
    """Restore the obvious way: a boolean map of the covered pixels, then torch.where."""
    h, w = work.shape[2:]
    covered = torch.zeros(h, w, dtype=torch.bool)
    for y, x in corners:
        covered[max(y, 0) : max(y + th, 0), max(x, 0) : max(x + tw, 0)] = True
    return torch.where(covered, cache, work)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", [restore_reference, restore_triton], ids=["ref", "triton"])
@pytest.mark.parametrize("n, c, h, w, th, tw, corners", TILE_CASES)
def test_matches_oracle_bit_exact(n, c, h, w, th, tw, corners, impl, dtype):
    work = torch.randn(n, c, h, w).to(dtype)
    cache = torch.randn(n, c, h, w).to(dtype)
    want = mask_oracle(work, cache, corners, th, tw)
    impl(work, cache, corners_tensor(corners), th, tw)
    torch.testing.assert_close(work, want, atol=0, rtol=0)


def test_channels_last_work_contiguous_cache():
    work = torch.randn(2, 5, 7, 9).to(memory_format=torch.channels_last)
    cache = torch.randn(2, 5, 7, 9)
    corners = [(-1, -1), (3, 6)]
    want = mask_oracle(work.contiguous(), cache, corners, 4, 4)
    restore_triton(work, cache, corners_tensor(corners), 4, 4)
    assert work.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(work, want, atol=0, rtol=0)


@pytest.mark.parametrize("impl", [restore_reference, restore_triton], ids=["ref", "triton"])
def test_capacity_padding_rows_copy_nothing(impl):
    work, cache = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    want = mask_oracle(work, cache, [(4, 4)], 4, 4)
    impl(work, cache, corners_tensor([(4, 4), (0, 0)]), 4, 4, torch.tensor([1], dtype=torch.int32))
    torch.testing.assert_close(work, want, atol=0, rtol=0)


def test_public_op_and_opcheck():
    work, cache = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    want = mask_oracle(work, cache, [(2, 2)], 4, 4)
    torch.ops.sigec.restore(work, cache, corners_tensor([(2, 2)]), 4, 4)
    torch.testing.assert_close(work, want, atol=0, rtol=0)
    torch.library.opcheck(restore, (work, cache, corners_tensor([(2, 2)]), 4, 4))


BAD_CALLS = [
    ("cache shape", {"cache": torch.randn(1, 2, 8, 7)}, ValueError, "cache: expected the shape"),
    ("cache dtype", {"cache": torch.randn(1, 2, 8, 8).half()}, TypeError, "cache: expected dtype"),
    ("work rank", {"work": torch.randn(2, 8, 8)}, ValueError, "work: expected a 4-D"),
    ("corners rank", {"corners": torch.zeros(2, dtype=torch.int32)}, ValueError, "corners"),
    ("corners range", {"corners": corners_tensor([(0, -8)])}, ValueError, "row 0"),
]


@pytest.mark.parametrize("why, override, exc, words", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
@pytest.mark.parametrize("fn", [torch.ops.sigec.restore, restore_triton], ids=["op", "triton"])
def test_bad_input_is_a_typed_error(fn, why, override, exc, words):
    call = {"work": torch.randn(1, 2, 8, 8), "cache": torch.randn(1, 2, 8, 8),
            "corners": corners_tensor([(0, 0)]), "tile_h": 4, "tile_w": 4}  # fmt: skip
    call.update(override)
    with pytest.raises(exc) as info:
        fn(**call)
    assert words in str(info.value)


def _batch_items(dtype_of=lambda i: torch.float32):
    """Maps of different shapes, formats, tile sizes, counts and row counts (one with none)."""
    items, wants = [], []
    cases = [p.values for p in TILE_CASES] + [(1, 3, 6, 6, 3, 3, [])]
    for i, (n, c, h, w, th, tw, corners) in enumerate(cases):
        dtype = dtype_of(i)
        work, cache = torch.randn(n, c, h, w).to(dtype), torch.randn(n, c, h, w).to(dtype)
        if i % 2:
            work = work.contiguous(memory_format=torch.channels_last)
        count = torch.tensor([max(len(corners) - 1, 0)], dtype=torch.int32) if i % 3 == 1 else None
        want = work.clone()
        co = corners_tensor(corners) if corners else torch.zeros(0, 2, dtype=torch.int32)
        restore_reference(want, cache, co, th, tw, count)
        items.append((work, cache, co, count, th, tw))
        wants.append(want)
    return items, wants


@pytest.mark.parametrize("use_triton", [False, True], ids=["ref", "triton"])
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32+fp16"])
def test_batch_restores_every_map_like_one_restore_each(use_triton, mixed):
    items, wants = _batch_items((lambda i: torch.float16 if i % 2 else torch.float32)
                                if mixed else (lambda i: torch.float32))  # fmt: skip
    batch = RestoreBatch(items, use_triton=use_triton)
    if use_triton:
        assert len(batch.launches) == (2 if mixed else 1)  # one launch per dtype
    batch()
    for (work, *_), want in zip(items, wants, strict=True):
        torch.testing.assert_close(work, want, atol=0, rtol=0)


def test_batch_reads_the_count_at_call_time():
    work, cache = torch.zeros(1, 2, 8, 8), torch.ones(1, 2, 8, 8)
    count = torch.tensor([0], dtype=torch.int32)
    batch = RestoreBatch([(work, cache, corners_tensor([(0, 0), (4, 4)]), count, 4, 4)],
                         use_triton=True)  # fmt: skip
    batch()
    assert work.sum() == 0
    count.fill_(1)  # what a CUDA-graph replay relies on: the table holds addresses, not values
    batch()
    assert work[0, :, :4, :4].eq(1).all() and work.sum() == 2 * 16


def test_batch_of_nothing_is_a_no_op():
    RestoreBatch([], use_triton=True)()
    RestoreBatch([])()


def test_batch_checks_each_item():
    work = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="cache: expected the shape of work"):
        RestoreBatch([(work, torch.randn(1, 2, 8, 7), corners_tensor([(0, 0)]), None, 4, 4)])
    with pytest.raises(TypeError, match="cache: expected dtype"):
        RestoreBatch([(work, work.half(), corners_tensor([(0, 0)]), None, 4, 4)])


def test_batch_copies_channels_last_maps_as_vectors():
    from sigec.kernels.restore import vector_width

    items, wants = vector_restore_items()
    widths = [vector_width(w, c) for w, c, *_ in items]
    assert widths[0] == 0  # NCHW
    assert all(v >= 8 for v in widths[1:]) and widths[-2] == 8  # C = 24: vectors of 8
    batch = RestoreBatch(items, use_triton=True)
    groups = {(w.dtype, v) for (w, *_), v in zip(items, widths, strict=True)}
    assert sorted(launch[-1] for launch in batch.launches) == sorted(v for _, v in groups)
    batch()
    for (work, *_), want in zip(items, wants, strict=True):
        torch.testing.assert_close(work, want, atol=0, rtol=0)


def test_vector_width_needs_contiguous_channels_and_aligned_strides():
    from sigec.kernels.restore import vector_width

    cl = torch.channels_last
    a = torch.zeros(1, 64, 4, 4, dtype=torch.float16).contiguous(memory_format=cl)
    assert vector_width(a, a.clone()) == 64 and vector_width(a, a.clone(), most=16) == 16
    assert vector_width(a, torch.zeros(1, 64, 4, 4, dtype=torch.float16)) == 0  # NCHW cache
    b = torch.zeros(1, 12, 4, 4, dtype=torch.float16).contiguous(memory_format=cl)
    assert vector_width(b, b.clone()) == 0  # 12 channels: no 16-byte vector divides them
    c = torch.zeros(1, 66, 4, 4, dtype=torch.float32).contiguous(memory_format=cl)[:, 2:]
    assert vector_width(c, c.clone().contiguous(memory_format=cl)) == 0  # strides of 66
    d = torch.zeros(1, 80, 4, 4, dtype=torch.float32).contiguous(memory_format=cl)
    assert vector_width(d, d.clone()) == 16  # 80 = 16 * 5


@pytest.mark.parametrize("use_triton", [False, True], ids=["ref", "triton"])
def test_batch_programs_loop_over_more_tiles_than_there_are_programs(use_triton):
    """Two programs per map walk a list of 7 tiles (5 real by the count): every real tile is
    copied, the padding rows are not, as one restore per item would."""
    corners = corners_tensor([(0, 0), (0, 4), (4, 0), (4, 4), (8, 2), (2, 8), (6, 6)])
    work, cache = torch.randn(2, 3, 12, 12), torch.randn(2, 3, 12, 12)
    count = torch.tensor([5], dtype=torch.int32)
    want = work.clone()
    restore_reference(want, cache, corners, 4, 4, count)
    RestoreBatch([(work, cache, corners, count, 4, 4)], use_triton=use_triton, programs=2)()
    torch.testing.assert_close(work, want, atol=0, rtol=0)


@pytest.mark.parametrize("use_triton", [False, True], ids=["ref", "triton"])
def test_load_tables_points_a_batch_at_other_caches(use_triton):
    """What a CUDA graph that captured the batch relies on: after ``load_tables`` the same
    launches copy from the other batch's caches (another slot), with no new batch built."""
    work = torch.zeros(1, 2, 8, 8).contiguous(memory_format=torch.channels_last)
    first, second = torch.ones_like(work), torch.full_like(work, 2.0)
    corners, count = corners_tensor([(0, 0)]), torch.tensor([1], dtype=torch.int32)
    batch = RestoreBatch([(work, first, corners, count, 4, 4)], use_triton=use_triton)
    other = RestoreBatch([(work, second, corners, count, 4, 4)], use_triton=use_triton)
    batch.load_tables(other)
    batch()
    assert work[0, :, :4, :4].eq(2).all() and work.sum() == 2 * 2 * 16
    wrong = RestoreBatch([(work, first, corners, count, 2, 2)], use_triton=use_triton)
    with pytest.raises(ValueError, match="another layout"):
        batch.load_tables(wrong)
