"""SparseConfig: every knob of ``sigec.compile`` in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType

MASK_POLICIES = ("truncated", "exact")
NORM_STATS = ("cached", "incremental")
CONV_KERNELS = ("auto", "fused", "window", "tiles", "cudnn")


def _default_block_sizes():
    return MappingProxyType({"3x3": 6, "1x1": 4, "other": 6, "pointwise": 4})


def _low_res_cap(res) -> int:
    """``low_res_tiles``: the largest tile on a map of resolution ``res`` (an eighth of its
    smaller side, at least 2)."""
    return max(2, min(res) // 8)


@dataclass(frozen=True)
class SparseConfig:
    """How sigec turns a model into an incremental engine.

    Attributes:
        mask_policy: "truncated" (SIGE's per-resolution masks: the changed region does not grow with
            depth inside a resolution; fast, approximate) or "exact" (masks grown through every
            conv's receptive field, any global op makes its output fully active, normalisation
            statistics recomputed; equals the dense model on the edited input: the oracle).
        block_size: output tile size per conv kind: "3x3", "1x1", "other" (any other kernel), and
            "pointwise" for ops that run on tiles without a conv (elementwise ops, upsampling).
            The "pointwise" size must be divisible by every nearest-upsampling factor.
        mask_eps: a pixel counts as edited when any channel of any image input changed by more.
        mask_dilation: square dilation (pixels) of the edit mask at the input resolution.
        mask_threshold: bilinear coverage above which a downsampled mask pixel is on (truncated).
        mask_level_dilation: dilation (pixels) applied at every derived resolution (truncated).
        sparse_min_resolution: maps whose smaller side is below this run dense.
        spatial_inputs: names (flat positional index as str, or keyword name) of the inputs that are
            images; None means every 4-D floating-point input.
        norm_stats: GroupNorm statistics in the truncated policy. "cached": those of the recorded
            run (SIGE). "incremental": per-group sums and sums of squares from the record,
            corrected with the old and new values of the tiles the edit changed (O(active)), so
            the norm uses the statistics of the map being computed.
        tile_lists: "exact": each tile list holds exactly the active tiles (one host sync per
            list to read its length); "grid": every list is padded to its whole tile grid with
            the count kept on the device: static shapes and no host sync (for CUDA graphs), at
            the cost of computing the padding tiles (zeros).
        cuda_graphs: run each edit as one CUDA graph replay (truncated policy only; see
            ``sigec.runtime.static_path``): every edit runs one of ``size_classes`` static edit
            shapes, all captured during warm-up (``engine.warmup()``, run by the first
            ``record``), shared by every slot; one host sync per edit. Off CUDA the same
            static-shape path runs uncaptured.
        size_classes: how many static edit shapes (one CUDA graph each) the static path keeps:
            each is a capacity per tile list, calibrated on seeded strokes and blobs
            (``sigec.runtime.sizes``); an edit runs the smallest that holds its tiles. More
            classes: less padding per edit, more graphs and warm-up time. 2 to 14 (with the
            count graph and the dense graph an engine holds at most 16 graphs).
        cost_model: with ``cuda_graphs`` on CUDA, time every size class's sparse graph against
            a graph of the dense model during warm-up and run the faster one for every edit of
            that class (large edits run dense: the caches are left alone and ``commit`` records
            the edited input again).
        dense_backend: how that dense path runs on CUDA: "inductor" (``torch.compile`` of the
            captured graph, compiled during warm-up: the baseline's own compile time, ~25-55 s
            cold on the standard models) or "eager" (the model captured as it is: warm-up in
            about half the time, but a dense graph ~3x slower than inductor's, so edits larger
            than the sparse path's break-even run slower; docs/results.md).
        fit_tiles: (on by default) shrink a conv's tile (down to a divisor of the map) where its
            grid would overhang the map by more than 30 % of the map's area (6x6 tiles on an 8x8
            map cover 12x12): fewer MACs at the lowest resolutions.
        low_res_tiles: (off by default) cap a conv's tile at an eighth of its map's smaller side
            (at least 2): 4x4 tiles on 32x32 maps, 2x2 on 16x16 and 8x8, where a 6x6 tile covers
            up to a quarter of the map; the tiles follow the edit more closely there. The tiles
            of ops without a conv ("pointwise") are capped the same way (``pointwise_tile``). SD 1.5
            512x512 at a 1.2 % edit: 9.5x instead of 6.3x fewer MACs than dense (CPU count,
            docs/results.md); its GPU time is not measured yet, hence off.
        channels_last: keep every cached and working map in channels-last memory format (cuDNN's
            native fp16 layout: the convolutions on tiles need no layout conversion; measured
            1.2-2.4x faster sparse edits on an H200, docs/results.md).
        conv_kernel: how a sparse conv runs on the GPU. "fused": one Triton implicit-GEMM launch
            (``sigec.kernels.tile_conv``) reads the input tiles through the tile list, applies the
            folded norm and activation, convolves, adds bias and residual and writes the output
            tiles into the map; "window": the same single launch, but each program first stages
            its tiles' input windows with the norm and activation applied once per pixel, then
            runs the taps on them (``sigec.kernels.window_conv``); "tiles": gather (with the
            norm and activation, once per input pixel) -> the same kernel on the gathered
            windows (bias, residual and the write in its epilogue); "cudnn": gather -> cuDNN
            conv on the tile batch -> scatter;
            "auto" (default): fused for convs without a norm/activation prologue and a short
            reduction, "tiles" for the others with at most 320 output channels, cuDNN for the
            rest (measured per layer shape on an H200 with split-K for small launches,
            ``runtime.ops.conv_path``, docs/results.md). Convs with groups > 1 or transposed
            always take the cuDNN path. On the CPU all run the same PyTorch reference.
        dense_regions: how the edit graph's dense parts (runs of plain ATen ops: resolutions below
            ``sparse_min_resolution``, global ops, fallbacks) run on CUDA: "inductor" (each run
            compiled once, on the first edit: fused norms and pointwise ops, no layout
            conversions) or "eager". On the CPU they run eagerly.
        count_graph: how the CUDA-graph path's count graph (undo, mask pyramid, tile lists,
            counts, size class) runs inside its CUDA graph: "inductor" (compiled during warm-up:
            its small ops fused into a few kernels) or "eager" (captured as it is: no compile,
            more kernels per edit).
        compile_workers: threads that compile the tile kernels during warm-up: a dry run of every
            size class's edit graph submits each kernel's compile before the first capture, so
            the compiles overlap instead of running one by one at each kernel's first launch. 0
            compiles each at its first launch. No effect off CUDA.
        tile_expressions: how multi-op expressions on tiles (a SPADE modulation, a transformer
            block's feed-forward: ``tile_op`` with a GraphModule) run on CUDA: "inductor" (one
            compile per expression, dynamic in the tile count: its pointwise ops become one
            kernel) or "eager". On the CPU they run eagerly.
        pass_tiles: scatter -> gather fusion on one tile list: where a map is only ever read at
            the tiles its producer writes, by tile ops and attention on the same tile list, the
            producer hands its tile batch to the readers and the map is never built (no scatter,
            no gathers, no working map; ``pipeline.pass_tiles``).
        upsample_reads: a sparse conv whose input is a nearest upsampling by an integer factor
            (and read by sparse convs only) reads the upsampling's input through a lookup
            (``convs.fold_upsamples``): the upsampled map is never built, so it needs no working
            map, no cache per slot and no upsampling kernels in the edit.
        kv_projection: where a recognised self-attention's key and value projections (the
            ``Linear`` layers that make K and V from the image's tokens) run. "dense" (default):
            on every token in each edit, from the cached normalised tokens they read, so a slot
            caches one map per attention instead of two (SD 1.5 512x1024: 415 instead of 503
            MiB per slot in fp16, within 1 % of the speed of "tiles" on an H200,
            docs/results.md); "tiles": on the edited tokens only, so K and V are cached per slot
            (two maps per attention, fewer MACs per edit: 12.5x instead of 9.5x fewer than
            dense on SD 512x1024 at a 1.7 % edit).
    """

    mask_policy: str = "truncated"
    block_size: MappingProxyType = field(default_factory=_default_block_sizes)
    mask_eps: float = 0.0
    mask_dilation: int = 0
    mask_threshold: float = 0.3
    mask_level_dilation: int = 1
    sparse_min_resolution: int = 1
    spatial_inputs: tuple[str, ...] | None = None
    norm_stats: str = "cached"
    tile_lists: str = "exact"
    cuda_graphs: bool = False
    size_classes: int = 14
    cost_model: bool = True
    dense_backend: str = "inductor"
    channels_last: bool = True
    fit_tiles: bool = True
    low_res_tiles: bool = False
    conv_kernel: str = "auto"
    dense_regions: str = "inductor"
    tile_expressions: str = "inductor"
    count_graph: str = "inductor"
    compile_workers: int = 8
    pass_tiles: bool = True
    upsample_reads: bool = True
    kv_projection: str = "dense"

    def __post_init__(self):
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(
                f"mask_policy: expected one of {MASK_POLICIES}, got {self.mask_policy!r}"
            )
        if self.tile_lists not in ("exact", "grid"):
            raise ValueError(f"tile_lists: expected 'exact' or 'grid', got {self.tile_lists!r}")
        if self.cuda_graphs and self.mask_policy != "truncated":
            raise ValueError(
                "cuda_graphs needs mask_policy='truncated' (the exact policy's masks depend on "
                "data the host must read)"
            )
        if self.dense_backend not in ("inductor", "eager"):
            raise ValueError(
                f"dense_backend: expected 'inductor' or 'eager', got {self.dense_backend!r}"
            )
        for knob in ("dense_regions", "tile_expressions", "count_graph"):
            if getattr(self, knob) not in ("inductor", "eager"):
                raise ValueError(
                    f"{knob}: expected 'inductor' or 'eager', got {getattr(self, knob)!r}"
                )
        if not isinstance(self.compile_workers, int) or self.compile_workers < 0:
            raise ValueError(f"compile_workers: expected an int >= 0, got {self.compile_workers!r}")
        for f in fields(self):  # switches: a string such as "no" must not read as True
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"{f.name}: expected True or False, got {getattr(self, f.name)!r}")
        if self.conv_kernel not in CONV_KERNELS:
            raise ValueError(
                f"conv_kernel: expected one of {CONV_KERNELS}, got {self.conv_kernel!r}"
            )
        if self.kv_projection not in ("tiles", "dense"):
            raise ValueError(
                f"kv_projection: expected 'tiles' or 'dense', got {self.kv_projection!r}"
            )
        if self.norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats: expected one of {NORM_STATS}, got {self.norm_stats!r}")
        sizes = dict(_default_block_sizes())
        sizes.update(dict(self.block_size))
        unknown = set(sizes) - {"3x3", "1x1", "other", "pointwise"}
        if unknown:
            raise ValueError(f"block_size: unknown conv kinds {sorted(unknown)}")
        if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
            raise ValueError(f"block_size: tile sizes must be positive ints, got {sizes}")
        object.__setattr__(self, "block_size", MappingProxyType(sizes))
        if not isinstance(self.size_classes, int) or not 2 <= self.size_classes <= 14:
            raise ValueError(
                f"size_classes: expected an int from 2 to 14 (an engine holds at most 16 "
                f"graphs), got {self.size_classes!r}"
            )
        if self.mask_dilation < 0 or self.mask_level_dilation < 0:
            raise ValueError("mask_dilation and mask_level_dilation must be >= 0")
        if self.spatial_inputs is not None:
            object.__setattr__(self, "spatial_inputs", tuple(str(s) for s in self.spatial_inputs))

    def tile_for(self, kh: int, kw: int, res: tuple[int, int]) -> int:
        """Output tile size for a conv with this kernel on a map of resolution ``res``."""
        tile = self.tile_for_kernel(kh, kw)
        if self.low_res_tiles:
            tile = min(tile, _low_res_cap(res))
        if not self.fit_tiles:
            return tile
        h, w = res

        def cover(t: int) -> float:
            return (-(-h // t) * t) * (-(-w // t) * t) / (h * w)

        if cover(tile) <= 1.3:
            return tile
        return max(t for t in range(1, tile + 1) if cover(t) <= 1.3)

    def pointwise_tile(self, res, factor: int = 1) -> int:
        """Tile size of ops on tiles without a conv (elementwise, upsampling by ``factor``,
        token-wise) on a map of resolution ``res``: ``block_size["pointwise"]``, with
        ``low_res_tiles`` capped like a conv's to a multiple of ``factor`` where one fits."""
        tile = self.block_size["pointwise"]
        if self.low_res_tiles and res is not None:
            cap = _low_res_cap(res)
            cap -= cap % factor
            if 0 < cap < tile:
                tile = cap
        return tile

    def tile_for_kernel(self, kh: int, kw: int) -> int:
        """Output tile size for a conv with this kernel."""
        if (kh, kw) == (3, 3):
            return self.block_size["3x3"]
        if (kh, kw) == (1, 1):
            return self.block_size["1x1"]
        return self.block_size["other"]
