"""The ``sigec`` command line: a thin argparse layer over the Python API.

Subcommands are added here as the API grows; no behaviour lives only in the CLI.
"""

from __future__ import annotations

import argparse
import sys

import sigec
from sigec.pipelines.images import is_label_map


def _fraction(text: str) -> float:
    """An argparse type: a share of the image in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share of the image from 0 to 1, got {value}")
    return value


def _override(text: str) -> tuple:
    """An argparse type: ``KEY=VALUE`` with VALUE a Python literal (or a plain string)."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _positive(text: str) -> int:
    """An argparse type: a positive int."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _trajectory_arguments(parser, steps: int) -> None:
    """What the SDEdit workflows of ``demo`` and ``edit`` share, and the overwrite switch."""
    parser.add_argument("--steps", type=_positive, default=steps,
                        help=f"SDEdit steps (default {steps})")  # fmt: skip
    parser.add_argument("--strength", type=_fraction, default=0.5,
                        help="SDEdit strength: the share of the trajectory (0.5)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace pictures in --out")


def build_parser() -> argparse.ArgumentParser:
    from sigec.models.configs import MODELS

    parser = argparse.ArgumentParser(
        prog="sigec",
        description="Spatially sparse incremental inference for image generative models.",
    )
    parser.add_argument("--version", action="version", version=f"sigec {sigec.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    models = "\n".join(f"  {n:24s} {m.description}" for n, m in sorted(MODELS.items()))
    demo = sub.add_parser(
        "demo",
        help="compile a named model, record, edit a blob, report MACs and fidelity",
        description="Compile a named model (random weights), record it, edit a blob of its "
        "input (a label change for label maps), report MACs saved and fidelity.",
        epilog=f"models:\n{models}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--model", default="ddpm-tiny", metavar="NAME",
                      help="a named config (listed below; default ddpm-tiny)")  # fmt: skip
    demo.add_argument("--fraction", type=_fraction, default=0.05,
                      help="edited share of the image, 0 to 1 (default 0.05)")  # fmt: skip
    demo.add_argument("--policy", default="truncated", choices=["truncated", "exact"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", metavar="DIR",
                      help="folder for the pictures (default: a new ./sigec-demo*)")  # fmt: skip
    _trajectory_arguments(demo, steps=10)
    edit = sub.add_parser(
        "edit",
        help="edit an image file with an engine file or a diffusers folder; write the pictures",
        description="Generate from --image, edit to --edited (or paint --mask: a colour, or a "
        "label for label maps), and write original, edited, mask, active tiles per resolution, "
        "result (and dense and |result - dense| with --check-dense) into --out. Workflows: "
        "sdedit (a UNet engine or folder: DDPM in pixel space, a Stable Diffusion pipeline folder "
        "with its VAE), labels (a GauGAN engine: --image is an index picture), call (any other "
        "engine: one call).",
    )
    edit.add_argument("model", metavar="ENGINE_OR_PIPELINE",
                      help="an engine file (sigec convert) or a diffusers folder")  # fmt: skip
    edit.add_argument("--image", required=True, help="the original (a label map: index picture)")
    how = edit.add_mutually_exclusive_group(required=True)
    how.add_argument("--edited", help="the edited picture (the mask: where it differs)")
    how.add_argument("--mask", help="a mask picture: paint it with --colour (or --label; an "
                     "inpainting UNet regenerates it)")  # fmt: skip
    edit.add_argument("--colour", type=int, nargs=3, default=(255, 40, 40), metavar=("R", "G", "B"),
                      help="the paint of --mask (default 255 40 40)")  # fmt: skip
    edit.add_argument("--label", type=int, help="the class --mask paints (label maps)")
    edit.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures")
    edit.add_argument("--kind", choices=["sdedit", "labels", "call"],
                      help="override the workflow the model says it is")  # fmt: skip
    edit.add_argument("--check-dense", action="store_true",
                      help="also run the dense model on the edited input (dense.png, "
                      "error.png, PSNR)")  # fmt: skip
    edit.add_argument("--seed", type=int, default=0, help="SDEdit noise seed")
    edit.add_argument("--prompt", help="text prompt (a pipeline folder with a text encoder)")
    edit.add_argument("--device", help="where to run (default: the engine's)")
    edit.add_argument(
        "--cache-device",
        choices=["device", "host", "auto"],
        default="device",
        help="where an SDEdit trajectory keeps its per-step caches: on the GPU "
        "(default) or in pinned host memory (less GPU memory, slower edits)",
    )
    _trajectory_arguments(edit, steps=20)
    conv = sub.add_parser(
        "convert",
        help="compile a checkpoint (diffusers folder, or state dict + --config) to an engine file",
        description="Compile a model on disk into one engine file (sigec.load reads it back "
        "without the model's class or diffusers). SOURCE: a local diffusers UNet folder (or a "
        "pipeline folder: --component), or a state dict (.pth, .pt, .bin, .safetensors) with "
        "--config naming its model (a GauGAN generator checkpoint: --config "
        "gaugan-cityscapes).",
        epilog=f"configs:\n{models}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("source", help="a diffusers folder or a state-dict file")
    conv.add_argument("--out", required=True, help="the engine file to write (e.g. unet.sigec)")
    conv.add_argument("--config", metavar="NAME", help="the named model a state dict is for")
    conv.add_argument("--component", default="unet", help="in a pipeline folder (default unet)")
    conv.add_argument("--batch", type=_positive, help="batch of the compiled call")
    conv.add_argument(
        "--size",
        type=_positive,
        nargs=2,
        metavar=("H", "W"),
        help="resolution of the image input (latents for Stable Diffusion)",
    )
    conv.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    conv.add_argument("--device", default="cpu", help="where the engine compiles (cpu, cuda)")
    conv.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_override,
        metavar="KEY=VALUE",
        help="a SparseConfig field, e.g. mask_dilation=2",
    )
    conv.add_argument("--force", action="store_true", help="replace an existing --out file")
    masks = sub.add_parser("mask", help="describe the shared seeded edit mask (blobs) for a size")
    masks.add_argument("--size", type=_positive, nargs=2, default=(256, 256), metavar=("H", "W"))
    masks.add_argument("--fraction", type=_fraction, default=0.012,
                       help="target masked area share, 0 to 1")  # fmt: skip
    masks.add_argument("--seed", type=int, default=0)
    masks.add_argument("--tile", type=_positive, default=6,
                       help="output tile size for the tile count")  # fmt: skip
    return parser


def _cmd_mask(args) -> int:
    from sigec.runtime.masks import active_tiles, blob_mask

    h, w = args.size
    m = blob_mask(h, w, args.fraction, seed=args.seed)
    tiles = active_tiles(m, 3, 1, 1, args.tile)
    grid = -(-h // args.tile) * -(-w // args.tile)
    print(
        f"{h}x{w} mask, seed {args.seed}: {m.float().mean().item():.4%} of pixels; "
        f"{tiles.capacity}/{grid} tiles of {args.tile}x{args.tile} active for a 3x3 conv"
    )
    return 0


def edit_input(x, mask, seed: int):
    """The demo's edit of ``x`` inside ``mask``: a label map gets one new class there (the
    least common one in the region), anything else new noise."""
    import torch

    if is_label_map(x):
        region = x[:, :, mask].sum(dim=(0, 2))  # pixels of each class inside the mask
        c = int(torch.argmin(region))
        onehot = torch.zeros_like(x)
        onehot[:, c] = 1
        return torch.where(mask, onehot, x)
    g = torch.Generator().manual_seed(10_000 + seed)  # not the seed build() draws x with
    return torch.where(mask, torch.randn(x.shape, generator=g).to(x), x)


def _demo_folder(out) -> str:
    """``--out``, or the first of sigec-demo, sigec-demo-2, ... that does not exist yet."""
    import os

    if out is not None:
        return out
    name, i = "sigec-demo", 1
    while os.path.exists(name):
        i += 1
        name = f"sigec-demo-{i}"
    return name


def _cmd_demo(args) -> int:
    from sigec.models.configs import MODELS, build
    from sigec.pipelines import images, workflow
    from sigec.pipelines.diffusion import SIGE_SD
    from sigec.runtime.masks import blob_mask

    if args.model not in MODELS:
        print(f"sigec demo: unknown model {args.model!r}; known: {', '.join(sorted(MODELS))}")
        return 2
    model, inputs, kwargs = build(args.model, seed=args.seed)
    config = sigec.SparseConfig(mask_policy=args.policy, **MODELS[args.model].sige_config)
    x = inputs[0]
    mask = blob_mask(*x.shape[-2:], args.fraction, seed=args.seed)
    if type(model).__name__ == "UNet2DModel":  # a diffusion UNet in pixel space: SDEdit
        # SIGE's SDEdit settings (the steps spread an edit: a 1-pixel dilation, not 5)
        sd = {**MODELS[args.model].sige_config, **SIGE_SD}
        config = sigec.SparseConfig(mask_policy=args.policy, **sd)
        editor = workflow.SDEditor(model, config=config, steps=args.steps,
                                   strength=args.strength)  # fmt: skip
        flow = workflow.SDEditFlow(editor, seed=args.seed)
        x = images.demo_picture(*x.shape[-2:])
        edited = images.paint(x, mask, (255, 40, 40))
    elif is_label_map(x):
        flow, edited = workflow.LabelFlow(workflow.LabelMapEditor(model, config)), None
    else:
        flow = workflow.CallFlow(model, inputs[1:], kwargs, config=config)
        edited = None
    if edited is None:
        edited = edit_input(x, mask, args.seed)
    folder = _demo_folder(args.out)
    try:
        report = workflow.run_edit(flow, x, edited, mask, check_dense=True)
        written = report.write(folder, overwrite=args.force)
    except sigec.SigecError as exc:
        print(f"sigec demo: {exc}", file=sys.stderr)
        return 2
    kind = "a label change" if is_label_map(x) else "new paint" if flow.kind == "sdedit" else (
        "new noise")  # fmt: skip
    print(f"{args.model}: compiled, recorded and warmed up in {report.times['generate_s']:.1f} s "
          f"(random weights); {args.policy} policy; {kind}")  # fmt: skip
    for line in report.lines():
        print(line)
    print(f"pictures: {len(written) - 1} PNGs and summary.json in {folder}/ (tiles of the "
          f"{report.tiles_of})")  # fmt: skip
    return 0


def _cmd_edit(args) -> int:
    from sigec.pipelines import images, workflow

    try:
        flow = workflow.open_workflow(args.model, kind=args.kind, steps=args.steps,
                                      strength=args.strength, seed=args.seed, prompt=args.prompt,
                                      device=args.device, progress=True,
                                      cache_device=args.cache_device)  # fmt: skip
        size, classes = flow.input_size()
        if flow.kind == "labels":
            original = images.read_label_map(args.image, classes, size)
        else:
            original = images.read_image(args.image, size)
        mask = None
        if args.edited is not None:
            if flow.kind == "labels":
                edited = images.read_label_map(args.edited, classes, size)
            else:
                edited = images.read_image(args.edited, size)
        else:
            mask = images.read_mask(args.mask, size)
            if flow.kind == "labels":
                if args.label is None:
                    raise sigec.MaskError("a label map's --mask needs --label: the class to paint")
                edited = workflow.LabelMapEditor.relabel(original, mask, args.label)
            elif flow.kind == "sdedit" and flow.editor.inpainting:
                edited = original  # an inpainting UNet regenerates the masked region
            else:
                edited = images.paint(original, mask, tuple(args.colour))
        dev = flow.device()
        original, edited = original.to(dev), edited.to(dev)
        report = workflow.run_edit(flow, original, edited, mask, check_dense=args.check_dense)
        written = report.write(args.out, overwrite=args.force)
    except (sigec.SigecError, ValueError, OSError) as exc:
        print(f"sigec edit: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    print(f"pictures: {', '.join(p.name for p in written)} in {args.out}/")
    return 0


def _cmd_convert(args) -> int:
    from sigec.converting import convert

    try:
        done = convert(args.source, args.out, config=args.config, component=args.component,
                       batch=args.batch, size=args.size, dtype=args.dtype, device=args.device,
                       overrides=dict(args.overrides), overwrite=args.force)  # fmt: skip
    except (sigec.SigecError, ValueError, TypeError) as exc:
        print(f"sigec convert: {exc}", file=sys.stderr)
        return 2
    import os

    size = os.path.getsize(done["out"]) / 2**20
    print(f"{done['model']} -> {done['out']} ({size:.1f} MiB, {done['dtype']})")
    print(f"inputs: {done['inputs']}; SparseConfig: {done['config']}")
    print(f"dense fallbacks: {done['dense_fallbacks']} nodes; load it with sigec.load(path)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    commands = {"mask": _cmd_mask, "demo": _cmd_demo, "convert": _cmd_convert, "edit": _cmd_edit}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
