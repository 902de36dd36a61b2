"""Dense regions of an edit graph: runs of ordinary ATen ops (the parts of the model that run
dense in every edit: low resolutions below ``sparse_min_resolution``, global ops, fallbacks).

In eager PyTorch each such op is a kernel of its own (GroupNorm alone is three), and mixed memory
formats add layout conversions. The pass ``group_dense_regions`` moves every run into a
``DenseRegion``; on CUDA (``SparseConfig.dense_regions == "inductor"``) the region runs compiled by
inductor, which fuses its pointwise ops and norms like it does for the dense baseline, and inside
the edit's CUDA graph like everything else. Shapes never change between edits, so each region
compiles once (on the first edit; the CUDA-graph path's warm-up runs it before capture).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx


class CompiledOrEager:
    """``fn`` compiled by inductor on first call; if inductor fails on it, ``fn`` runs eagerly
    from then on, with a warning naming ``what`` and the ``SparseConfig`` knob that turns it off.
    """

    def __init__(self, fn, what: str, knob: str, **compile_kwargs):
        self.fn, self.what, self.knob, self.compile_kwargs = fn, what, knob, compile_kwargs
        self.compiled = None  # None: not yet; False: inductor failed

    def __call__(self, *args, **kwargs):
        if self.compiled is False:
            return self.fn(*args, **kwargs)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True, **self.compile_kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - inductor could not take it: run eagerly, say so
            warnings.warn(
                f"sigec: {self.what} runs eagerly, because torch.compile failed on it "
                f"({type(e).__name__}: {str(e)[:200]}); set SparseConfig({self.knob}='eager') "
                "to silence this",
                stacklevel=2,
            )
            self.compiled = False
            return self.fn(*args, **kwargs)


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
