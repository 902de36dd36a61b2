"""SparseEngine: record / warmup / edit / commit over a compiled ``Program``, a cache per slot.

How an edit flows (see docs/how-it-works.md):
1. inputs are checked against the compiled example (shape, dtype, device, structure) and the
   non-image inputs against the slot's record (a different timestep or prompt is a stale cache);
2. the edit mask is taken as given or computed as ``|edited - recorded| > mask_eps`` (any
   channel), dilated by ``mask_dilation``;
3. the edit path (``sigec.runtime.edit_path``: eager, or static with CUDA graphs) runs the edit
   graph on the engine's working set (``sigec.runtime.state.LiveState``), which holds the slot's
   caches with only the edited tiles recomputed;
4. ``commit`` copies the tiles the edit wrote into the slot's caches (O(active)): the edit
   becomes the new original.

``record`` fills a slot (its caches) and, the first time, warms the engine up (``warmup``: size
classes, compiled parts, every CUDA graph); later records, of this slot or others, keep all of
it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from sigec.errors import InputMismatchError, MaskError, NotRecordedError
from sigec.runtime import cost, ops
from sigec.runtime.edit_path import EagerPath, EditPath
from sigec.runtime.inputs import flatten_call
from sigec.runtime.layouts import layout_to_map
from sigec.runtime.masks import TileSet, difference_mask, dilate
from sigec.runtime.offload import check_where
from sigec.runtime.program import Program
from sigec.runtime.state import LiveState, SlotCache
from sigec.runtime.static_path import StaticPath


class SparseEngine(torch.nn.Module):
    """An incremental version of a model: ``record`` once, then ``edit`` many times.

    Built by ``sigec.compile``; see its docstring for the call signatures. ``slots`` holds one
    ``SlotCache`` per recorded key; ``live`` is the working set every edit runs on; ``path`` the
    edit path (``EagerPath`` or, with ``cuda_graphs``, ``StaticPath``).
    """

    def __init__(self, program: Program, config, rebuild: Callable | None = None):
        super().__init__()
        self.config = config
        self._rebuild = rebuild
        self._set_program(program)
        self.slots = torch.nn.ModuleDict()
        self.live: LiveState | None = None
        self.path: EditPath | None = None
        self._warmup_in_edit = False
        self.meta: dict = {}  # what the engine is, for tools: {"model", "workflow"} (saved)

    def dense_callable(self):
        """The dense model as the cost model runs it: the captured graph, compiled by inductor
        on CUDA when ``config.dense_backend == "inductor"`` (compiled once, on first use)."""
        if self._dense_fn is None:
            fn = self.record_gm
            on_cuda = self.program.image_meta[2]
            if self.config.dense_backend == "inductor" and torch.device(on_cuda).type == "cuda":
                fn = torch.compile(self.record_gm)
            self._dense_fn = fn
        return self._dense_fn

    @torch.no_grad()
    def dense(self, *args, **kwargs):
        """The model on these inputs, run densely by the captured program: no slot or cache is
        read or written (the reference an edit approximates). Same inputs and output as
        ``record``."""
        flat = self._flatten(args, kwargs)
        return pytree.tree_unflatten(list(self.record_gm(*flat)), self.program.out_spec)

    def cache_bytes(self, where: str | None = None) -> int:
        """Bytes of every slot's caches and the one working set (with the staging copy of host
        slots); ``where="device"`` or ``"host"``: only those held there (see ``place``)."""
        check_where(where, (None, "device", "host"))
        host = sum(state.host_bytes() for state in self.slots.values())
        if where == "host":
            return host
        live = self.live.nbytes() if self.live is not None else 0
        total = sum(state.nbytes() for state in self.slots.values()) + live
        return total - host if where == "device" else total

    def place(self, slot=0, where: str = "host") -> None:
        """Keep slot ``slot``'s caches in pinned host memory (``"host"``) or on the engine's
        device (``"device"``, where a record puts them). A host slot's edits copy its caches in
        at each slot switch (from a copy ``edit(..., next_slot=...)`` started while the previous
        edit ran, when there is one) and commit its tiles in place: memory for time, measured in
        docs/results.md. The slot's uncommitted edit is kept only if it stays where it is."""
        check_where(where, ("host", "device"))
        state = self._slot(slot)
        if state.on_host == (where == "host"):
            return
        key = str(slot)
        self.live.pack_slot(state)
        if not state.flats:
            raise RuntimeError(f"slot {slot!r}: its buffers could not be packed; record it again")
        self.path.forget(key)  # the working set and restore tables held the old addresses
        state.place(host=where == "host")
        self.path.prepare(key, state)
        if where == "host" and len(self.slots) > 1:  # slot switches: a staging copy prefetched
            self.live.reserve_staging()
        elif not any(s.on_host for s in self.slots.values()):
            self.live.staging.forget()  # no host slot left to prefetch

    def prefetch(self, slot=0) -> bool:
        """Start copying host slot ``slot``'s caches to the device now (a side stream on CUDA),
        for its next edit; what ``edit(..., next_slot=slot)`` does. False when there is nothing
        to copy (a device slot, or the slot the working set holds)."""
        state = self._slot(slot)
        return self.live.prefetch(str(slot), state) if self.live is not None else False

    def placement(self) -> dict[str, str]:
        """Per slot key: ``"host"`` or ``"device"`` (see ``place``)."""
        return {k: "host" if s.on_host else "device" for k, s in self.slots.items()}

    def _set_program(self, program: Program) -> None:
        self._dense_fn = None
        self.program = program
        self.record_gm = program.record_gm
        self.edit_gm = program.edit_gm
        if self.config.channels_last:  # conv weights in cuDNN's layout too (same values)
            for node in self.edit_gm.graph.nodes:
                w = node.args[3] if node.target is ops.sparse_conv2d else None
                if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                    t = self.edit_gm
                    for part in w.target.split("."):  # a parameter or a folded-constant buffer
                        t = getattr(t, part)
                    if isinstance(t, torch.Tensor) and t.dim() == 4:
                        t.data = t.data.contiguous(memory_format=torch.channels_last)

    def _make_path(self) -> EditPath:
        if self.config.cuda_graphs:
            return StaticPath(self.program, self.config, self.edit_gm, self.live,
                              self.dense_callable)  # fmt: skip
        return EagerPath(self.program, self.config, self.edit_gm, self.live,
                         lambda: self.record_gm)  # fmt: skip

    # -- inputs --------------------------------------------------------------------------------

    def _flatten(self, args, kwargs) -> list:
        flat = flatten_call(args, kwargs, self.program.in_spec)
        for i, (value, meta) in enumerate(zip(flat, self.program.example_meta, strict=True)):
            name = self.program.input_names[i]
            if isinstance(meta, tuple) and len(meta) == 3 and isinstance(meta[1], torch.dtype):
                shape, dtype, device = meta
                if not isinstance(value, torch.Tensor):
                    raise InputMismatchError(f"input {name}: expected a tensor, got {value!r}")
                if tuple(value.shape) != shape:
                    raise InputMismatchError(
                        f"input {name}: shape {tuple(value.shape)} differs from the compiled "
                        f"{shape}; compile another engine for this shape"
                    )
                if value.dtype != dtype or value.device != device:
                    raise InputMismatchError(
                        f"input {name}: {value.dtype} on {value.device}, but the engine runs "
                        f"{dtype} on {device}; convert the input or call engine.to(...)"
                    )
            elif not _same_const(value, meta):
                raise InputMismatchError(
                    f"input {name}: {value!r} differs from the compiled {meta!r} (non-tensor "
                    "inputs are fixed at compile time)"
                )
        return flat

    def _slot(self, slot) -> SlotCache:
        key = str(slot)
        if key not in self.slots:
            raise NotRecordedError(
                f"slot {slot!r} has no record: call engine.record(...) with the original inputs "
                "(and slot=...) before edit or commit"
            )
        return self.slots[key]

    # -- record / warmup / edit / commit -------------------------------------------------------

    @torch.no_grad()
    def record(self, *args, slot=0, warmup: bool = True, **kwargs):
        """Run the model densely on the original inputs and fill this slot's caches.

        A slot recorded again is overwritten in place (its uncommitted edit is dropped); every
        graph, compiled part and size class of the engine stays. The first record also warms the
        engine up (``warmup``) unless ``warmup=False``; then the first edit does.

        Returns:
            The model's output, in the model's own output type.
        """
        flat = self._flatten(args, kwargs)
        key = str(slot)
        state = self.slots[key] if key in self.slots else SlotCache()
        outs = self._record_into(state, flat)
        if key not in self.slots:
            self.slots[key] = state
        if self.live is None:
            self.live = LiveState(state, self.program.maps, self._norm_inputs(),
                                  self.config.channels_last)  # fmt: skip
            self.path = self._make_path()
        self.path.forget(key)
        if warmup and not self.path.warmed:
            self.warmup(slot)
        self.path.prepare(key, state)
        return pytree.tree_unflatten(list(outs), self.program.out_spec)

    @torch.no_grad()
    def warmup(self, slot=0) -> dict:
        """Make everything edits need, on the inputs recorded in ``slot``: size classes, compiled
        dense regions, tile expressions and dense model, every CUDA graph, the cost model's
        verdicts. Edits never capture, compile or measure. Returns what it took (seconds per
        step, the classes, the cost model's timings); ``stats()["warmup"]`` keeps it."""
        state = self._slot(slot)
        return self.path.warmup(str(slot), state)

    def _norm_inputs(self) -> dict[str, str]:
        return {nf.name: nf.input for nf in self.program.norms if nf.incremental}

    def _record_into(self, state: SlotCache, flat: list) -> list:
        """Run the record graph on ``flat`` and fill ``state``'s buffers: registered if new,
        overwritten in place otherwise (the working set's tables hold their addresses)."""
        prog = self.program
        keep = set(prog.maps) | set(prog.statics)
        for nf in prog.norms:
            keep |= {n for n in (nf.input, nf.weight, nf.bias, nf.running_mean, nf.running_var)
                     if n}  # fmt: skip
        recorder = _Recorder(self.record_gm, keep)
        outs = recorder.run(*flat)
        values = recorder.kept
        for name, (layout, res) in prog.layouts.items():
            if name in values:  # a map kept in a token layout: the edit holds maps
                values[name] = layout_to_map(values[name], layout, res)
        fresh: dict[str, torch.Tensor] = {}  # key -> this record's value (on the device)
        for name in prog.statics:
            fresh[f"static__{name}"] = values[name]
        for nf in prog.norms:
            if nf.incremental:
                xg = values[nf.input].reshape(*values[nf.input].shape[:1], nf.num_groups, -1)
                xg = xg.double()
                fresh[f"norm__{nf.name}__s1"] = xg.sum(-1)
                fresh[f"norm__{nf.name}__s2"] = (xg * xg).sum(-1)
                continue
            fresh[f"norm__{nf.name}__scale"], fresh[f"norm__{nf.name}__shift"] = _fold_norm(
                nf, values)  # fmt: skip
        for i, kind in enumerate(prog.input_kinds):
            if kind != "const":
                fresh[f"input__{i}"] = flat[i]
        if prog.prelude_gm is not None:  # edit-invariant arithmetic, once per record
            held = SlotCache.holding(fresh)  # read on the device (the slot may be on the host)
            for name, value in zip(prog.hoisted, prog.prelude_gm(held), strict=True):
                fresh[f"static__{name}"] = value
        for name in prog.maps:
            if name in prog.private_maps:  # read only where this edit writes: no cache
                continue
            value = values[name]
            if self.config.channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            state.set_map(name, value)
        for key, value in fresh.items():
            state.set_buffer(key, value)
        state.set_outputs(list(outs))
        state.version += 1  # a prefetched copy of its old values is stale
        return list(outs)

    @torch.no_grad()
    def edit(self, *args, slot=0, mask=None, next_slot=None, **kwargs):
        """Run the model on edited inputs, recomputing only the edited region.

        Args:
            *args, **kwargs: the model's inputs, with the edited image(s).
            slot: which record to edit against.
            mask: optional bool ``[H, W]`` or ``[B, H, W]`` at the image's resolution; default:
                pixels where any channel changed by more than ``config.mask_eps``, dilated by
                ``config.mask_dilation``.
            next_slot: the slot edited next, if known: when its caches are on the host
                (``place``), their copy to the device starts while this edit runs.

        Returns:
            The model's output, in the model's own output type.
        """
        flat = self._flatten(args, kwargs)
        state = self._slot(slot)
        if not self.path.warmed:  # record(..., warmup=False): the first edit warms up
            self.warmup(slot)
            self._warmup_in_edit = True
        edit_mask = self._edit_mask(state, flat, mask)
        if next_slot is not None and str(next_slot) in self.slots:
            self.path.upcoming = (str(next_slot), self.slots[str(next_slot)])
        outs = self.path.run(str(slot), state, flat, edit_mask)
        outs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        return pytree.tree_unflatten(outs, self.program.out_spec)

    def commit(self, slot=0) -> None:
        """Make the last edit of ``slot`` its new original: the tiles it wrote are copied into
        the slot's caches (after an edit the dense model ran, the slot records it again).

        Raises:
            EditReplacedError: an edit of another slot replaced this slot's uncommitted edit.
        """
        state = self._slot(slot)
        with torch.no_grad():
            self.path.commit(str(slot), state, self._record_into)
        state.version += 1  # a prefetched copy of its old values is stale

    def _edit_mask(self, state: SlotCache, flat: list, mask) -> torch.Tensor:
        h, w = self.program.input_resolution
        if mask is None:
            m = None
            for i, kind in enumerate(self.program.input_kinds):
                if kind != "spatial":
                    continue
                rec = state.recorded_input(i).to(flat[i].device, non_blocking=True)
                d = difference_mask(rec, flat[i], self.config.mask_eps)
                d = d.any(0, keepdim=True)
                if tuple(d.shape[-2:]) != (h, w):
                    d = torch.nn.functional.interpolate(d[None].float(), size=(h, w))[0] > 0
                m = d if m is None else m | d
            return dilate(m, self.config.mask_dilation)
        if not isinstance(mask, torch.Tensor):
            raise MaskError(f"mask: expected a bool torch.Tensor [H, W], got {type(mask).__name__}")
        if mask.dim() not in (2, 3) or tuple(mask.shape[-2:]) != (h, w):
            raise MaskError(
                f"mask: expected shape [{h}, {w}] or [B, {h}, {w}] (the image input's "
                f"resolution), got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise MaskError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if mask.device.type == "meta":
            raise MaskError(
                "mask: a meta tensor has no values; pass a bool tensor with data (on any device: "
                "it is copied to the engine's)"
            )
        dev = self.program.image_meta[2]
        m = mask.to(dev)
        return (m[None] if m.dim() == 2 else m).any(0, keepdim=True)

    # -- reporting and moving ------------------------------------------------------------------

    def _last(self, slot):
        self._slot(slot)
        last = self.path.last if self.path is not None else None
        return last if last is not None and last.key == str(slot) else None

    def edit_footprint(self, slot=0) -> list[torch.Tensor | None]:
        """Per flat output: bool ``[H, W]`` of the pixels the last edit may have changed.

        Outside it the output equals the record bit for bit. ``None`` for an output the edit
        recomputes densely (or that is not a map).
        """
        last = self._last(slot)
        if last is None:
            raise NotRecordedError(f"slot {slot!r} has no edit yet: call engine.edit(...) first")
        out_node = next(n for n in reversed(self.edit_gm.graph.nodes) if n.op == "output")
        if last.ran_dense:  # the dense model ran
            return [None] * len(pytree.tree_leaves(out_node.args[0]))
        result = []
        for arg in pytree.tree_leaves(out_node.args[0]):
            name = arg.kwargs.get("name") if isinstance(arg, torch.fx.Node) else None
            if name is None or name not in self.program.maps:
                result.append(None)
                continue
            h, w = self.program.maps[name][0][-2:]
            ts = last.tiles[self.program.map_tiles[name]]
            cover = torch.zeros(h, w, dtype=torch.bool)
            bh, bw = ts.out_tile
            for y, x in ts.out_corners[: _count(ts)].tolist():
                cover[max(y, 0) : y + bh, max(x, 0) : x + bw] = True
            result.append(cover)
        return result

    def edit_tiles(self, slot=0) -> tuple[torch.Tensor, list[tuple[str, tuple, TileSet]]]:
        """The last edit of ``slot``: its mask (bool ``[1, H, W]`` at the image input's
        resolution) and the tile lists it computed, as ``(key, (h, w) of the map it writes,
        TileSet)``. No lists when the edit was empty or the dense model ran."""
        last = self._last(slot)
        if last is None:
            raise NotRecordedError(f"slot {slot!r} has no edit yet: call engine.edit(...) first")
        if last.tiles is None or last.empty or last.ran_dense:
            return last.mask, []
        res = {key: self.program.maps[name][0][-2:] for name, key in
               self.program.map_tiles.items() if name in self.program.maps}  # fmt: skip
        return last.mask, [(key, tuple(res[key]), ts) for key, ts in last.tiles.used().items()
                           if key in res]  # fmt: skip

    def stats(self, slot=0) -> dict:
        """MACs, active fractions, cache sizes and graphs of the last edit of ``slot``.

        Returns:
            dict with "dense_macs" (the dense model), "sparse_macs" (executed by the last edit:
            sparse convs on their computed tile rows, dense convs / linears / attention in full,
            cached values 0; 0 for an empty edit, which returns the record; None before the first
            edit), "macs_ratio" (dense / sparse; None without MACs),
            "active_fraction" ({"HxW": share of output pixels the sparse convs at that
            resolution computed}), "macs_by_resolution" ({"HxW" or "tokens": {"dense",
            "sparse"}}), "macs_by_op" (the same per op kind: "conv", "linear", "attention"),
            "cache_bytes" (this slot's caches), "live_bytes" (the engine's one working set),
            "dense_fallbacks" (node, op, reason), "rewrites" (pass counters), "tiles" (active
            tiles per tile list), "ran_dense", "size_class" (the static edit shape that ran),
            "graphs" (held, captured during warm-up, captured during edits: always 0) and
            "warmup" (what warm-up took).
        """
        prog = self.program
        state = self.slots[str(slot)] if str(slot) in self.slots else None
        last = self._last(slot) if state is not None else None
        counts, rows = {}, {}
        if last is not None:
            used = last.tiles.used()
            counts = {k: _count(ts) for k, ts in used.items()}
            rows = {k: ts.capacity for k, ts in used.items()}  # padding rows compute too
        spent = cost.executed(prog, rows)
        sparse = None
        if last is not None:
            sparse = 0 if last.empty else spent.dense if last.ran_dense else spent.sparse
        graphs = getattr(self.path, "graphs", None)
        return {
            "ran_dense": last is not None and last.ran_dense,
            "empty": last is not None and last.empty,
            "size_class": last.size_class if last is not None else None,
            "dense_macs": spent.dense,
            "sparse_macs": sparse,
            "macs_ratio": (spent.dense / sparse) if sparse else None,
            "active_fraction": spent.active_fraction if last is not None and not last.empty else {},
            "macs_by_resolution": spent.by_resolution,
            "macs_by_op": spent.by_op,
            "cache_bytes": state.nbytes() if state is not None else 0,
            "live_bytes": self.live.nbytes() if self.live is not None else 0,
            "cache": {"where": ("host" if state.on_host else "device") if state else None,
                      "device_bytes": self.cache_bytes("device"),
                      "host_bytes": self.cache_bytes("host"),
                      **(self.live.staging.stats() if self.live is not None else {})},
            "dense_fallbacks": [
                {"node": n, "op": op, "reason": why} for n, op, why in prog.fallbacks
            ],
            "rewrites": dict(prog.counters),
            "tiles": counts,
            "graphs": {
                "held": self.path.graph_count() if hasattr(self.path, "graph_count") else 0,
                "captured_in_warmup": graphs.captures if graphs is not None else 0,
                "captured_in_edits": graphs.edit_captures if graphs is not None else 0,
            },
            "warmup": dict(self.path.warmup_report or {}, ran_in_first_edit=self._warmup_in_edit)
            if self.path is not None else None,
        }  # fmt: skip

    def to(self, *args, **kwargs):
        """Move (and/or convert) weights and caches. The graphs and compiled parts are made
        again (warm-up at the next edit), since exported graphs bake devices and dtypes in."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if self._rebuild is not None:
            self._set_program(self._rebuild(device, dtype))
        holders = list(self.slots.values()) + ([self.live] if self.live is not None else [])
        for state in self.slots.values():
            state.on_host = False  # moved buffer by buffer: unpacked, all on ``device``
        if self.live is not None:
            self.live.staging.forget()
        for holder in holders:
            holder.to(device=device)
            if dtype is not None:
                for name, buf in holder._buffers.items():
                    if buf is not None and buf.is_floating_point():
                        holder._buffers[name] = buf.to(dtype)
        if self.live is not None:
            self.live.slot = None
            self.path = self._make_path()
        return self


def _count(ts: TileSet) -> int:
    return int(ts.num_active.item()) if ts.num_active is not None else int(ts.out_corners.shape[0])


def _same_const(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _fold_norm(nf, values) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample per-channel ``(scale, shift)`` [N, C] in fp32 of a folded normalisation."""
    x = values[nf.input].float()
    n, c = x.shape[:2]
    w = values[nf.weight].float() if nf.weight else torch.ones(c, device=x.device)
    b = values[nf.bias].float() if nf.bias else torch.zeros(c, device=x.device)
    if nf.kind == "group_norm":
        g = nf.num_groups
        xg = x.reshape(n, g, -1)
        var, mean = torch.var_mean(xg, dim=2, unbiased=False)  # [N, G]
        inv = torch.rsqrt(var + nf.eps).repeat_interleave(c // g, dim=1)  # [N, C]
        mean = mean.repeat_interleave(c // g, dim=1)
    else:
        mean = values[nf.running_mean].float()[None].expand(n, c)
        inv = torch.rsqrt(values[nf.running_var].float() + nf.eps)[None].expand(n, c)
    scale = inv * w[None]
    shift = b[None] - mean * scale
    return scale.contiguous(), shift.contiguous()


class _Recorder(torch.fx.Interpreter):
    """Runs the record graph and keeps the values of the named nodes."""

    def __init__(self, gm: torch.fx.GraphModule, keep: set[str]):
        super().__init__(gm)
        self.keep = keep
        self.kept: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n.name in self.keep:
            self.kept[n.name] = value
        return value
