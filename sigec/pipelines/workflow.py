"""One edit end to end, what ``sigec edit`` and ``sigec demo`` run: open a model (an engine file,
a diffusers folder or a module), generate the original, edit it, and report the edit against the
dense run with pictures.

A *workflow* is one of three kinds, each with the same interface (``generate(x)``,
``edit(x, mask, observe=None)``, ``dense(x)``, ``commit()``, ``cache_bytes(where=None)``,
``picture(x)``, ``input_size()``, ``device()``):

- ``sdedit``: an SDEdit trajectory over a diffusion UNet (``SDEditor``): a pixel-space UNet with a
  timestep (DDPM), or a pipeline's UNet with its VAE (and prompt encoder);
- ``labels``: a label-map generator (GauGAN, ``LabelMapEditor``): the input is an index picture;
- ``call``: any other engine, one call on its image input (its other inputs as converted).

``run_edit(workflow, original, edited, mask)`` times ``generate`` (compile, record, warm-up), the
edit and, with ``check_dense``, the dense run on the edited input, sums MACs over every call of
the edit, and returns an ``EditReport``; ``EditReport.write(folder)`` writes its pictures (never
over existing files unless asked) and ``EditReport.lines()`` is the printed summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sigec.errors import CheckpointError, OutputExistsError, SigecError
from sigec.pipelines import images
from sigec.pipelines.diffusion import SDEditor, sample_of
from sigec.pipelines.labels import LabelMapEditor
from sigec.runtime.engine import SparseEngine

KINDS = ("sdedit", "labels", "call")


# --- the three kinds, one interface ---------------------------------------------------------------


class SDEditFlow:
    """SDEdit over an ``SDEditor`` with its trajectory's settings bound."""

    kind = "sdedit"

    def __init__(self, editor: SDEditor, *, seed: int = 0, prompt: str | None = None,
                 prompt_embeds=None, negative_prompt_embeds=None):  # fmt: skip
        self.editor = editor
        self.region = None  # an inpainting edit's region (the dense reference needs it)
        self.run_args = {"prompt": prompt, "prompt_embeds": prompt_embeds, "seed": seed,
                         "negative_prompt_embeds": negative_prompt_embeds}  # fmt: skip

    def describe(self) -> str:
        e = self.editor
        space = "latent (VAE)" if e.vae is not None else "pixel"
        what = "inpainting" if e.inpainting else "SDEdit"
        return f"{what}, {e.steps} steps at strength {e.strength}, {space} space"

    def generate(self, x):
        return self.editor.generate(x, **self.run_args)

    def edit(self, x, mask=None, observe=None):
        """An inpainting UNet: ``mask`` is the region to regenerate (the original was generated
        with none); otherwise the edited pixels."""
        if self.editor.inpainting:
            self.region = mask
            return self.editor.edit(x, observe=observe, inpaint=mask, **self.run_args)
        return self.editor.edit(x, mask=mask, observe=observe, **self.run_args)

    def dense(self, x):
        return self.editor.dense(x, inpaint=self.region)

    def commit(self):
        self.editor.commit()

    def cache_bytes(self, where: str | None = None) -> int:
        return self.editor.cache_bytes(where)

    def picture(self, x):
        return x

    def input_size(self) -> tuple[tuple[int, int] | None, int]:
        e = self.editor
        if "unet" in e.engines:
            shape = e.engines["unet"].program.image_meta[0]
            (h, w), c = shape[-2:], shape[1]
        else:
            side, c = e.unet.config.sample_size, e.unet.config.in_channels
            h, w = (side, side) if isinstance(side, int) else side
        if e.vae is not None:  # the pipeline takes pictures: the VAE's factor larger
            f = 2 ** (len(e.vae.config.block_out_channels) - 1)
            (h, w), c = (h * f, w * f), e.vae.config.in_channels
        return (h, w), c

    def device(self):
        return self.editor.device


class LabelFlow:
    """Label-map editing over a ``LabelMapEditor``: inputs are one-hot label maps."""

    kind = "labels"

    def __init__(self, editor: LabelMapEditor):
        self.editor = editor

    def describe(self) -> str:
        return "label-map edit"

    def generate(self, x):
        return self.editor.generate(x)

    def edit(self, x, mask=None, observe=None):
        out = self.editor.edit(x, mask)
        if observe is not None:
            observe("generator", self.editor.engine, 0)
        return out

    def dense(self, x):
        return self.editor.engine.dense(x)

    def commit(self):
        self.editor.commit()

    def cache_bytes(self, where: str | None = None) -> int:
        return self.editor.engine.cache_bytes(where)

    def picture(self, x):
        return images.label_colours(x)

    def input_size(self):
        return _size_of(self.editor.engine or self.editor.model)

    def device(self):
        return _device_of(self.editor.engine or self.editor.model)


class CallFlow:
    """One call of an engine (or a module, compiled on ``generate``): the image is its first
    input, the other inputs stay as given."""

    kind = "call"

    def __init__(self, model, others: tuple = (), kwargs: dict | None = None, config=None):
        self.engine = model if isinstance(model, SparseEngine) else None
        self.model, self.others, self.kwargs, self.config = model, others, kwargs or {}, config

    def describe(self) -> str:
        return "one call"

    def generate(self, x):
        if self.engine is None:
            import sigec

            self.engine = sigec.compile(self.model, (x, *self.others), self.kwargs,
                                        config=self.config)  # fmt: skip
        return sample_of(self.engine.record(x, *self.others, **self.kwargs))

    def edit(self, x, mask=None, observe=None):
        out = sample_of(self.engine.edit(x, *self.others, mask=mask, **self.kwargs))
        if observe is not None:
            observe("call", self.engine, 0)
        return out

    def dense(self, x):
        return sample_of(self.engine.dense(x, *self.others, **self.kwargs))

    def commit(self):
        self.engine.commit()

    def cache_bytes(self, where: str | None = None) -> int:
        return self.engine.cache_bytes(where)

    def picture(self, x):
        return images.label_colours(x) if images.is_label_map(x) else x

    def input_size(self):
        return _size_of(self.engine or self.model)

    def device(self):
        return _device_of(self.engine or self.model)


def _size_of(model) -> tuple[tuple[int, int] | None, int | None]:
    """(H, W) and channels of an engine's image input; (None, None) for a module (any size)."""
    if not isinstance(model, SparseEngine):
        return None, None
    shape = model.program.image_meta[0]
    return tuple(shape[-2:]), shape[1]


def _device_of(model) -> torch.device:
    if isinstance(model, SparseEngine):
        return torch.device(model.program.image_meta[2])
    return next(model.parameters()).device


# --- opening a model ------------------------------------------------------------------------------


def open_workflow(target, *, kind: str | None = None, steps: int = 20, strength: float = 0.5,
                  seed: int = 0, prompt: str | None = None, device=None, progress: bool = False,
                  cache_device: str = "device"):  # fmt: skip
    """The workflow of ``target``: an engine file (``sigec convert``), a diffusers model or
    pipeline folder, or a ``SparseEngine``. ``kind`` overrides what the model says it is;
    ``cache_device``: where an SDEdit trajectory keeps its caches (``SDEditor``'s)."""
    trajectory = {"steps": steps, "strength": strength, "progress": progress,
                  "cache_device": cache_device}  # fmt: skip
    if isinstance(target, SparseEngine):
        engine = target
    else:
        path = Path(target)
        if not path.exists():
            raise CheckpointError(f"{path}: no such engine file or diffusers folder")
        if path.is_dir():
            return _open_folder(path, kind, trajectory, seed, prompt, device)
        import sigec

        engine = sigec.load(path, device=device)
    kind = kind or engine_kind(engine)
    if kind == "sdedit":
        return SDEditFlow(SDEditor(engine, **trajectory), seed=seed)
    if kind == "labels":
        return LabelFlow(LabelMapEditor(engine))
    if kind == "call":
        return CallFlow(engine, *_example_rest(engine))
    raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")


def engine_kind(engine: SparseEngine) -> str:
    """What an engine edits: a UNet (an image and a timestep) -> ``sdedit``; a one-hot map as its
    only input -> ``labels``; otherwise ``call``. A converted file says it in its manifest."""
    said = getattr(engine, "meta", {}).get("workflow")
    if said in KINDS:
        return said
    prog = engine.program
    kinds = prog.input_kinds
    if len(kinds) >= 2 and kinds[:2] == ["spatial", "tensor"]:
        shape, dtype, _ = prog.example_meta[1]
        if len(shape) <= 1 and not dtype.is_floating_point and "encoder_hidden_states" not in (
                prog.input_names):  # fmt: skip
            return "sdedit"
    return "call"


def _example_rest(engine: SparseEngine) -> tuple[tuple, dict]:
    """The non-image inputs of an engine's example call (zeros of the converted shapes)."""
    prog = engine.program
    args, kwargs = [], {}
    for name, kind, meta in list(zip(prog.input_names, prog.input_kinds, prog.example_meta,
                                     strict=True))[1:]:  # fmt: skip
        value = meta if kind == "const" else torch.zeros(meta[0], dtype=meta[1], device=meta[2])
        if name.isdigit():
            args.append(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _open_folder(path: Path, kind, trajectory: dict, seed, prompt, device):
    import diffusers

    if (path / "model_index.json").exists():  # a pipeline folder
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a missing library or a bad folder
            raise CheckpointError(f"{path} does not load as a diffusers pipeline "
                                  f"({type(exc).__name__}: {str(exc)[:200]})") from exc  # fmt: skip
        if device is not None:
            pipe = pipe.to(device)
        if not hasattr(pipe, "unet"):
            raise CheckpointError(f"{path}: a {type(pipe).__name__} has no UNet to edit with")
        editor = SDEditor.from_pipe(pipe, **trajectory)
        if getattr(pipe, "text_encoder", None) is not None and prompt is None:
            prompt = ""  # an unconditioned edit; --prompt conditions it
        return SDEditFlow(editor, seed=seed, prompt=prompt)
    from sigec.converting import load_model

    model, args, kwargs, _, _ = load_model(path)
    if device is not None:
        model = model.to(device)
    if kind in (None, "sdedit") and type(model).__name__ == "UNet2DModel":
        return SDEditFlow(SDEditor(model, **trajectory), seed=seed)
    raise CheckpointError(
        f"{path}: a {type(model).__name__} folder edits in a pipeline (its VAE and prompt "
        "encoder): pass the pipeline's folder"
    )


# --- one edit, measured ---------------------------------------------------------------------------


@dataclass
class EditReport:
    """What one edit did: pictures (name -> ``[1, 3, H, W]`` in [-1, 1]), times (s), MACs."""

    kind: str
    describe: str
    pictures: dict[str, torch.Tensor] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    dense_macs: int = 0
    sparse_macs: int = 0
    ran_dense: int = 0  # calls the cost model sent to the dense model
    calls: int = 0
    cache_bytes: int = 0
    host_cache_bytes: int = 0
    mask_fraction: float = 0.0
    psnr: float | None = None
    max_error: float | None = None
    outside_error: float | None = None
    tiles_of: str = ""

    def lines(self) -> list[str]:
        t = self.times
        out = [f"{self.describe}: edit of {self.mask_fraction:.2%} of the image"]
        out.append(f"generate (compile, record, warm-up): {t['generate_s']:.2f} s")
        line = f"edit: {t['edit_s']:.3f} s"
        if "dense_s" in t:
            dense, edit = t["dense_s"], t["edit_s"]
            line += f"; dense on the edited input: {dense:.3f} s (speed-up {dense / edit:.2f}x)"
        out.append(line)
        ratio = self.dense_macs / self.sparse_macs if self.sparse_macs else None
        saved = f"({ratio:.2f}x fewer)" if ratio else "(nothing recomputed)"
        if self.ran_dense:
            saved += f"; {self.ran_dense} of {self.calls} calls ran the dense model (cheaper)"
        out.append(f"MACs over {self.calls} calls: dense {self.dense_macs / 1e9:.3f} G, edit "
                   f"{self.sparse_macs / 1e9:.3f} G {saved}")  # fmt: skip
        if self.psnr is not None:
            out.append(f"fidelity vs dense on the edited input: PSNR {self.psnr:.1f} dB, max "
                       f"error {self.max_error:.2e}, outside the mask "
                       f"{self.outside_error:.2e}")  # fmt: skip
        where = f", {self.host_cache_bytes / 2**20:.1f} MiB of them in host memory" if (
            self.host_cache_bytes) else ""  # fmt: skip
        out.append(f"cache: {self.cache_bytes / 2**20:.1f} MiB (every call's caches and the "
                   f"working sets{where})")  # fmt: skip
        return out

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "pictures"}

    def write(self, folder, overwrite: bool = False) -> list[Path]:
        """The pictures as PNGs (small ones enlarged, nearest) and ``summary.json`` in
        ``folder``; an existing file of these names is an error unless ``overwrite``."""
        folder = Path(folder)
        names = [f"{k}.png" for k in self.pictures] + ["summary.json"]
        taken = [n for n in names if (folder / n).exists()]
        if taken and not overwrite:
            raise OutputExistsError(f"{folder} already has {', '.join(taken[:4])}: pick another "
                                    "folder, or pass --force to replace them")  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        width = max(p.shape[-1] for p in self.pictures.values())
        width *= max(1, 256 // width)  # every picture as wide as the largest, at least 256
        written = []
        for name, pic in self.pictures.items():
            scale = max(1, width // pic.shape[-1])
            if scale > 1:  # nearest: a tile stays a block of pixels
                pic = torch.nn.functional.interpolate(pic.float(), scale_factor=scale)
            written.append(images.write_image(pic, folder / f"{name}.png"))
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=1))
        return [*written, folder / "summary.json"]


def run_edit(flow, original: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None = None,
             *, check_dense: bool = False) -> EditReport:  # fmt: skip
    """Generate from ``original``, edit to ``edited`` (``mask``: bool ``[H, W]``, default the
    difference), and measure it (see the module docstring)."""
    if tuple(original.shape) != tuple(edited.shape):
        raise SigecError(f"the edited input is {tuple(edited.shape)}, the original "
                         f"{tuple(original.shape)}: they must be the same size")  # fmt: skip
    rep = EditReport(flow.kind, flow.describe())
    t0 = time.perf_counter()
    first = flow.generate(original)
    rep.times["generate_s"] = _sync(t0)
    t0 = time.perf_counter()
    result = flow.edit(edited, mask)
    rep.times["edit_s"] = _sync(t0)
    shown = mask if mask is not None else (original != edited).any(1)[0]
    rep.mask_fraction = float(shown.float().mean())
    rep.pictures = {"original": flow.picture(original), "edited": flow.picture(edited),
                    "mask": shown.float()[None, None] * 2 - 1, "generated": first,
                    "result": result}  # fmt: skip
    best: list = []  # (sparse MACs, name, tile pictures) of the call that computed most

    def observe(name, engine, slot):
        s = engine.stats(slot=slot)
        rep.calls += 1
        rep.dense_macs += s["dense_macs"]
        rep.sparse_macs += s["sparse_macs"] or 0
        rep.ran_dense += bool(s["ran_dense"])
        edit_mask, tiles = engine.edit_tiles(slot)
        if tiles and (not best or s["sparse_macs"] > best[0]):
            best[:] = [s["sparse_macs"], name, images.tile_pictures(edit_mask, tiles)]

    # the same edit again, observed call by call (MACs, tiles): outside the timed run, since
    # reading a call's stats waits for the device
    flow.edit(edited, mask, observe=observe)
    if best:
        rep.tiles_of = best[1]
        rep.pictures.update({f"tiles_{res}": pic for res, pic in best[2].items()})
    rep.cache_bytes, rep.host_cache_bytes = flow.cache_bytes(), flow.cache_bytes("host")
    if check_dense:
        t0 = time.perf_counter()
        dense = flow.dense(edited)
        rep.times["dense_s"] = _sync(t0)
        rep.pictures["dense"] = dense
        rep.pictures["error"] = images.error_map(result, dense)
        _fidelity(rep, result, dense, shown)
    return rep


def _fidelity(rep: EditReport, got, want, mask) -> None:
    err = (got.float() - want.float()).abs()
    rng = float(want.max() - want.min()) or 1.0
    mse = float(err.double().pow(2).mean())
    rep.psnr = float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(rng**2 / mse)))
    rep.max_error = float(err.max())
    m = torch.nn.functional.interpolate(mask[None, None].float().cpu(), size=got.shape[-2:])
    outside = (m[0, 0] == 0).to(err.device)
    rep.outside_error = float(err[..., outside].max()) if outside.any() else 0.0


def _sync(t0: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0
