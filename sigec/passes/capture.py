"""Capture: an unmodified model -> a flat ATen-level FX graph (torch.export, strict=False)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

from sigec.errors import CaptureError
from sigec.runtime.inputs import flatten_call, spec_children


@dataclass
class Captured:
    """A captured model.

    Attributes:
        gm: GraphModule taking the flat inputs positionally and returning the flat outputs.
        in_spec: pytree spec of ``(args, kwargs)`` (kwargs in the order export fixed).
        out_spec: pytree spec of the model's output (diffusers' output dataclasses included).
        flat_inputs: the example inputs, flattened.
        input_names: one name per flat input: positional index ("0", "1", ...) or keyword path.
    """

    gm: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    flat_inputs: list
    input_names: list[str]


def _input_names(in_spec: pytree.TreeSpec, n: int) -> list[str]:
    """Positional leaves are named by index, keyword leaves by their key (suffixed if nested)."""
    names = []
    args_spec, kw_spec = spec_children(in_spec)
    for i, child in enumerate(spec_children(args_spec)):
        names += [str(i)] * child.num_leaves
    for key, child in zip(kw_spec.context, spec_children(kw_spec), strict=True):
        if child.num_leaves == 1:
            names.append(str(key))
        else:
            names += [f"{key}.{j}" for j in range(child.num_leaves)]
    # several leaves of one positional argument get a suffix too
    seen: dict[str, int] = {}
    out = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if names.count(name) == 1 else f"{name}.{k}")
    assert len(out) == n
    return out


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Export ``model`` on the example inputs and return a flat, guard-free GraphModule.

    Shapes are specialised to the example: the engine checks every later call against them.
    """
    kwargs = dict(kwargs or {})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # weights a forward pre-hook computes (spectral norm): exported as the graph's
            # arithmetic on the registered parameters, which is what the engine runs
            warnings.filterwarnings("ignore", message=".*were assigned during export")
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as exc:  # export failures come in many types; re-raise one with advice
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "sigec needs a model that torch.export.export(model, args, kwargs, strict=False) "
            "accepts; data-dependent Python control flow is the usual cause."
        ) from exc
    in_spec = ep.call_spec.in_spec
    flat = flatten_call(args, kwargs, in_spec)
    return Captured(flat_module(ep), in_spec, ep.call_spec.out_spec, flat,
                    _input_names(in_spec, len(flat)))  # fmt: skip


def flat_module(ep) -> torch.fx.GraphModule:
    """``ep.module()`` without export's shape guards and pytree codegen: flat inputs in, the
    tuple of flat outputs out."""
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):  # shape guards: the engine checks inputs itself
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
    for name, _ in list(gm.named_children()):
        if name.startswith("_guards"):
            delattr(gm, name)
    graph._codegen = torch.fx.graph.CodeGen()  # flat positional signature, flat outputs
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    graph.lint()
    gm.recompile()
    return gm


def export_flat(gm: torch.fx.GraphModule, flat_inputs: list):
    """The flat graph of a capture exported again (flat inputs, a tuple of flat outputs: no
    container types of the model's library in it): what ``sigec.save`` writes."""
    with torch.no_grad():
        return torch.export.export(gm, tuple(flat_inputs), strict=False)
