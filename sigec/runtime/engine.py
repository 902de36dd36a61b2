"""SparseEngine: record / edit / commit over a compiled ``Program``, one cache slot per key.

How an edit flows (see docs/how-it-works.md):
1. inputs are checked against the compiled example (shape, dtype, device, structure) and the
   non-image inputs against the slot's record (a different timestep or prompt is a stale cache);
2. the edit mask is taken as given or computed as ``|edited - recorded| > mask_eps`` (any
   channel), dilated by ``mask_dilation``;
3. the tiles the previous edit wrote are restored from the cache (one ``RestoreBatch`` launch):
   every working map equals the record again, in O(previously active) work;
4. the edit graph runs: sparse ops gather, compute and scatter their active tiles into the working
   maps; dense ops run on full maps;
5. ``commit`` swaps working maps and caches (no copy): the edit becomes the new original.

Host synchronisation on the edit path: tile lists are built with ``nonzero`` (one sync per tile
list) unless the caller asks for fixed capacities; the exact policy also reads mask emptiness.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from sigec.errors import InputMismatchError, MaskError, NotRecordedError
from sigec.kernels.restore import RestoreBatch
from sigec.runtime import ops
from sigec.runtime.graphs import GraphedEdits
from sigec.runtime.inputs import flatten_call, raise_if_stale
from sigec.runtime.masks import TileSet, difference_mask, dilate
from sigec.runtime.ops import layout_to_map
from sigec.runtime.program import Program
from sigec.runtime.tiles import TileTable, edit_masks


class SlotState(torch.nn.Module):
    """One slot's caches as registered buffers (they move with ``.to()`` and show in the repr).

    Buffers: ``cache__<map>`` / ``work__<map>`` per sparse map, ``static__<node>`` per cached
    value, ``norm__<node>__scale`` / ``__shift`` per folded normalisation, ``input__<i>`` per
    recorded input tensor.
    """

    def __init__(self):
        super().__init__()
        self.dirty: dict[str, TileSet] = {}
        self.map_names: list[str] = []
        self.last_tiles: TileTable | None = None
        self.pending_inputs: dict[int, torch.Tensor] | None = None
        self.written: dict[str, TileSet] = {}  # this edit: map -> the tiles its op wrote
        self.norm_inputs: dict[str, str] = {}  # incremental norm -> its input node
        self.pending_norm_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs = None  # GraphedEdits, with SparseConfig(cuda_graphs=True)

    def add_map(self, name: str, value: torch.Tensor, private: bool = False) -> None:
        """A working map and (unless ``private``: read only where this edit writes) its cache."""
        if not private:
            self.register_buffer(f"cache__{name}", value.detach().clone())
            self.map_names.append(name)
        self.register_buffer(f"work__{name}", value.detach().clone())

    def set_map(self, name: str, value: torch.Tensor, private: bool = False) -> None:
        """Cache and working map of ``name`` := ``value`` (new buffers, or copied in place)."""
        if not self.has_map(name):
            self.add_map(name, value, private)
            return
        if not private:
            self.cache(name).copy_(value)
        self.work(name).copy_(value)

    def set_buffer(self, key: str, value: torch.Tensor) -> None:
        """Buffer ``key`` := ``value`` (registered if new, copied in place otherwise)."""
        if key in self._buffers:
            self._buffers[key].copy_(value)
        else:
            self.register_buffer(key, value.detach().clone())

    def has_map(self, name: str) -> bool:
        return f"work__{name}" in self._buffers

    def note_written(self, name: str, tiles: TileSet) -> None:
        self.written[name] = tiles

    def norm_input(self, name: str) -> str:
        return self.norm_inputs[name]

    def norm_sums(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Recorded (or committed) per-group sum and sum of squares, fp64 [N, G]."""
        return self._buffers[f"norm__{name}__s1"], self._buffers[f"norm__{name}__s2"]

    def work(self, name: str) -> torch.Tensor:
        return self._buffers[f"work__{name}"]

    def cache(self, name: str) -> torch.Tensor:
        return self._buffers[f"cache__{name}"]

    def static(self, name: str) -> torch.Tensor:
        return self._buffers[f"static__{name}"]

    def norm(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._buffers[f"norm__{name}__scale"], self._buffers[f"norm__{name}__shift"]

    def recorded_input(self, i: int) -> torch.Tensor:
        return self._buffers[f"input__{i}"]

    def restore_dirty(self) -> None:
        """Make every working map equal to its cache again, touching only the dirtied tiles."""
        RestoreBatch([(self.work(name), self.cache(name), ts.out_corners, ts.num_active,
                       *ts.out_tile) for name, ts in self.dirty.items()])()  # fmt: skip
        self.dirty = {}

    def swap(self) -> None:
        for name in self.map_names:
            c, w = f"cache__{name}", f"work__{name}"
            self._buffers[c], self._buffers[w] = self._buffers[w], self._buffers[c]
        for name, (s1, s2) in self.pending_norm_sums.items():
            self._buffers[f"norm__{name}__s1"], self._buffers[f"norm__{name}__s2"] = s1, s2
        self.pending_norm_sums = {}

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class SparseEngine(torch.nn.Module):
    """An incremental version of a model: ``record`` once, then ``edit`` many times.

    Built by ``sigec.compile``; see its docstring for the call signatures.
    """

    def __init__(self, program: Program, config, rebuild: Callable | None = None):
        super().__init__()
        self.config = config
        self._rebuild = rebuild
        self._set_program(program)
        self.slots = torch.nn.ModuleDict()

    def dense_callable(self):
        """The dense model as the cost model runs it: the captured graph, compiled by inductor
        on CUDA when ``config.dense_backend == "inductor"`` (compiled once, on first use)."""
        if self._dense_fn is None:
            fn = self.record_gm
            on_cuda = self.program.example_meta[self.program.input_kinds.index("spatial")][2]
            if self.config.dense_backend == "inductor" and torch.device(on_cuda).type == "cuda":
                fn = torch.compile(self.record_gm)
            self._dense_fn = fn
        return self._dense_fn

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

    def _slot(self, slot) -> SlotState:
        key = str(slot)
        if key not in self.slots:
            raise NotRecordedError(
                f"slot {slot!r} has no record: call engine.record(...) with the original inputs "
                "(and slot=...) before edit or commit"
            )
        return self.slots[key]

    def _check_not_stale(self, state: SlotState, flat: list) -> None:
        names, changed = self._stale_flags(state, flat)
        if changed is not None:
            raise_if_stale(names, changed.tolist())

    def _stale_flags(self, state: SlotState, flat: list):
        """(input names, bool tensor on the device: which non-image tensor inputs differ from
        the recorded ones), without a host sync; (names, None) if there are none."""
        names, flags = [], []
        for i, kind in enumerate(self.program.input_kinds):
            if kind != "tensor":
                continue
            rec = state.recorded_input(i)
            v = flat[i].to(rec.dtype)
            same = (v == rec).all() if v.shape == rec.shape else torch.zeros((), dtype=torch.bool)
            names.append(self.program.input_names[i])
            flags.append(~same.to(rec.device))
        return names, (torch.stack(flags) if flags else None)

    # -- record / edit / commit ----------------------------------------------------------------

    @torch.no_grad()
    def record(self, *args, slot=0, **kwargs):
        """Run the model densely on the original inputs and fill this slot's caches.

        Returns:
            The model's output, in the model's own output type.
        """
        flat = self._flatten(args, kwargs)
        state = SlotState()
        outs = self._record_into(state, flat)
        self.slots[str(slot)] = state
        return pytree.tree_unflatten(list(outs), self.program.out_spec)

    def _record_into(self, state: SlotState, flat: list) -> list:
        """Run the record graph on ``flat`` and fill ``state``'s buffers: registered if new,
        overwritten in place otherwise (CUDA graphs hold their addresses)."""
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
        for name in prog.maps:
            value = values[name]
            if self.config.channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            state.set_map(name, value, name in prog.private_maps)
        for name in prog.statics:
            state.set_buffer(f"static__{name}", values[name])
        for nf in prog.norms:
            if nf.incremental:
                xg = values[nf.input].reshape(*values[nf.input].shape[:1], nf.num_groups, -1)
                xg = xg.double()
                state.set_buffer(f"norm__{nf.name}__s1", xg.sum(-1))
                state.set_buffer(f"norm__{nf.name}__s2", (xg * xg).sum(-1))
                state.norm_inputs[nf.name] = nf.input
                continue
            scale, shift = _fold_norm(nf, values)
            state.set_buffer(f"norm__{nf.name}__scale", scale)
            state.set_buffer(f"norm__{nf.name}__shift", shift)
        for i, kind in enumerate(prog.input_kinds):
            if kind != "const":
                state.set_buffer(f"input__{i}", flat[i])
        if prog.prelude_gm is not None:  # edit-invariant arithmetic, once per record
            for name, value in zip(prog.hoisted, prog.prelude_gm(state), strict=True):
                state.set_buffer(f"static__{name}", value)
        return list(outs)

    @torch.no_grad()
    def edit(self, *args, slot=0, mask=None, **kwargs):
        """Run the model on edited inputs, recomputing only the edited region.

        Args:
            *args, **kwargs: the model's inputs, with the edited image(s).
            slot: which record to edit against.
            mask: optional bool ``[H, W]`` or ``[B, H, W]`` at the image's resolution; default:
                pixels where any channel changed by more than ``config.mask_eps``, dilated by
                ``config.mask_dilation``.

        Returns:
            The model's output, in the model's own output type.
        """
        flat = self._flatten(args, kwargs)
        state = self._slot(slot)
        edit_mask = self._edit_mask(state, flat, mask)
        if self.config.cuda_graphs:  # the stale check rides on the edit's one host sync
            if state.graphs is None:
                state.graphs = GraphedEdits(self, state)
            outs = state.graphs.run(flat, edit_mask)
            return self._finish_edit(state, flat, outs)
        self._check_not_stale(state, flat)
        state.restore_dirty()
        state.written, state.pending_norm_sums = {}, {}
        masks = edit_masks(self.program, edit_mask, self.config.mask_threshold,
                           self.config.mask_level_dilation)  # fmt: skip
        tiles = TileTable(self.program, masks, pad_to_grid=self.config.tile_lists == "grid")
        outs = self.edit_gm(state, tiles, *flat)
        state.dirty = {
            name: tiles[key]
            for name, key in self.program.map_tiles.items()
            if key in tiles.used() and name in self.program.maps
            and name not in self.program.private_maps
        }  # fmt: skip
        state.last_tiles = tiles
        return self._finish_edit(state, flat, outs)

    def _finish_edit(self, state, flat, outs):
        state.pending_inputs = {
            i: flat[i] for i, k in enumerate(self.program.input_kinds) if k == "spatial"
        }
        outs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        return pytree.tree_unflatten(outs, self.program.out_spec)

    def commit(self, slot=0) -> None:
        """Make the last edit of ``slot`` its new original (no copy: caches and maps swap)."""
        state = self._slot(slot)
        if state.pending_inputs is None:
            return
        if state.graphs is not None and state.graphs.ran_dense:
            # the last edit ran the dense model: record its inputs again, in place
            self._record_into(state, state.graphs.static_inputs)
            state.graphs.forget_dirty()
        elif state.graphs is not None:
            state.graphs.commit()  # graphs hold buffer addresses: copy, never swap
        else:
            state.swap()
        for i, value in state.pending_inputs.items():
            state.recorded_input(i).copy_(value)
        state.pending_inputs = None

    def _edit_mask(self, state: SlotState, flat: list, mask) -> torch.Tensor:
        h, w = self.program.input_resolution
        if mask is None:
            m = None
            for i, kind in enumerate(self.program.input_kinds):
                if kind != "spatial":
                    continue
                d = difference_mask(state.recorded_input(i), flat[i], self.config.mask_eps)
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
        dev = self.program.example_meta[self.program.input_kinds.index("spatial")][2]
        m = mask.to(dev)
        return (m[None] if m.dim() == 2 else m).any(0, keepdim=True)

    # -- reporting and moving ------------------------------------------------------------------

    def edit_footprint(self, slot=0) -> list[torch.Tensor | None]:
        """Per flat output: bool ``[H, W]`` of the pixels the last edit may have changed.

        Outside it the output equals the record bit for bit. ``None`` for an output the edit
        recomputes densely (or that is not a map).
        """
        state = self._slot(slot)
        if state.last_tiles is None:
            raise NotRecordedError(f"slot {slot!r} has no edit yet: call engine.edit(...) first")
        out_node = next(n for n in reversed(self.edit_gm.graph.nodes) if n.op == "output")
        if state.graphs is not None and state.graphs.ran_dense:  # the dense model ran
            return [None] * len(pytree.tree_leaves(out_node.args[0]))
        result = []
        for arg in pytree.tree_leaves(out_node.args[0]):
            name = arg.kwargs.get("name") if isinstance(arg, torch.fx.Node) else None
            if name is None or name not in self.program.maps:
                result.append(None)
                continue
            h, w = self.program.maps[name][0][-2:]
            ts = state.last_tiles[self.program.map_tiles[name]]
            cover = torch.zeros(h, w, dtype=torch.bool)
            bh, bw = ts.out_tile
            for y, x in ts.out_corners[: _count(ts)].tolist():
                cover[max(y, 0) : y + bh, max(x, 0) : x + bw] = True
            result.append(cover)
        return result

    def stats(self, slot=0) -> dict:
        """MACs, active fractions and cache sizes of the last edit of ``slot``.

        Returns:
            dict with "dense_macs" (the dense model), "sparse_macs" (executed by the last edit:
            sparse convs on their active tiles, dense convs / linears / attention in full, cached
            values 0; None before the first edit), "macs_ratio" (dense / sparse), "active_fraction"
            ({"HxW": share of output pixels the sparse convs at that resolution computed}),
            "macs_by_resolution" ({"HxW" or "tokens": {"dense", "sparse"}}), "macs_by_op" (the
            same per op kind: "conv", "linear", "attention"),
            "cache_bytes" (this slot), "dense_fallbacks" (node, op, reason), "rewrites" (pass
            counters), "tiles" (active tiles per tile list).
        """
        prog = self.program
        state = self.slots[str(slot)] if str(slot) in self.slots else None
        tiles = state.last_tiles if state is not None else None
        dense = sum(e.dense for e in prog.macs)
        ran_dense = state is not None and state.graphs is not None and state.graphs.ran_dense
        sparse = None
        frac: dict[str, list[float]] = {}
        by_res: dict[str, list[int]] = {}  # "HxW" (or "tokens") -> [dense, executed]
        by_op: dict[str, list[int]] = {}  # "conv", "linear", "attention" -> [dense, executed]
        counts = {}
        if tiles is not None:
            counts = {k: _count(ts) for k, ts in tiles.used().items()}
            rows = {k: ts.capacity for k, ts in tiles.used().items()}  # padding rows compute too
            sparse = 0
            for e in prog.macs:
                key = f"{e.resolution[0]}x{e.resolution[1]}" if e.resolution else "tokens"
                done = 0
                if e.mode == "dense":
                    done = e.dense
                elif e.mode == "sparse":
                    req = prog.tile_requests[e.tile_key]
                    n = e.dense // (e.per_pixel * e.resolution[0] * e.resolution[1])
                    px = rows.get(e.tile_key, 0) * req.tile[0] * req.tile[1]
                    done = n * px * e.per_pixel
                    covered = min(px, e.resolution[0] * e.resolution[1])
                    frac.setdefault(key, []).append(covered / (e.resolution[0] * e.resolution[1]))
                sparse += done
                for table, k in ((by_res, key), (by_op, e.op)):
                    row = table.setdefault(k, [0, 0])
                    row[0] += e.dense
                    row[1] += done
        if ran_dense:  # the cost model ran the dense model for this edit
            sparse = dense
        return {
            "ran_dense": ran_dense,
            "dense_macs": dense,
            "sparse_macs": sparse,
            "macs_ratio": (dense / sparse) if sparse else None,
            "active_fraction": {k: sum(v) / len(v) for k, v in frac.items()},
            "macs_by_resolution": {k: {"dense": d, "sparse": x} for k, (d, x) in by_res.items()},
            "macs_by_op": {k: {"dense": d, "sparse": x} for k, (d, x) in by_op.items()},
            "cache_bytes": state.nbytes() if state is not None else 0,
            "dense_fallbacks": [
                {"node": n, "op": op, "reason": why} for n, op, why in prog.fallbacks
            ],
            "rewrites": dict(prog.counters),
            "tiles": counts,
        }

    def to(self, *args, **kwargs):
        """Move (and/or convert) weights and caches. The graphs are captured again for the new
        device and dtype, since exported graphs bake devices and dtypes into some ops."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if self._rebuild is not None:
            self._set_program(self._rebuild(device, dtype))
        for state in self.slots.values():
            state.graphs = None  # captured for the old buffers: captured again on next edit
            state.to(device=device)
            if dtype is not None:
                for name, buf in state._buffers.items():
                    if buf is not None and buf.is_floating_point():
                        state._buffers[name] = buf.to(dtype)
            state.dirty = {k: _move_tiles(v, device) for k, v in state.dirty.items()}
        return self


def _count(ts: TileSet) -> int:
    return int(ts.num_active.item()) if ts.num_active is not None else int(ts.out_corners.shape[0])


def _move_tiles(ts: TileSet, device) -> TileSet:
    if device is None:
        return ts
    na = ts.num_active.to(device) if ts.num_active is not None else None
    return TileSet(ts.out_corners.to(device), ts.in_corners.to(device), ts.out_tile, ts.in_tile,
                   na)  # fmt: skip


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
