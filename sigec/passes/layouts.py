"""Token regions: tensors that are maps in another layout, and the attention cores between them.

Transformer blocks (diffusers' ``Transformer2DModel``, the VAE's attention) turn a map
``[B, C, H, W]`` into tokens ``[B, H*W, C]`` (or ``[B, C, H*W]``), run token-wise ops (LayerNorm,
Linear, GELU, GEGLU's chunk) and attention, and turn the tokens back into a map. Token ``n`` is
pixel ``(n // W, n % W)``: the token tensor *is* the map, in another layout.

- ``view_layout`` finds the layout of a view chain's result by running the view op on an index
  tensor (every element names its map position): exact for any reshape/permute/transpose
  sequence, with no list of patterns to keep up to date.
- ``match_attention`` recognises the attention cores of ``scaled_dot_product_attention`` and of
  the older ``baddbmm -> softmax -> bmm`` processors, and checks their head split / merge chains
  by the same probing against the canonical ones (``sigec.runtime.ops.attention_rows``).

These are analyses: they read the graph and never change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from sigec.runtime.layouts import LAYOUTS, map_to_layout

aten = torch.ops.aten

# Ops that only move data (the analysis also accepts identities such as eval dropout).
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int, aten.select.int,
    aten.t.default,
}  # fmt: skip
SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int}


@dataclass(frozen=True)
class Layout:
    """How a tensor holds a map of ``channels`` channels at ``res`` for ``batch`` samples."""

    kind: str  # one of sigec.runtime.layouts.LAYOUTS
    batch: int
    channels: int
    res: tuple[int, int]

    def shape(self) -> tuple[int, ...]:
        b, c, (h, w) = self.batch, self.channels, self.res
        return {"map": (b, c, h, w), "tokens": (b, h * w, c), "flat": (b, c, h * w),
                "nhwc": (b, h, w, c)}[self.kind]  # fmt: skip

    def with_channels(self, c: int) -> Layout:
        return Layout(self.kind, self.batch, c, self.res)

    @property
    def channel_dim(self) -> int:
        return {"map": 1, "tokens": 2, "flat": 1, "nhwc": 3}[self.kind]


class Prober:
    """Index tensors ("probes") per map shape, cached for one analysis."""

    def __init__(self):
        self._maps: dict[tuple, torch.Tensor] = {}

    def probe(self, lay: Layout) -> torch.Tensor:
        key = (lay.batch, lay.channels, *lay.res)
        if key not in self._maps:
            self._maps[key] = torch.arange(math.prod(key), dtype=torch.int64).view(key)
        return map_to_layout(self._maps[key], lay.kind)

    def view_layout(self, node: torch.fx.Node, src: Layout, identity: bool) -> Layout | None:
        """The layout of ``node``'s result if it is a data-movement op on a tensor in ``src``."""
        x = self.probe(src)
        if identity:
            y = x
        else:
            args = (x, *node.args[1:])
            try:
                y = node.target(*args, **node.kwargs)
            except Exception:  # an op that does not accept the probe: not a pure view
                return None
        for kind in LAYOUTS:
            cand = Layout(kind, src.batch, src.channels, src.res)
            if tuple(y.shape) == cand.shape() and torch.equal(y, self.probe(cand)):
                return cand
        return None


@dataclass(frozen=True)
class AttentionMatch:
    """A recognised attention core: ``out = attention_rows(q, k, v, heads, scale)``.

    ``q``, ``k``, ``v`` are token tensors ``[B, N, C]`` (nodes); ``out`` is the node holding the
    merged-heads result ``[B, Nq, Cv]``; ``parts`` are the nodes in between (head splits, the
    attention ops, head merges), which the rewrite replaces as a whole.
    """

    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    heads: int
    scale: float | None
    out: torch.fx.Node
    parts: tuple[torch.fx.Node, ...]


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _walk_back(n, is_view) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Follow single-input view ops back to their source; returns (source, chain in run order)."""
    chain = []
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and is_view(n):
        chain.append(n)
        n = n.args[0]
    return n, chain[::-1]


def _run_chain(x: torch.Tensor, chain, is_identity) -> torch.Tensor | None:
    try:
        for n in chain:
            x = x if is_identity(n) else n.target(x, *n.args[1:], **n.kwargs)
    except Exception:
        return None
    return x


def _split_heads(p: torch.Tensor, heads: int, batched: bool) -> torch.Tensor:
    """Canonical head split of tokens ``[B, N, C]``: ``[B, h, N, d]`` or ``[B*h, N, d]``."""
    b, n, c = p.shape
    s = p.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)
    return s.reshape(b * heads, n, c // heads) if batched else s


def _merge_heads(p: torch.Tensor, batch: int, batched: bool) -> torch.Tensor:
    """Canonical head merge of ``[B, h, N, d]`` (or ``[B*h, N, d]``) to ``[B, N, h*d]``."""
    if batched:
        p = p.reshape(batch, p.shape[0] // batch, p.shape[1], p.shape[2])
    b, h, n, d = p.shape
    return p.permute(0, 2, 1, 3).reshape(b, n, h * d)


def match_attention(node: torch.fx.Node, is_view, is_identity, is_source) -> AttentionMatch | None:
    """An ``AttentionMatch`` if ``node`` (an sdpa, or the final ``bmm`` of the older form) is
    the core of a standard multi-head attention, else None.

    ``is_view(n)``: data-movement or identity op; ``is_identity(n)``: an identity;
    ``is_source(n, role)``: whether ``n`` may feed the core as queries ("q") or keys/values ("kv").
    """
    parts: list[torch.fx.Node] = [node]
    if node.target == aten.scaled_dot_product_attention.default:
        a = list(node.args) + [None] * 6
        mask, dropout, causal = a[3], a[4] or 0.0, a[5] or False
        kw = node.kwargs
        mask = kw.get("attn_mask", mask)
        if mask is not None or kw.get("dropout_p", dropout) or kw.get("is_causal", causal):
            return None
        if kw.get("enable_gqa", False):
            return None
        qa, ka, va = a[0], a[1], a[2]
        scale, batched, k_transposed = kw.get("scale"), False, False
    elif node.target == aten.bmm.default:
        probs, va = node.args
        n = probs
        while isinstance(n, torch.fx.Node) and n.op == "call_function" and is_identity(n):
            parts.append(n)
            n = n.args[0]
        if not (isinstance(n, torch.fx.Node) and n.target in SOFTMAX_OPS):
            return None
        if n.args[1] not in (-1, 2) or (len(n.args) > 2 and n.args[2]):
            return None
        parts.append(n)
        scores = n.args[0]
        if scores.target == aten.baddbmm.default:
            beta = scores.kwargs.get("beta", 1)
            if beta != 0:
                return None  # an attention mask (or bias) is added: not the plain form
            qa, ka = scores.args[1], scores.args[2]
            scale = float(scores.kwargs.get("alpha", 1.0))
        elif scores.target == aten.bmm.default:
            qa, ka = scores.args
            scale = 1.0
        else:
            return None
        parts.append(scores)
        batched, k_transposed = True, True
    else:
        return None

    srcs = []
    for arg, role in ((qa, "q"), (ka, "kv"), (va, "kv")):
        src, chain = _walk_back(arg, is_view)
        sv = _val(src)
        if not (isinstance(sv, torch.Tensor) and sv.dim() == 3 and is_source(src, role)):
            return None
        srcs.append((src, chain))
        parts.extend(chain)
    (q, qc), (k, kc), (v, vc) = srcs
    qv, av = _val(q), _val(qa)
    b = int(qv.shape[0])
    heads = int(av.shape[0]) // b if batched else int(av.shape[1])
    if heads < 1 or qv.shape[-1] % heads or _val(k).shape[-1] % heads or _val(v).shape[-1] % heads:
        return None
    for src, chain, transposed in ((q, qc, False), (k, kc, k_transposed), (v, vc, False)):
        sv = _val(src)
        p = torch.arange(sv.numel(), dtype=torch.int64).view(tuple(sv.shape))
        want = _split_heads(p, heads, batched)
        if transposed:
            want = want.transpose(-1, -2)
        got = _run_chain(p, chain, is_identity)
        if got is None or tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want):
            return None

    # forward from the core through single-user views to the merged [B, Nq, Cv] result
    out, chain = node, []
    while True:
        ov = _val(out)
        if isinstance(ov, torch.Tensor) and ov.dim() == 3 and out is not node:
            break
        users = list(out.users)
        if len(users) != 1 or users[0].op != "call_function" or not is_view(users[0]):
            return None
        out = users[0]
        chain.append(out)
    nv = _val(node)
    p = torch.arange(nv.numel(), dtype=torch.int64).view(tuple(nv.shape))
    got = _run_chain(p, chain, is_identity)
    want = _merge_heads(p, b, batched)
    if got is None or tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want):
        return None
    if tuple(_val(out).shape[:2]) != tuple(qv.shape[:2]):
        return None
    parts.extend(chain[:-1])
    return AttentionMatch(q, k, v, heads, scale, out, tuple(parts))  # scale None: 1/sqrt(d)
