"""The ``sigec`` command line: a thin argparse layer over the Python API.

Subcommands are added here as the API grows; no behaviour lives only in the CLI.
"""

from __future__ import annotations

import argparse
import sys

import sigec


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


def is_label_map(x) -> bool:
    """A one-hot label map ``[N, C, H, W]`` (every pixel one class): edits change labels."""
    return x.dim() == 4 and x.shape[1] > 1 and bool(((x == 0) | (x == 1)).all()) and bool(
        (x.sum(1) == 1).all())  # fmt: skip


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


def _cmd_demo(args) -> int:
    import time

    import torch

    from sigec.models.configs import MODELS, build
    from sigec.runtime.masks import blob_mask

    if args.model not in MODELS:
        print(f"sigec demo: unknown model {args.model!r}; known: {', '.join(sorted(MODELS))}")
        return 2
    model, inputs, kwargs = build(args.model, seed=args.seed)
    config = sigec.SparseConfig(mask_policy=args.policy, **MODELS[args.model].sige_config)
    t0 = time.perf_counter()
    engine = sigec.compile(model, inputs, kwargs, config=config)
    compile_s = time.perf_counter() - t0
    engine.record(*inputs, **kwargs)
    x = inputs[0]
    mask = blob_mask(*x.shape[-2:], args.fraction, seed=args.seed)
    x_edit = edit_input(x, mask, args.seed)
    got = engine.edit(x_edit, *inputs[1:], **kwargs)
    with torch.no_grad():
        want = model(x_edit, *inputs[1:], **kwargs)
    got, want = (getattr(v, "sample", v) for v in (got, want))
    stats = engine.stats()
    err = (got - want).abs()
    outside = torch.nn.functional.interpolate(mask[None, None].float(), size=got.shape[-2:])
    outside = outside[0, 0] == 0
    kind = "a label change" if is_label_map(x) else "new noise"
    print(f"{args.model}: compiled in {compile_s:.1f} s; {args.policy} policy")
    print(f"edit of {mask.float().mean().item():.2%} of the input ({args.fraction:.1%} asked): "
          f"{kind}")  # fmt: skip
    ratio = stats["macs_ratio"]
    saved = f"({ratio:.2f}x fewer)" if ratio else "(nothing recomputed)"
    if stats["ran_dense"]:
        saved = "(the dense model ran: the edit's tiles would have cost more)"
    print(f"MACs: dense {stats['dense_macs'] / 1e9:.3f} G, edit {stats['sparse_macs'] / 1e9:.3f} G"
          f" {saved}")  # fmt: skip
    rng = (want.max() - want.min()).item()
    mse = err.double().pow(2).mean().item()
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(rng * rng / mse)).item()
    outside_err = err[..., outside].max().item() if outside.any() else 0.0
    print(f"fidelity vs dense on the edited input: PSNR {psnr:.1f} dB, "
          f"max error {err.max().item():.2e}, outside the mask {outside_err:.2e}")  # fmt: skip
    print(f"active fraction per resolution: "
          f"{ {k: round(v, 3) for k, v in stats['active_fraction'].items()} }")  # fmt: skip
    print(
        f"cache: {stats['cache_bytes'] / 2**20:.1f} MiB; dense fallbacks: "
        f"{len(stats['dense_fallbacks'])} nodes (engine.stats()['dense_fallbacks'] says why)"
    )
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
    return {"mask": _cmd_mask, "demo": _cmd_demo, "convert": _cmd_convert}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
