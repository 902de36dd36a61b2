"""A compact, stable summary of a compiled model's edit graph, for CI regression files.

``python -m tests.passes.summary --write tests/passes/summaries`` regenerates the checked-in
summaries of the tiny named configs after an intended change to the passes.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from sigec.config import SparseConfig
from sigec.models.configs import TINY_MODELS
from sigec.passes.pipeline import build_program
from sigec.runtime.dense import DenseRegion
from sigec.runtime.engine import SparseEngine
from sigec.runtime.masks import blob_mask

SUMMARY_MODELS = TINY_MODELS


def summarize(engine: SparseEngine, mask: torch.Tensor) -> dict:
    """Counts of runtime ops in the edit graph, dense fallbacks by (op, reason), pass counters,
    and active tiles per tile list for one edit with ``mask`` (the engine must hold a record)."""
    nodes = list(engine.edit_gm.graph.nodes)
    for mod in engine.edit_gm.modules():  # ops inside dense regions count too
        if isinstance(mod, DenseRegion):
            nodes += mod.ops()
    ops = collections.Counter(
        getattr(n.target, "__name__", str(n.target)) for n in nodes if n.op == "call_function"
    )
    fallbacks = collections.Counter(f"{op}: {why}" for _, op, why in engine.program.fallbacks)
    return {
        "edit_graph_ops": dict(sorted(ops.items())),
        "dense_fallbacks": dict(sorted(fallbacks.items())),
        "rewrites": dict(sorted(engine.program.counters.items())),
        "tiles": dict(sorted(engine.stats()["tiles"].items())),
    }


def summary_of(name: str) -> dict:
    """Compile a named config with its SIGE settings, record, edit with the fixed 5 % blob mask."""
    from sigec.models.configs import MODELS, build

    model, args, kwargs = build(name, seed=0)
    config = SparseConfig(**MODELS[name].sige_config)
    engine = SparseEngine(build_program(model, args, kwargs, config), config)
    engine.record(*args, **kwargs)
    h, w = args[0].shape[-2:]
    mask = blob_mask(h, w, 0.05, seed=0)
    engine.edit(*args, mask=mask, **kwargs)
    return summarize(engine, mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, required=True, help="folder for <name>.json")
    args = parser.parse_args(argv)
    args.write.mkdir(parents=True, exist_ok=True)
    for name in SUMMARY_MODELS:
        path = args.write / f"{name}.json"
        path.write_text(json.dumps(summary_of(name), indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
