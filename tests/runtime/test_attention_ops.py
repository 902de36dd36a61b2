"""The runtime's attention and token-layout functions against plain PyTorch."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from sigec.runtime import ops
from sigec.runtime.masks import active_tiles
from sigec.runtime.state import LiveState, SlotCache


def _reference(q, k, v, heads):  # [B, N, C] tokens, the textbook way
    b, n, c = q.shape
    split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, n, -1)


def test_attention_rows_are_independent_of_the_other_queries():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 20, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 12)
    full = ops.attention_rows(q, k, v, heads=4, scale=None)
    torch.testing.assert_close(full, _reference(q, k, v, 4))
    rows = torch.tensor([3, 4, 11, 19])
    torch.testing.assert_close(ops.attention_rows(q[:, rows], k, v, 4, None), full[:, rows])


@pytest.mark.parametrize("layout", ["tokens", "flat", "nhwc", "map"])
def test_layouts_round_trip(layout):
    x = torch.randn(2, 5, 3, 4)
    t = ops.map_to_layout(x, layout)
    assert torch.equal(ops.layout_to_map(t, layout, (3, 4)), x)
    if layout == "tokens":
        assert torch.equal(t[1, 2 * 4 + 3], x[1, :, 2, 3])  # token n is pixel (n // W, n % W)


def test_channel_functions_are_the_token_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5)
    t = ops.map_to_layout(x, "tokens")
    w, b = torch.randn(6), torch.randn(6)
    got = ops.map_to_layout(ops.layer_norm_channels(x, w, b, 1e-5), "tokens")
    torch.testing.assert_close(got, F.layer_norm(t, (6,), w, b, 1e-5))
    lw, lb = torch.randn(4, 6), torch.randn(4)
    got = ops.map_to_layout(ops.linear_channels(x, lw, lb), "tokens")
    torch.testing.assert_close(got, F.linear(t, lw, lb))


def test_sparse_attention_computes_the_active_queries_and_keeps_the_rest():
    torch.manual_seed(0)
    b, c, h, w = 2, 8, 8, 12
    q, k, v = (torch.randn(b, c, h, w) for _ in range(3))
    dense = ops.attention_channels(q, k, v, heads=2, scale=None)
    recorded = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
    slot = SlotCache()
    slot.set_map("attn", recorded)
    state = LiveState(slot, {"attn": (tuple(recorded.shape), recorded.dtype)}, {}, True)
    state.load("0", slot)  # the working map := the recorded one
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[0, 2:5, 6:9] = True
    ts = active_tiles(mask, (1, 1), (1, 1), (0, 0), (4, 4))
    out = ops.sparse_attention(state, {"key": ts}, q, k, v, heads=2, scale=None, name="attn",
                               tile_key="key")  # fmt: skip
    cover = torch.zeros(h, w, dtype=torch.bool)
    for y, x in ts.out_corners.tolist():
        cover[y : y + 4, x : x + 4] = True
    assert cover[2:5, 6:9].all() and not cover.all()
    torch.testing.assert_close(out[:, :, cover], dense[:, :, cover])
    assert torch.equal(out[:, :, ~cover], recorded[:, :, ~cover])
    # cached cross-attention keys/values are token tensors [B, N, C]
    kt, vt = torch.randn(b, 5, c), torch.randn(b, 5, c)
    out = ops.sparse_attention(state, {"key": ts}, q, kt, vt, heads=2, scale=0.3, name="attn",
                               tile_key="key")  # fmt: skip
    want = ops.attention_channels(q, kt, vt, 2, 0.3)
    torch.testing.assert_close(out[:, :, cover], want[:, :, cover])


def test_a_tile_expression_inductor_cannot_compile_runs_eagerly(monkeypatch):
    from sigec.runtime import ops

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (x, x)))
    expr = torch.fx.GraphModule(torch.nn.Module(), graph)

    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no backend")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    t = torch.randn(4)
    with pytest.warns(UserWarning, match="tile expression runs eagerly.*no backend"):
        out = ops._compiled_expression(expr)(t)
    assert torch.equal(out, t * t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from then on, without a second warning
        assert torch.equal(ops._compiled_expression(expr)(t), t * t)
