"""The ``sigec`` command line: a thin argparse layer over the Python API.

Subcommands are added here as the API grows; no behaviour lives only in the CLI.
"""

from __future__ import annotations

import argparse
import sys

import sigec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sigec",
        description="Spatially sparse incremental inference for image generative models.",
    )
    parser.add_argument("--version", action="version", version=f"sigec {sigec.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    masks = sub.add_parser("mask", help="describe the shared seeded edit mask (blobs) for a size")
    masks.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    masks.add_argument("--fraction", type=float, default=0.012, help="target masked area share")
    masks.add_argument("--seed", type=int, default=0)
    masks.add_argument("--tile", type=int, default=6, help="output tile size for the tile count")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return {"mask": _cmd_mask}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
