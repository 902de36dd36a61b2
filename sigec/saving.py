"""Engine files: ``sigec.save(engine, path)`` and ``sigec.load(path)``.

One zip archive (``*.sigec``) holds:

- ``program.json``: the captured graph as torch.export serialises it, with a flat signature (flat
  inputs in, a tuple of flat outputs out), so no container type of the model's library is in it;
- ``weights.safetensors``: its parameters and buffers; ``constants.safetensors``: its tensor
  constants (safetensors: loading runs no pickle);
- ``manifest.json``: the file format and its version, the sigec and torch versions it was made
  with, the ``SparseConfig``, one entry per flat input (name, kind, shape, dtype, or the value of
  a constant), the call's structure (positional and keyword inputs) and the output's (a library's
  output class is recorded by name), and the SHA-256 of every other entry.

``load`` needs neither the model's Python class nor its library (diffusers): the graph is plain
ATen, and an output of a class that is not imported comes back as a ``ModelOutput`` (a dict with
attribute access, as diffusers' outputs are). It refuses, with a ``CheckpointError`` that says
what to do, a file that is not an engine file, truncated, corrupt (a checksum differs), of an
unknown format version, or made with another torch (programs are tied to the torch that exported
them). ``save`` never replaces an existing file unless asked, and writes through a temporary file,
so an interrupted save leaves the old file as it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path

import torch
import torch.utils._pytree as pytree

import sigec
from sigec.config import SparseConfig
from sigec.errors import CheckpointError, OutputExistsError
from sigec.passes.capture import Captured, export_flat, flat_module
from sigec.passes.pipeline import build_program_from
from sigec.runtime.engine import SparseEngine

FORMAT = "sigec-engine"
FORMAT_VERSION = 1
SUFFIX = ".sigec"


class ModelOutput(OrderedDict):
    """A model output whose class was not importable at load: its fields by name, as keys and
    as attributes (``out.sample`` and ``out["sample"]``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


pytree.register_pytree_node(
    ModelOutput,
    lambda o: (list(o.values()), list(o.keys())),
    lambda values, keys: ModelOutput(zip(keys, values, strict=True)),
    serialized_type_name="sigec.saving.ModelOutput",
)


# --- save -----------------------------------------------------------------------------------------


def save(engine: SparseEngine, path, overwrite: bool = False) -> Path:
    """Write ``engine``'s compiled model and config to one file (see the module docstring).

    Args:
        engine: from ``sigec.compile`` (or ``sigec.load``); caches are not saved (record again).
        path: the file to write (``.sigec`` is the usual suffix).
        overwrite: replace an existing file; without it an existing file is an error.

    Returns:
        The path written.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        CheckpointError: the model holds something the format cannot store.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} exists: pass overwrite=True (sigec convert --force) to replace it"
        )
    prog = engine.program
    flat = _example_inputs(prog.example_meta, prog.input_kinds, device=None)
    ep = export_flat(prog.record_gm, flat)
    from torch._export.serde.serialize import serialize

    art = serialize(ep, serialize_state_dict=False, serialize_constants=False,
                    serialize_example_inputs=False)  # fmt: skip
    constants = {}
    for name, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"constant {name} of the graph is a {type(value).__name__}: "
                                  "only tensor constants can be saved")  # fmt: skip
        constants[name] = value
    entries = {
        "program.json": art.exported_program,
        "weights.safetensors": _safetensors(ep.state_dict),
        "constants.safetensors": _safetensors(constants),
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sigec": sigec.__version__,
        "torch": torch.__version__,
        "config": _config_to_json(engine.config),
        "inputs": _inputs_to_json(prog),
        "in_spec": pytree.treespec_dumps(prog.in_spec),
        "parameters": list(ep.graph_signature.parameters),
        "out_spec": _describe(prog.out_spec),
        "meta": _json_meta(engine.meta),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in entries.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
            for name, data in entries.items():
                zf.writestr(name, data)
        os.replace(tmp, path)  # atomic: the old file stays until the new one is whole
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _json_meta(meta: dict) -> dict:
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise CheckpointError(f"engine.meta must hold JSON values only ({exc})") from None
    return dict(meta)


def _safetensors(tensors: dict) -> bytes:
    from safetensors.torch import save

    # one tensor a name, owning its storage (safetensors refuses shared or strided storage)
    return save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def _config_to_json(config: SparseConfig) -> dict:
    out = {}
    for f in fields(config):
        v = getattr(config, f.name)
        out[f.name] = dict(v) if f.name == "block_size" else list(v) if isinstance(v, tuple) else v
    return out


def _inputs_to_json(prog) -> list[dict]:
    out = []
    for name, kind, meta in zip(prog.input_names, prog.input_kinds, prog.example_meta,
                                strict=True):  # fmt: skip
        if kind == "const":
            try:
                json.dumps(meta)
            except TypeError:
                raise CheckpointError(
                    f"input {name}: the constant {meta!r} cannot be saved "
                    "(numbers, strings, None and lists of them can)"
                ) from None
            out.append({"name": name, "kind": kind, "value": meta})
        else:
            shape, dtype, device = meta
            out.append({"name": name, "kind": kind, "shape": list(shape),
                        "dtype": str(dtype).removeprefix("torch."),
                        "device": str(device)})  # fmt: skip
    return out


def _describe(spec: pytree.TreeSpec) -> dict:
    """A JSON description of an output's structure (classes by name)."""
    if spec.is_leaf():
        return {"type": "leaf"}
    kids = [_describe(c) for c in _children(spec)]
    t = spec.type
    if t in (tuple, list):
        return {"type": t.__name__, "children": kids}
    if t in (dict, OrderedDict) or isinstance(spec.context, list):
        keys = list(spec.context)
        if not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"output {t.__name__} has keys {keys!r}: only str keys save")
        return {"type": "dict" if t in (dict, OrderedDict) else "object",
                "class": f"{t.__module__}.{t.__qualname__}", "keys": keys,
                "children": kids}  # fmt: skip
    raise CheckpointError(f"output of type {t.__module__}.{t.__qualname__} cannot be saved")


def _children(spec: pytree.TreeSpec) -> list:
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


# --- load -----------------------------------------------------------------------------------------


def load(path, device=None) -> SparseEngine:
    """An engine from a file ``save`` wrote (see the module docstring); record it before editing.

    Args:
        path: the engine file.
        device: where the engine runs (default: where it was saved, if that device exists here,
            else the CPU).

    Raises:
        CheckpointError: the file is missing, not an engine file, truncated, corrupt, of another
            format version or made with another torch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (make one with sigec convert)")
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = _manifest(zf, path)
            data = {}
            for name, digest in manifest["files"].items():
                blob = zf.read(name)
                if hashlib.sha256(blob).hexdigest() != digest:
                    raise CheckpointError(
                        f"{path}: entry {name} is corrupt (its checksum differs from the "
                        "manifest's); convert the model again"
                    )
                data[name] = blob
    except (zipfile.BadZipFile, EOFError, KeyError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a whole sigec engine file ({type(exc).__name__}: {exc}): it may be "
            "truncated or of another kind; convert the model again (sigec convert)"
        ) from exc
    config = _config_from_json(manifest["config"])
    inputs = manifest["inputs"]
    target = _device(device, inputs)
    from safetensors.torch import load as load_tensors
    from torch._export.serde.serialize import (
        SerializedArtifact,
        deserialize,
        serialize_torch_artifact,
    )

    weights = load_tensors(data["weights.safetensors"])
    for name in manifest.get("parameters", []):  # parameters come back as parameters
        weights[name] = torch.nn.Parameter(weights[name], requires_grad=False)
    constants = load_tensors(data["constants.safetensors"])
    try:
        ep = deserialize(SerializedArtifact(data["program.json"], serialize_torch_artifact(weights),
                                            serialize_torch_artifact(constants), b""))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any deserialisation failure: a bad file
        raise CheckpointError(f"{path}: the saved program does not load ({type(exc).__name__}: "
                              f"{exc}); convert the model again") from exc  # fmt: skip
    in_spec = pytree.treespec_loads(manifest["in_spec"])
    out_spec = _rebuild(manifest["out_spec"])
    names = [i["name"] for i in inputs]
    base = flat_module(ep)  # on the CPU, as saved
    placed = {"device": target, "dtype": None}

    def rebuild(device=None, dtype=None):
        """The program on ``device`` / in ``dtype`` (exported graphs bake devices in: away from
        the CPU, or in another dtype, the graph is exported again there)."""
        placed.update({k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        dev, dt = torch.device(placed["device"]), placed["dtype"]
        flat = _example_inputs_json(inputs, dev, dt)
        gm = base
        if dev.type != "cpu" or dt is not None:
            gm = flat_module(export_flat(copy.deepcopy(base).to(device=dev, dtype=dt), flat))
        return build_program_from(Captured(gm, in_spec, out_spec, flat, names), config)

    engine = SparseEngine(rebuild(), config, rebuild)
    engine.meta = dict(manifest.get("meta", {}))
    return engine


def _manifest(zf: zipfile.ZipFile, path: Path) -> dict:
    if "manifest.json" not in zf.namelist():
        raise CheckpointError(f"{path} has no manifest: not a sigec engine file")
    manifest = json.loads(zf.read("manifest.json"))
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sigec engine file (format "
                              f"{manifest.get('format')!r})")  # fmt: skip
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has engine file format {manifest.get('format_version')}; this sigec "
            f"({sigec.__version__}) reads format {FORMAT_VERSION}: convert the model again"
        )
    saved, here = _minor(manifest.get("torch", "")), _minor(torch.__version__)
    if saved != here:
        raise CheckpointError(
            f"{path} was made with torch {manifest.get('torch')}; this is torch "
            f"{torch.__version__}: saved programs are tied to a torch version, so convert the "
            "model again with this torch"
        )
    return manifest


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _device(device, inputs: list[dict]) -> torch.device:
    if device is not None:
        return torch.device(device)
    saved = next((i["device"] for i in inputs if i["kind"] != "const"), "cpu")
    if saved.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(saved)


def _config_from_json(data: dict) -> SparseConfig:
    known = {f.name for f in fields(SparseConfig)}
    values = {k: v for k, v in data.items() if k in known}
    if values.get("spatial_inputs") is not None:
        values["spatial_inputs"] = tuple(values["spatial_inputs"])
    return SparseConfig(**values)


def _example_inputs(example_meta, kinds, device=None) -> list:
    """Zero tensors of the compiled example's shapes and dtypes (constants as they were)."""
    out = []
    for meta, kind in zip(example_meta, kinds, strict=True):
        if kind == "const":
            out.append(meta)
        else:
            shape, dtype, dev = meta
            out.append(torch.zeros(shape, dtype=dtype, device=device or dev))
    return out


def _example_inputs_json(inputs: list[dict], device, dtype=None) -> list:
    out = []
    for i in inputs:
        if i["kind"] == "const":
            out.append(i["value"])
            continue
        dt = getattr(torch, i["dtype"])
        if dtype is not None and dt.is_floating_point:
            dt = dtype
        out.append(torch.zeros(i["shape"], dtype=dt, device=device))
    return out


def _rebuild(desc: dict) -> pytree.TreeSpec:
    """The output's pytree spec from its description: its class if imported, else
    ``ModelOutput`` for library classes; built from a dummy value of that structure."""
    return pytree.tree_structure(_dummy(desc))


def _dummy(desc: dict):
    kind = desc["type"]
    if kind == "leaf":
        return 0
    kids = [_dummy(c) for c in desc["children"]]
    if kind in ("tuple", "list"):
        return tuple(kids) if kind == "tuple" else kids
    values = dict(zip(desc["keys"], kids, strict=True))
    if kind == "dict":
        return values if desc["class"] == "builtins.dict" else OrderedDict(values)
    module, _, name = desc["class"].rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if cls is not None and cls in pytree.SUPPORTED_NODES:
        try:
            return cls(**values)
        except TypeError:
            pass
    return ModelOutput(values)


def dumps_manifest(path) -> dict:
    """The manifest of an engine file (what ``sigec convert`` prints)."""
    with zipfile.ZipFile(path) as zf:
        return _manifest(zf, Path(path))
