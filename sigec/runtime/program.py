"""What the passes emit and the engine runs: the record graph, the edit graph and their metadata.

The passes (``sigec.passes``) build a ``Program``; ``sigec.runtime.engine`` executes it.
Everything here is plain data, so the runtime never needs to know how it was derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

Resolution = tuple[int, int]


@dataclass(frozen=True)
class TileRequest:
    """One tile list an edit needs: the active tiles of a mask for a given op geometry.

    Attributes:
        mask: the mask it derives from: a resolution ``(h, w)`` (truncated policy: one mask per
            resolution) or a node name (exact policy: one mask per node).
        kernel: effective kernel ``dilation * (k - 1) + 1`` per axis (1 for pointwise ops).
        stride: the conv's (1 for pointwise ops).
        padding: ``(top, left)`` zeros before the first input pixel (0 for pointwise ops); the
            bottom/right padding needs no number: reads past the map are zeros anyway.
        tile: output tile size.
        in_scale: for nearest upsampling by ``f``: input corners are output corners // f.
        transposed: a transposed conv (``padding`` its padding): an output tile (a multiple of
            the stride, at a multiple of it) reads the input window ``transposed_window`` gives.
    """

    mask: Resolution | str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    tile: tuple[int, int]
    in_scale: int = 1
    transposed: bool = False


def transposed_window(kernel: int, stride: int, padding: int, tile: int) -> tuple[int, int, int]:
    """One axis of a transposed conv on tiles: ``(first, size, crop)``.

    Output pixel ``o`` sums inputs ``i`` with ``i * stride - padding + t = o`` for taps
    ``0 <= t < kernel`` (the effective kernel). For an output tile of ``tile`` pixels at ``o0``
    (``o0`` a multiple of ``stride``) the inputs are ``o0 // stride + first`` onwards, ``size`` of
    them; the transposed conv of that window (padding 0) holds the tile at offset ``crop``.
    """
    first = -((kernel - 1 - padding) // stride)  # ceil((padding - kernel + 1) / stride)
    last = (tile - 1 + padding) // stride
    return first, last - first + 1, padding - first * stride


def transposed_crop(kernel: int, stride: int, padding: int, tile: int) -> tuple[int, int]:
    """``(pad, offset)`` of one axis: the window's transposed conv with padding ``pad`` (as much
    of the unneeded output as can be cut on both sides) holds the tile at ``offset``."""
    _, size, crop = transposed_window(kernel, stride, padding, tile)
    tail = (size - 1) * stride + kernel - crop - tile  # output past the tile's end (>= 0)
    pad = min(crop, tail)
    return pad, crop - pad


@dataclass(frozen=True)
class MaskRule:
    """How one node's changed region follows from its inputs' (exact policy).

    kind: "input" (an image input: the edit mask), "conv" (receptive field: max-pool of the input
    mask with the conv's kernel, stride and padding), "conv_transpose" (the pixels a transposed
    conv with that kernel (and ``dilation``), stride, padding and ``output_padding`` spreads each
    changed input pixel to), "union" (same-resolution pointwise op),
    "upsample" (nearest, integer ``factor``), "resample" (nearest to ``size``), "pad" (padding
    by ``pads`` = left, right, top, bottom in ``pad_mode``: "zeros", or "reflect" / "replicate",
    whose padded pixels change with the ones they copy), "full" (a global op: all changed as
    soon as any input changed).
    """

    node: str
    kind: str
    srcs: tuple[str, ...] = ()
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    factor: int = 1
    size: Resolution = (0, 0)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_mode: str = "zeros"
    dilation: tuple[int, int] = (1, 1)
    output_padding: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class NormFold:
    """A normalisation folded into per-sample per-channel ``scale``/``shift`` at record time.

    kind: "group_norm" (statistics of the recorded input: SIGE's cached statistics) or
    "batch_norm" (eval mode: running statistics). Node names refer to the record graph.
    ``incremental``: a group norm whose statistics the edit updates from the changed tiles
    (the slot records per-group sums; ``sigec.runtime.ops.norm_incremental``).
    """

    name: str
    kind: str
    input: str
    weight: str | None
    bias: str | None
    eps: float
    num_groups: int = 1
    running_mean: str | None = None
    running_var: str | None = None
    incremental: bool = False


@dataclass(frozen=True)
class MacEntry:
    """Multiply-accumulates of one conv / linear / attention node of the dense model.

    ``mode``: "dense" (the edit runs it in full), "cached" (it depends on no image input: the
    edit reads the record, 0 MACs) or "sparse" (a conv on tiles: ``per_pixel`` MACs for each
    output pixel of each computed tile of ``tile_key``, for every sample; or, where set,
    ``per_tile`` MACs for each computed tile, all samples: a transposed conv, whose cost follows
    its input window).
    """

    node: str
    op: str
    resolution: Resolution | None
    dense: int
    mode: str = "dense"
    per_pixel: int = 0
    tile_key: str | None = None
    per_tile: int = 0


@dataclass
class Program:
    """A compiled model: the graphs and everything the engine needs to run them."""

    record_gm: torch.fx.GraphModule  # the captured graph, flat inputs -> flat outputs
    edit_gm: torch.fx.GraphModule  # (state, tiles, *flat inputs) -> flat outputs
    in_spec: object  # pytree spec of (args, kwargs)
    out_spec: object  # pytree spec of the model's output
    example_meta: list  # per flat input: (shape, dtype) for tensors, the value otherwise
    input_kinds: list[str]  # per flat input: "spatial", "tensor" or "const"
    input_names: list[str]  # per flat input: positional index or keyword
    maps: dict[str, tuple[tuple[int, ...], torch.dtype]]  # materialised sparse maps
    statics: tuple[str, ...]  # record-graph nodes whose values the edit reads from the cache
    norms: tuple[NormFold, ...]
    tile_requests: dict[str, TileRequest]
    map_tiles: dict[str, str]  # map name -> tile key of the op that writes it
    mask_rules: tuple[MaskRule, ...]
    resolutions: tuple[Resolution, ...]
    node_resolutions: dict[str, Resolution]  # every spatial node of the record graph
    input_resolution: Resolution
    macs: tuple[MacEntry, ...]
    fallbacks: tuple[tuple[str, str, str], ...]  # (node, op, reason)
    counters: dict[str, int] = field(default_factory=dict)
    policy: str = "truncated"
    # captured token-region nodes (maps in another layout): name -> (layout, (H, W)); their
    # recorded values are converted to maps (sigec.runtime.layouts.layout_to_map)
    layouts: dict[str, tuple[str, Resolution]] = field(default_factory=dict)
    # maps only read at the tiles their producer writes in the same edit: no cache, no restore
    private_maps: frozenset[str] = frozenset()
    # record-time computation of edit-invariant values: prelude_gm(state) -> one per ``hoisted``
    prelude_gm: torch.fx.GraphModule | None = None
    hoisted: tuple[str, ...] = ()

    @property
    def image_meta(self) -> tuple:
        """``(shape, dtype, device)`` of the first image input (what edits' masks follow)."""
        return self.example_meta[self.input_kinds.index("spatial")]
