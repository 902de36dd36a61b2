"""One compile per distinct graph: structurally identical graphs called with the same signature
share a compiled function, and each still computes its own result."""

from __future__ import annotations

import torch
import torch.fx

from sigec.runtime.compiled import CompiledOrEager, structure_key


class _Counting:
    """A torch.compile backend that counts compiles and runs the graph as traced."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        return gm.forward


def _scale_shift(x, w, b):
    return torch.relu(x * w) + b


def _scale_shift_2(x, w, b):
    return torch.relu(x * w) + b * 2.0


def _trace(fn) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(fn)


def _runner(gm, backend, **kw):
    return CompiledOrEager(gm, "a test graph", "dense_regions", backend=backend, **kw)


def test_identical_graphs_share_one_compile_and_keep_their_own_results():
    backend = _Counting()
    a, b = (
        _runner(_trace(_scale_shift), backend, dynamic=False),
        _runner(_trace(_scale_shift), backend, dynamic=False),
    )
    x = torch.randn(2, 3, 4, 4)
    wa, ba, wb, bb = (torch.randn(1, 3, 1, 1) for _ in range(4))
    got_a, got_b = a(x, wa, ba), b(x, wb, bb)
    assert backend.calls == 1 and a._shared is b._shared
    torch.testing.assert_close(got_a, _scale_shift(x, wa, ba), rtol=0, atol=0)
    torch.testing.assert_close(got_b, _scale_shift(x, wb, bb), rtol=0, atol=0)


def test_other_shapes_constants_or_tensor_constants_are_not_shared():
    backend = _Counting()
    x, w, b = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1)
    first = _runner(_trace(_scale_shift), backend, dynamic=False)
    first(x, w, b)
    other_shape = _runner(_trace(_scale_shift), backend, dynamic=False)
    other_shape(torch.randn(2, 3, 8, 8), w, b)
    other_constant = _runner(_trace(_scale_shift_2), backend, dynamic=False)
    torch.testing.assert_close(other_constant(x, w, b), _scale_shift_2(x, w, b))
    assert backend.calls == 3
    assert len({id(r._shared) for r in (first, other_shape, other_constant)}) == 3

    class WithConstant(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = torch.nn.Buffer(c)

        def forward(self, x):
            return x + self.c

    ga = torch.fx.symbolic_trace(WithConstant(torch.zeros(1)))
    gb = torch.fx.symbolic_trace(WithConstant(torch.ones(1)))
    assert structure_key(ga) is None  # reads a tensor of its own: never shared
    ra, rb = _runner(ga, backend, dynamic=False), _runner(gb, backend, dynamic=False)
    torch.testing.assert_close(ra(x), x)
    torch.testing.assert_close(rb(x), x + 1)
    assert ra._shared is not rb._shared


def test_structure_ignores_node_names():
    g1 = _trace(_scale_shift)
    graph = torch.fx.Graph()
    env = {}
    for n in g1.graph.nodes:  # the same ops under other names
        if n.op == "placeholder":
            env[n] = graph.placeholder(f"renamed_{n.name}")
        elif n.op == "output":
            graph.output(env[n.args[0]])
        else:
            env[n] = graph.create_node(n.op, n.target, torch.fx.node.map_arg(n.args, env.get),
                                       dict(n.kwargs), name=f"other_{n.name}")  # fmt: skip
    g2 = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert [n.name for n in g2.graph.nodes] != [n.name for n in g1.graph.nodes]
    assert structure_key(g2) is not None and structure_key(g2) == structure_key(g1)


def test_dynamic_compiles_share_across_tile_counts_but_not_parameter_sizes():
    """Tile expressions compile dynamic in the tile count: graphs on another number of tiles
    share, graphs whose non-tile operand has another size do not."""
    backend = _Counting()

    def expr(t, v):
        return t * v.sum()

    a = _runner(_trace(expr), backend)
    b = _runner(_trace(expr), backend)
    c = _runner(_trace(expr), backend)
    a(torch.randn(6, 3, 4, 4), torch.randn(5))
    b(torch.randn(10, 3, 4, 4), torch.randn(5))
    t = torch.randn(6, 3, 4, 4)
    v = torch.randn(7)
    torch.testing.assert_close(c(t, v), t * v.sum())
    assert a._shared is b._shared
    assert c._shared is not a._shared


def test_plain_functions_compile_on_their_own():
    backend = _Counting()
    a, b = _runner(_scale_shift, backend), _runner(_scale_shift, backend)
    x, w = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 1, 1)
    a(x, w, w)
    b(x, w, w)
    assert a._shared is not b._shared
