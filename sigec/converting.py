"""``sigec convert``: a checkpoint on disk -> an engine file (``sigec.save``).

Sources:

- a local diffusers model folder (``config.json`` with ``_class_name``: ``UNet2DModel``,
  ``UNet2DConditionModel``) or pipeline folder (``model_index.json``; ``component`` picks the
  folder, default ``unet``), loaded with ``from_pretrained(..., local_files_only=True)``;
- a state dict (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``) plus a named config of
  ``sigec.models.configs`` (``--config``): the model is built from the config and the state dict
  loaded with ``strict=True``. A GauGAN generator checkpoint in the official layout
  (``latest_net_G.pth``) is one: ``--config gaugan-cityscapes``.

The example inputs (fixing shapes and dtypes) come from the config: batch, resolution and
dtype can be set. Everything that can go wrong with the source is a ``CheckpointError`` that
names the file and says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sigec.api import compile as sigec_compile
from sigec.config import SparseConfig
from sigec.errors import CheckpointError
from sigec.saving import save

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIGE_UNET = {"block_size": {"3x3": 6, "1x1": 4}, "mask_dilation": 1}


def convert(source, out, *, config: str | None = None, component: str = "unet", batch=None,
            size=None, dtype: str = "fp32", device: str = "cpu", overrides: dict | None = None,
            overwrite: bool = False) -> dict:  # fmt: skip
    """Build the model of ``source``, compile it and write the engine file ``out``.

    Returns:
        What was converted: ``{"out", "model", "inputs", "config", "dense_fallbacks"}``.
    """
    model, args, kwargs, defaults, what = load_model(source, config=config, component=component,
                                                     batch=batch, size=size)  # fmt: skip
    dt, dev = DTYPES[dtype], torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and (param.dtype, param.device) != (dt, dev):
        model = model.to(device=dev, dtype=dt)
    move = lambda v: v.to(device=dev, dtype=dt if v.is_floating_point() else v.dtype)  # noqa: E731
    args = tuple(move(a) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = torch.utils._pytree.tree_map(lambda v: move(v) if isinstance(v, torch.Tensor) else v,
                                          kwargs)  # fmt: skip
    sparse = SparseConfig(**{**defaults, **(overrides or {})})
    engine = sigec_compile(model, args, kwargs, config=sparse)
    engine.meta = {"model": what, "workflow": _workflow(model, args)}
    path = save(engine, out, overwrite=overwrite)
    shapes = [list(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs))
              if isinstance(a, torch.Tensor)]  # fmt: skip
    return {"out": str(path), "model": what, "inputs": shapes, "dtype": dtype,
            "config": {**defaults, **(overrides or {})},
            "dense_fallbacks": len(engine.program.fallbacks)}  # fmt: skip


def _workflow(model, args) -> str:
    """What ``sigec edit`` does with the engine: SDEdit for a pixel-space UNet, label edits for a
    generator of one-hot label maps, one call otherwise."""
    from sigec.pipelines.images import is_label_map

    if type(model).__name__ == "UNet2DModel":
        return "sdedit"
    return "labels" if len(args) == 1 and is_label_map(args[0]) else "call"


def load_model(source, *, config=None, component="unet", batch=None, size=None):
    """``(model, example args, example kwargs, SparseConfig defaults, description)``."""
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    if source.is_dir():
        return _diffusers_model(source, component, batch, size)
    if config is None:
        raise CheckpointError(
            f"{source} is a state dict: say which model it is with --config NAME (one of "
            f"{', '.join(_names())}; a GauGAN generator checkpoint: --config gaugan-cityscapes)"
        )
    return _named_model(source, config, batch, size)


def _names() -> list[str]:
    from sigec.models.configs import MODELS

    return sorted(MODELS)


def _named_model(path: Path, name: str, batch, size):
    from sigec.models.configs import MODELS, build

    if name not in MODELS:
        raise CheckpointError(f"--config {name!r}: unknown; known: {', '.join(_names())}")
    model, args, kwargs = build(name, seed=0)
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
        raise CheckpointError(
            f"{path} does not fit the {name} model ({str(exc).splitlines()[0]}...): pick the "
            "config it was trained with, or check the file"
        ) from exc
    if batch is not None or size is not None:
        args = _resized(args, batch, size)
    return model.eval(), args, kwargs, dict(MODELS[name].sige_config), f"{name} from {path.name}"


def _resized(args: tuple, batch, size) -> tuple:
    x = args[0]
    n = batch or x.shape[0]
    h, w = size or x.shape[-2:]
    return (torch.zeros(n, x.shape[1], h, w, dtype=x.dtype), *args[1:])


def read_state_dict(path: Path) -> dict:
    """A state dict from ``.safetensors`` or a torch pickle (loaded with ``weights_only``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable in many ways: all mean a bad file
        raise CheckpointError(
            f"{path} is not a readable state dict ({type(exc).__name__}: {str(exc)[:160]}): the "
            "file may be truncated or corrupt; download or save it again"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint that wraps it
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _diffusers_model(folder: Path, component: str, batch, size):
    if (folder / "model_index.json").exists():  # a pipeline: one of its components
        folder = folder / component
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json: not a diffusers model folder")
    cfg = json.loads(cfg_path.read_text())
    cls_name = cfg.get("_class_name")
    import diffusers

    cls = getattr(diffusers, cls_name or "", None)
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel") or cls is None:
        raise CheckpointError(
            f"{folder}: a {cls_name} folder; sigec convert takes UNet2DModel and "
            "UNet2DConditionModel folders (other models: sigec.compile in Python)"
        )
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a bad folder
        raise CheckpointError(f"{folder} does not load ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from exc  # fmt: skip
    c = model.config
    side = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    h, w = size or (side, side)
    t = torch.tensor([500])
    if cls_name == "UNet2DModel":
        n = batch or 1
        return (model, (torch.zeros(n, c.in_channels, h, w), t), {}, dict(SIGE_UNET),
                f"UNet2DModel from {folder}")  # fmt: skip
    n = batch or 2  # classifier-free guidance: unconditional and conditional in one batch
    kwargs = {"encoder_hidden_states": torch.zeros(n, 77, c.cross_attention_dim)}
    if c.addition_embed_type == "text_time":
        text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(n, text),
                                       "time_ids": torch.zeros(n, 6)}  # fmt: skip
    return (model, (torch.zeros(n, c.in_channels, h, w), t), kwargs, dict(SIGE_UNET),
            f"UNet2DConditionModel from {folder}")  # fmt: skip
