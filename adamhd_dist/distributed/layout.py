"""Where whole layers live inside the flat tensors a sharding engine hands the optimizer.

ZeRO-1/2 and DeepSpeed's BF16 optimizer flatten each param group and give every rank one contiguous slice; ZeRO-3
packs every parameter's own partition into per-rank sub-group buffers. Either way the optimizer sees a few 1-D
fp32 tensors in which layer boundaries are gone. A :class:`FlatLayout` puts them back:

- a global, ordered table of layers (name, true numel, param group), identical on every rank, so per-layer
  vectors line up across ranks without any name exchange;
- for each flat tensor this rank owns, its fragments: ``(layer, start, numel)`` — which slice of the flat tensor
  holds which part of which layer (padding belongs to no fragment and is not an element of any layer);
- the reduction that sums a per-layer vector over the ranks that shard the layers (ONE collective).

The layout is geometry only; the per-layer state (μ) is the strategy's (``AdamHD.layer_state``).
:class:`FlatLayerStats` is the optimizer's layer-statistic strategy over a layout: it splits each flat tensor into
per-layer units and sums every layer's ``Σ|θ|`` over the ranks once per training step. Nothing here knows an
engine; the engine adapters (:mod:`adamhd_dist.integrations.deepspeed`) build layouts from the engine's own
bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..optim.layer_stats import LayerStats

__all__ = ["Fragment", "FlatLayout", "FlatLayerStats", "LayerState"]


@dataclass(frozen=True)
class Fragment:
    """``numel`` elements of layer ``layer`` (an index into :attr:`FlatLayout.names`): elements
    ``[offset, offset + numel)`` of the flattened layer sit at ``[start, start + numel)`` of a flat tensor."""

    layer: int
    start: int
    numel: int
    offset: int = 0


class FlatLayout:
    """Layers of an optimizer whose parameters are flat per-rank buffers.

    Args:
        names: every layer the optimizer updates, in an order that is the same on every rank.
        numels: the number of elements of each whole layer (the unsharded tensor; padding excluded).
        groups: the index of the optimizer param group each layer belongs to.
        fragments: ``{flat tensor: [Fragment, ...]}`` for the flat tensors this rank updates; a layer appears in
            at most one fragment per flat tensor, and a rank may hold no fragment of a layer at all.
        reduce: sums an fp64 ``(len(names),)`` vector over the ranks that shard the layers, in one collective;
            ``None`` when there is one rank.
        shapes: the shape of each whole layer (for gathering full tensors); default 1-D.
        engine_index: ``{flat tensor: its index in the engine's own list of flat tensors}`` (recorded in
            checkpoints so that a loader finds the matching fp32 partition in the engine's files).
    """

    def __init__(self, names: Sequence[str], numels: Sequence[int], groups: Sequence[int],
                 fragments: dict[Tensor, list[Fragment]], reduce: Callable[[Tensor], Tensor] | None,
                 shapes: Sequence[tuple[int, ...]] | None = None, engine_index: dict[Tensor, int] | None = None):
        if not (len(names) == len(numels) == len(groups)):
            raise ValueError("names, numels and groups must have one entry per layer")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if list(names).count(n) > 1})
            raise ValueError(f"layer names must be unique, repeated: {dup[:5]}")
        self.names = list(names)
        self.numels = [int(n) for n in numels]
        self.groups = [int(g) for g in groups]
        self.shapes = [tuple(int(d) for d in s) for s in shapes] if shapes is not None else [(n,) for n in self.numels]
        for name, n, shape in zip(self.names, self.numels, self.shapes):
            if math.prod(shape) != n:
                raise ValueError(f"layer {name!r}: shape {shape} does not hold {n} elements")
        self.index = {name: i for i, name in enumerate(self.names)}
        self.reduce = reduce
        self.fragments: dict[Tensor, list[Fragment]] = {}
        self._splits: dict[Tensor, tuple[list[int], list[int], Tensor]] = {}
        # (id(flat), role) -> (tensor, its address, its fragment views): see persistent_views
        self._view_cache: dict[tuple, tuple[Tensor, int, list[Tensor]]] = {}
        self.engine_index = dict(engine_index or {})
        # per-layer vectors live where the flat tensors do (no host round trip per step on a GPU)
        self.device = next(iter(fragments)).device if fragments else torch.device("cpu")
        for flat, frags in fragments.items():
            self.add_flat(flat, frags)

    def add_flat(self, flat: Tensor, frags: list[Fragment]) -> None:
        if flat.device != self.device:
            raise ValueError(f"all flat tensors of a layout must be on one device: {flat.device} vs {self.device}")
        if flat.dim() != 1:
            raise ValueError(f"a flat layout tensor must be 1-D, got shape {tuple(flat.shape)}")
        seen = set()
        for f in frags:
            if not (0 <= f.layer < len(self.names)):
                raise ValueError(f"fragment refers to layer {f.layer}, the layout has {len(self.names)}")
            if f.layer in seen:
                raise ValueError(f"layer {self.names[f.layer]!r} appears twice in one flat tensor")
            seen.add(f.layer)
            if f.numel <= 0 or f.start < 0 or f.start + f.numel > flat.numel():
                raise ValueError(f"fragment of {self.names[f.layer]!r} [{f.start}, {f.start + f.numel}) lies "
                                 f"outside its flat tensor of {flat.numel()} elements")
            if f.offset < 0 or f.offset + f.numel > self.numels[f.layer]:
                raise ValueError(f"fragment of {self.names[f.layer]!r} covers elements [{f.offset}, "
                                 f"{f.offset + f.numel}), the layer has {self.numels[f.layer]}")
        frags = sorted(frags, key=lambda f: f.start)
        for a, b in zip(frags, frags[1:]):
            if a.start + a.numel > b.start:
                raise ValueError(f"fragments of {self.names[a.layer]!r} and {self.names[b.layer]!r} overlap")
        self.fragments[flat] = frags
        # one split of the flat tensor into [gap, fragment, gap, fragment, ..., tail] gives every view in one call
        sizes, pick, at = [], [], 0
        for f in frags:
            if f.start > at:
                sizes.append(f.start - at)
            pick.append(len(sizes))
            sizes.append(f.numel)
            at = f.start + f.numel
        if flat.numel() > at:
            sizes.append(flat.numel() - at)
        self._view_cache.clear()
        self._splits[flat] = (sizes, pick, torch.tensor([f.layer for f in frags], dtype=torch.long,
                                                        device=flat.device))

    def __contains__(self, flat) -> bool:
        return flat in self.fragments

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def views(t: Tensor, frags: Sequence[Fragment]) -> list[Tensor]:
        flat = t.view(-1)
        return [flat.narrow(0, f.start, f.numel) for f in frags]

    def fragment_views(self, flat: Tensor, t: Tensor) -> list[Tensor]:
        """Views of ``t`` (``flat`` itself, its grad or a state tensor of its size) at every fragment of ``flat``,
        in fragment order."""
        sizes, pick, _ = self._splits[flat]
        parts = torch.split_with_sizes(t.view(-1), sizes)
        return [parts[i] for i in pick]

    def persistent_views(self, flat: Tensor, t: Tensor, role: str) -> list[Tensor]:
        """:meth:`fragment_views` of a tensor that lives from step to step (the flat parameter, its moments), kept
        while ``t`` is the same object at the same address: the views then see every in-place write. A tensor
        that is replaced (another object or address) gets new views, and :meth:`clear_views` (called when the
        optimizer loads a state) drops them all. Gradients, which engines may hand over anew each step, take
        :meth:`fragment_views`."""
        key = (id(flat), role)  # flat is one of this layout's tensors, kept alive by it: its id is stable
        hit = self._view_cache.get(key)
        if hit is not None and hit[0] is t and hit[1] == t.data_ptr():
            return hit[2]
        views = self.fragment_views(flat, t)
        self._view_cache[key] = (t, t.data_ptr(), views)
        return views

    def clear_views(self) -> None:
        self._view_cache.clear()

    def fragment_layers(self, flat: Tensor) -> Tensor:
        """int64 layer index of every fragment of ``flat``, in fragment order."""
        return self._splits[flat][2]

    def local_sums(self, layers: set[int] | None = None,
                   cache: dict[Tensor, tuple[Tensor, int, int]] | None = None) -> Tensor:
        """fp64 ``(L,)``: this rank's ``Σ|θ|`` of every layer (0 for layers it holds nothing of). ``cache`` maps a
        flat tensor to (Σ|θ| per fragment after its last update, version counter, address): used where the flat
        tensor is unchanged since; the rest is read afresh in one call."""
        from ..optim.stats import layer_abs_sums

        out = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        todo_views, todo_layers = [], []
        for flat, frags in self.fragments.items():
            if layers is not None:
                frags = [f for f in frags if f.layer in layers]
            if not frags:
                continue
            hit = cache.get(flat) if cache is not None else None
            if hit is not None and hit[1] == flat._version and hit[2] == flat.data_ptr() \
                    and hit[0].numel() == len(self.fragments[flat]):
                # sums of every fragment, needed or not: entries of layers without a statistic are never read
                out.index_add_(0, self.fragment_layers(flat), hit[0].detach().to(self.device, torch.float64))
                continue
            todo_views += self.views(flat.detach(), frags)
            todo_layers += [f.layer for f in frags]
        if todo_views:
            sums = layer_abs_sums(todo_views).to(self.device, torch.float64)
            out.index_add_(0, torch.tensor(todo_layers, dtype=torch.long, device=self.device), sums)
        return out

    def scatter_local(self, tensor_of: Callable[[Tensor], Tensor | None]) -> Tensor:
        """fp32 ``(Σ numel,)``: every layer's elements this rank holds, at their place in the concatenation of
        whole layers (in layout order), zeros elsewhere. ``tensor_of(flat)`` gives the flat tensor to read (the
        parameter itself, or a state tensor of the same layout) or None. Summing this over the ranks gives every
        layer whole: each element is held by exactly one rank."""
        starts = [0]
        for n in self.numels[:-1]:
            starts.append(starts[-1] + n)
        out = torch.zeros(sum(self.numels), dtype=torch.float32)
        for flat, frags in self.fragments.items():
            src = tensor_of(flat)
            if src is None:
                continue
            src = src.detach().reshape(-1)
            for f in frags:
                at = starts[f.layer] + f.offset
                out[at:at + f.numel] = src[f.start:f.start + f.numel].to("cpu", torch.float32)
        return out

    def split_layers(self, flat: Tensor) -> dict[str, Tensor]:
        """Inverse of the concatenation in :meth:`scatter_local`: {layer name: tensor of the layer's shape}."""
        out, at = {}, 0
        for name, n, shape in zip(self.names, self.numels, self.shapes):
            out[name] = flat[at:at + n].view(shape).clone()
            at += n
        return out

    def cuts(self) -> dict[int, list[tuple]]:
        """``{engine index (else position in this layout): [(layer name, start, numel, offset), ...]}``: how this
        rank's flat tensors cut the layers, comparable with :meth:`describe` of a saved state."""
        return {self.engine_index.get(flat, i): [(self.names[f.layer], f.start, f.numel, f.offset) for f in frags]
                for i, (flat, frags) in enumerate(self.fragments.items())}

    def describe(self, ordered_params: Sequence[Tensor]) -> dict[int, dict]:
        """``{i: {"engine_index", "numel", "fragments": [(layer name, start, numel, offset), ...]}}`` for the
        flat tensors among ``ordered_params`` (``i`` = position in that list, as in an optimizer state_dict)."""
        out = {}
        for i, p in enumerate(ordered_params):
            frags = self.fragments.get(p)
            if frags is None:
                continue
            out[i] = {"engine_index": self.engine_index.get(p), "numel": p.numel(),
                      "fragments": [(self.names[f.layer], f.start, f.numel, f.offset) for f in frags]}
        return out



class LayerState:
    """Per-layer state of an optimizer whose tensors hold parts of many layers (a flat strategy): μ of every layer
    by its index in the layout's table, the same on every rank, and δ at the latest step. Part of the optimizer's
    state (``state_dict()["layer_state"]``, by layer name: independent of how the layers are cut)."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        n = len(self.names)
        self.mu = torch.zeros(n, dtype=torch.float32, device=device)
        self.has_mu = torch.zeros(n, dtype=torch.bool, device=device)
        self.delta = torch.full((n,), float("nan"), dtype=torch.float32, device=device)  # δ at the latest step

    def advance(self, deltas: Tensor, mu: Tensor, has_mu: Tensor) -> None:
        self.delta.copy_(deltas)
        if mu is not self.mu:
            self.mu.copy_(mu)
        if has_mu is not self.has_mu:
            self.has_mu.copy_(has_mu)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{layer name: {"delta_ema": fp32 0-d}}`` for every layer that has a μ."""
        mu, has = self.mu.cpu(), self.has_mu.cpu()
        return {name: {"delta_ema": mu[i].clone()} for i, name in enumerate(self.names) if has[i]}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]], *, strict: bool = True) -> None:
        unknown = sorted(set(state) - set(self.index))
        if unknown and strict:
            raise ValueError(f"checkpoint has layer state for {len(unknown)} layer(s) this model does not have, "
                             f"e.g. {unknown[:3]}")
        self.mu.zero_()
        self.has_mu.zero_()
        for name, st in state.items():
            i = self.index.get(name)
            if i is None or "delta_ema" not in st:
                continue
            self.mu[i] = torch.as_tensor(st["delta_ema"], dtype=torch.float32).reshape(())
            self.has_mu[i] = True
        self.delta.fill_(float("nan"))


def check_saved_layout(saved: dict | None, layout: FlatLayout) -> None:
    """A state saved over flat partitions holds each partition's moments: it loads only where the layers are cut
    the same way (a checkpoint of another world size goes through the engine adapter, which reshards it). The
    partitions are matched by their index in the engine's own list (independent of what the param groups hold at
    the moment: ZeRO-3 empties them between its sub-group steps)."""
    if saved is None:
        return

    def norm(frags):
        return [tuple(f) for f in frags]

    then = {v["engine_index"] if v.get("engine_index") is not None else int(k): norm(v["fragments"])
            for k, v in saved.items()}
    if then != layout.cuts():
        raise ValueError(
            "this optimizer state was saved over flat partitions that cut the layers differently (another world "
            "size, ZeRO stage or bucket setting): its moments would land on the wrong elements. Load it with "
            "engine.load_checkpoint after adamhd_dist.deepspeed.attach(engine), which reshards it, or read it with "
            "`python -m adamhd_dist.deepspeed export`")


class FlatLayerStats(LayerStats):
    """The layer-statistic strategy over a :class:`FlatLayout`: each flat tensor the optimizer steps is split into
    its fragments (views, one per layer piece, each with its layer's δ), and every layer's ``Σ|θ|`` is summed over
    the ranks once per training step (:meth:`begin_step`, through ``AdamHD.begin_step``, which the engine adapter
    calls before the engine's per-group or per-sub-group inner steps). μ of every layer is kept here, by layer
    (:attr:`layer_state`), so it is independent of how the layers are cut."""

    flat = True

    def __init__(self, layout: FlatLayout):
        super().__init__()
        if not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
        self.layout = layout
        self.layer_state: LayerState | None = None
        # one training step: (reduced Σ|θ| per layer, δ setting per layer) from begin_step(), and the δ per layer
        # once the first inner step computed it
        self._pending = None
        self._layer_delta = None

    def bind(self, optimizer, previous: LayerStats | None = None) -> None:
        loaded = (previous if previous is not None and previous is not self else self)._loaded
        if loaded is not None:  # a checkpoint loaded before the layout was known: refused before anything changes
            check_saved_layout(loaded[1], self.layout)
        super().bind(optimizer, previous)
        self._loaded = None
        self._pending, self._layer_delta = None, None
        if self.layer_state is None:
            self.layer_state = LayerState(self.layout.names, self.layout.device)
        if loaded is not None:
            self.layer_state.load_state_dict(loaded[0], strict=False)

    def eager_params(self) -> list[Tensor]:
        # engines map and checkpoint the state of their partitions before the first step
        return list(self.layout.fragments)

    def places(self, p: Tensor) -> bool:
        return p in self.layout

    def undo_point(self):
        table, pending, layer_delta = self.layer_state, self._pending, self._layer_delta
        saved = (table.mu.clone(), table.has_mu.clone(), table.delta.clone())

        def restore():
            table.mu.copy_(saved[0])
            table.has_mu.copy_(saved[1])
            table.delta.copy_(saved[2])
            self._pending, self._layer_delta = pending, layer_delta
        return restore

    def _layer_settings(self):
        from ..optim.stats import delta_setting

        per_group = [delta_setting(g) for g in self.optimizer.param_groups]
        return [per_group[g] for g in self.layout.groups]

    @torch.no_grad()
    def begin_step(self) -> None:
        """Sum this rank's part of every layer's ``Σ|θ|`` over the ranks in ONE collective; μ moves only when the
        optimizer's step runs (a step the engine skips, on fp16 overflow, leaves it untouched)."""
        settings = self._layer_settings()
        need = {i for i, st in enumerate(settings) if st is not None and st.needs_statistic}
        sums = self.layer_sums(None if len(need) == len(settings) else need) if need else None
        self._pending = (sums, settings)
        self._layer_delta = None

    @torch.no_grad()
    def deltas(self, work) -> list:
        """δ per layer for this training step (computed, and μ advanced, on the first inner step after
        :meth:`begin_step`), for every decayed group of ``work`` (None for the others)."""
        from ..optim.stats import advance_deltas, delta_setting

        if self._pending is None:
            if self._layer_delta is None:
                raise RuntimeError("AdamHD has a flat layout but begin_step() was not called before step(): step "
                                   "it through its engine (adamhd_dist.deepspeed.attach or initialize)")
        else:
            sums, settings = self._pending
            self._pending = None
            table = self.layer_state
            deltas, new_mu, new_has = advance_deltas(settings, sums, self.layout.numels, table.mu, table.has_mu)
            table.advance(deltas, new_mu, new_has)
            self._layer_delta = deltas
        return [self._layer_delta if delta_setting(group) is not None else None for group, _, _ in work]

    def layer_sums(self, layers: set[int] | None = None) -> Tensor:
        """fp64 ``(L,)``: every layer's whole ``Σ|θ|`` (only ``layers`` filled when given), in ONE collective."""
        sums = self.layout.local_sums(layers, self._sums)
        return self.layout.reduce(sums) if self.layout.reduce is not None else sums

    def remember(self, p: Tensor, sums: Tensor) -> None:
        self._sums[p] = (sums, p._version, p.data_ptr())

    def invalidate(self) -> None:
        super().invalidate()
        self.layout.clear_views()

    def units(self, group, ps, states, steps, delta):
        """A decayed group's flat tensors replaced by their layer fragments (views), each with its layer's δ;
        ``owners`` = ``[(flat, number of fragments)]`` in order. Other groups step their tensors whole."""
        if delta is None:
            return super().units(group, ps, states, steps, None)
        lay = self.layout
        out_p, out_g, out_m, out_v, out_t, out_d, owners = [], [], [], [], [], [], []
        out_vmax = [] if group["amsgrad"] else None
        for p, st, t in zip(ps, states, steps):
            frags = lay.fragments.get(p)
            if frags is None:
                raise RuntimeError(f"a tensor of {p.numel()} elements in a decayed param group is not in the "
                                   f"optimizer's flat layout")
            out_p += lay.persistent_views(p, p, "param")
            out_g += lay.fragment_views(p, p.grad)
            out_m += lay.persistent_views(p, st["exp_avg"], "exp_avg")
            out_v += lay.persistent_views(p, st["exp_avg_sq"], "exp_avg_sq")
            if out_vmax is not None:
                out_vmax += lay.persistent_views(p, st["max_exp_avg_sq"], "max_exp_avg_sq")
            out_t += [t] * len(frags)
            out_d.append(delta[lay.fragment_layers(p)])
            owners.append((p, len(frags)))
        device = out_p[0].device if out_p else ps[0].device
        ds = torch.cat(out_d).to(device) if out_d else torch.zeros(0, device=device)
        return out_p, out_g, out_m, out_v, out_vmax, out_t, ds, owners

    def record(self, owners, sums: Tensor) -> None:
        if owners and isinstance(owners[0], tuple):
            for (p, n), chunk in zip(owners, sums.split([n for _, n in owners])):
                self.remember(p, chunk)
        else:
            super().record(owners, sums)

    def state_dict(self, params: list[Tensor]) -> dict:
        """``"layer_state"`` ({layer name: {"delta_ema": μ}}) and ``"flat_layout"`` (which elements of which layer
        each saved flat tensor holds, so that a checkpoint can be loaded at another world size)."""
        return {"layer_state": self.layer_state.state_dict(), "flat_layout": self.layout.describe(params)}

    def check_saved(self, layer_state, saved_layout) -> None:
        if layer_state is not None or saved_layout is not None:
            check_saved_layout(saved_layout, self.layout)

    def load_state_dict(self, layer_state, saved_layout) -> None:
        self._placed = {}
        self.invalidate()
        self._pending, self._layer_delta = None, None
        if layer_state is not None or saved_layout is not None:
            self.layer_state.load_state_dict(layer_state or {}, strict=False)
