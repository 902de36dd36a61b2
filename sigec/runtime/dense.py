"""Dense regions of an edit graph: runs of ordinary ATen ops (the parts of the model that run
dense in every edit: low resolutions below ``sparse_min_resolution``, global ops, fallbacks).

In eager PyTorch each such op is a kernel of its own (GroupNorm alone is three), and mixed memory
formats add layout conversions. The pass ``group_dense_regions`` moves every run into a
``DenseRegion``; on CUDA (``SparseConfig.dense_regions == "inductor"``) the region runs compiled by
inductor, which fuses its pointwise ops and norms like it does for the dense baseline, and inside
the edit's CUDA graph like everything else. Shapes never change between edits, so each region
compiles once (on the first edit; the CUDA-graph path's warm-up runs it before capture), and
regions of one structure on one signature share that compile (``sigec.runtime.compiled``).
"""

from __future__ import annotations

import torch
import torch.fx

from sigec.runtime.compiled import CompiledOrEager


class DenseRegion(torch.nn.Module):
    """``forward(*inputs) -> tuple`` of a run of dense ops (``gm``), compiled on CUDA if asked."""

    def __init__(self, gm: torch.fx.GraphModule, compile_on_cuda: bool):
        super().__init__()
        self.gm = gm
        self.compile_on_cuda = compile_on_cuda
        what = f"a dense region of {len(self.ops())} ops"
        self._runner = CompiledOrEager(gm, what, "dense_regions", dynamic=False)

    def forward(self, *inputs):
        if not (self.compile_on_cuda and self.on_cuda(inputs)):
            return self.gm(*inputs)
        return self._runner(*inputs)

    @staticmethod
    def on_cuda(inputs) -> bool:
        return any(isinstance(a, torch.Tensor) and a.is_cuda for a in inputs)

    def ops(self) -> list[torch.fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]
