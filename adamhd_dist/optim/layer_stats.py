"""The layer-statistic strategy: the one thing sharding changes for AdamHD, handed to the optimizer as an object.

δ needs, per layer (one original, unsharded parameter tensor), ``Σ|θ|`` over the WHOLE layer and its true numel.
Which tensors the optimizer updates, which layer each belongs to, and how partial sums become whole-layer sums
depend on how the model is sharded, and so does where per-layer state (μ) lives. The optimizer asks its
:class:`LayerStats` for all of it through the calls its docstring lists, and knows no sharding itself; every
strategy computes δ through the one function :func:`adamhd_dist.optim.stats.advance_deltas`. Strategies:

- :class:`LayerStats` (this module, the default): every parameter is a whole layer on this process;
- ``DTensorLayerStats`` (:mod:`adamhd_dist.distributed.dtensor`): DTensor parameters (FSDP2, HSDP, TP); the
  local shards are updated and the sums are reduced over the sharded mesh dimensions in one collective;
- ``FlatLayerStats`` (:mod:`adamhd_dist.distributed.layout`): flat per-rank buffers that hold parts of many
  layers (DeepSpeed ZeRO); the sums of every layer are reduced once per training step.

A strategy also says which tensors it can *place*, and refuses to let the optimizer step a tensor that needs a
statistic and that nobody can place (:class:`UnplacedTensorError`): that is how a per-shard statistic would
otherwise be computed silently (a ZeRO partition handed to the optimizer by an engine it was not attached to). The
default strategy also refuses FSDP1's flat-parameter views (``_fsdp_flattened``), the one engine mark it reads.

This module imports no engine: the DTensor strategy is found through :func:`register_auto_strategy`, which the
package root fills in (``adamhd_dist/__init__.py``), so the optimizer sets it up by itself when DTensor parameters
appear, also when an engine swaps them into its param groups in place (Accelerate's FSDP2 ``prepare``).
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable

import torch
from torch import Tensor

__all__ = ["LayerStats", "UnplacedTensorError", "register_auto_strategy", "auto_strategy", "FSDP1_MESSAGE",
           "is_dtensor"]

FSDP1_MESSAGE = (
    "AdamHD does not support FSDP1 (FullyShardedDataParallel): it hands the optimizer 1-D slices of a flat "
    "buffer, and a parameter with no elements on a rank has no gradient and no optimizer state there, so the "
    "ranks disagree on the list of layers whose statistic must be reduced together, and the per-layer state "
    "(μ) is missing on some ranks. Shard the model with FSDP2 instead: "
    "torch.distributed.fsdp.fully_shard, or adamhd_dist.fsdp.apply_fsdp(model) for a transformers model; "
    "AdamHD then computes the exact per-layer δ over the DTensor shards.")

UNPLACED_FIXES = (
    "- DeepSpeed (your own deepspeed.initialize, or Accelerate's DeepSpeed plugin): call "
    "adamhd_dist.deepspeed.attach(engine) once after it, or build the engine with "
    "adamhd_dist.deepspeed.initialize;\n"
    "- the transformers Trainer: pass callbacks=[adamhd_dist.integrations.transformers.AdamHDCallback()];\n"
    "- another engine that flattens or copies parameters: describe its buffers with a FlatLayout and "
    "opt.set_layer_stats(FlatLayerStats(layout)) (adamhd_dist.distributed.layout).")


class UnplacedTensorError(RuntimeError):
    """AdamHD was asked to step a tensor that needs a per-layer statistic and that it cannot place in a layer."""


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (or a subclass). Nothing is imported: no tensor can
    be a DTensor before ``torch.distributed.tensor`` is loaded, so the optimizer core never loads it itself."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real view (real and imaginary parts as two coordinates), as torch.optim steps it."""
    return torch.view_as_real(t) if t.is_complex() else t


def _refuse_fsdp1(p: Tensor, error: type[Exception]) -> None:
    """Raise ``error`` with :data:`FSDP1_MESSAGE` for a view into an FSDP1 flat parameter (the one engine mark the
    default strategy reads)."""
    if getattr(p, "_fsdp_flattened", False):
        raise error(f"params: {FSDP1_MESSAGE}")


def _unplaced(optimizer, group, p: Tensor, why: str) -> UnplacedTensorError:
    gi = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    return UnplacedTensorError(
        f"AdamHD was asked to step a tensor of shape {tuple(p.shape)} ({p.numel():,} elements) in param group "
        f"{gi}: {why}, so it cannot compute that layer's Huber threshold δ (delta_mode={group['delta_mode']!r} "
        f"needs each layer's mean |θ| over the whole layer). This is what an engine that flattens or partitions "
        f"parameters hands the optimizer (DeepSpeed ZeRO, its BF16 optimizer). Fix:\n{UNPLACED_FIXES}")


class LayerStats:
    """Every parameter is a whole layer on this process (no sharding): local tensors, local sums, no collective.

    The optimizer asks its strategy everything that depends on where the layers are, through these calls (in the
    order of a step); subclasses override the geometry (:meth:`local`, :meth:`layer_numel`, :meth:`places`), the
    reduction (:meth:`reduce`) and, for a flat layout (``flat = True``), the per-layer units and state:

    - :meth:`bind` when set (taking over what the previous strategy knew), :meth:`admit` per new param group;
    - :meth:`check_group` (what a step of the group refuses), :meth:`check_placement` (the tensors about to be
      stepped can be placed in layers), :meth:`undo_point` (what to put back if the step raises);
    - :meth:`begin_step` (engines, once per training step), :meth:`deltas` (δ of every layer, μ advanced),
      :meth:`units` (the tensors the functional core updates), :meth:`record` (the update's by-product ``Σ|θ|``);
    - :meth:`state_dict` / :meth:`check_saved` / :meth:`load_state_dict` (the strategy's part of the optimizer
      state), :meth:`invalidate`.

    The by-product cache is shared: the fused update emits ``Σ|θ|`` of what it stores, and the next step reuses it
    while the tensor is provably unchanged (same version counter and address).
    """

    #: True when the optimizer's tensors are flat buffers holding parts of many layers (see FlatLayerStats).
    flat = False
    #: the per-layer state of a flat strategy (``AdamHD.layer_state``), else None
    layer_state = None

    def __init__(self):
        self.optimizer = None
        # tensor -> (Σ|θ| per unit after its last update, version counter and address of the updated tensor)
        self._sums: dict[Tensor, tuple[Tensor, int, int]] = {}
        # the tensors the optimizer was given: id -> (weakref, shape), and per param group (by index) the shapes it
        # was given in order: all, and those an engine optimizes (trainable, not empty)
        self._given: dict[int, tuple[weakref.ref, tuple]] = {}
        self._given_shapes: dict[int, tuple[list, list]] = {}
        # param group index -> (ids, whether it needs the statistic, shapes, the tensors) placed at its last step
        self._placed: dict[int, tuple] = {}
        # (layer state, flat layout) of a checkpoint loaded before a flat strategy was set
        self._loaded = None

    def bind(self, optimizer, previous: "LayerStats | None" = None) -> None:
        """Called by the optimizer when the strategy is set (validate against its param groups here; raise before
        changing anything). Takes over from ``previous``
        which tensors the optimizer was given and a checkpoint's per-layer state not yet placed."""
        self.optimizer = optimizer
        if previous is not None and previous is not self:
            self._given, self._given_shapes, self._loaded = previous._given, previous._given_shapes, previous._loaded
        self._placed = {}

    def given_state(self) -> tuple[list, list]:
        """Which tensors the optimizer was given, by position (``[[index in group, ...] per group]``), and the
        shapes given per group: what a copy or pickle of the optimizer keeps (weak references do not survive it)."""
        groups = self.optimizer.param_groups
        return ([[j for j, p in enumerate(g["params"]) if self._is_given(p)] for g in groups],
                [self._given_shapes.get(i) for i in range(len(groups))])

    def restore_given(self, saved: tuple[list, list] | None) -> None:
        """The inverse of :meth:`given_state`, on the copy (whose DTensor parameters then set the DTensor
        strategy)."""
        if saved is None:
            return
        groups = self.optimizer.param_groups
        for i, (g, idx, sh) in enumerate(zip(groups, *saved)):
            for j in idx:
                self._remember_given(g["params"][j])
            if sh is not None:
                self._given_shapes[i] = sh
        self._adopt([p for g in groups for p in g["params"]])

    def admit(self, group: dict) -> None:
        """A param group the optimizer was given (constructor, ``add_param_group``): refuse FSDP1's flat-parameter
        views (raise before anything is recorded) and remember its tensors as given."""
        for p in group["params"]:
            _refuse_fsdp1(p, ValueError)
        for p in group["params"]:
            self._remember_given(p)
        ps = group["params"]
        self._given_shapes[len(self.optimizer.param_groups) - 1] = (
            [tuple(p.shape) for p in ps], [tuple(p.shape) for p in ps if p.requires_grad and p.numel()])
        self.validate()
        self._adopt(ps)

    def validate(self) -> None:
        """Check the optimizer's param groups against the strategy (when set, and when a group is added)."""

    def _remember_given(self, p: Tensor) -> None:
        self._given[id(p)] = (weakref.ref(p), tuple(p.shape))

    def _is_given(self, p: Tensor) -> bool:
        """``p`` is a tensor the optimizer was given, still of the shape it had then (an engine that swaps a
        parameter's data for a shard of it, as FSDP1 does, makes it another tensor)."""
        hit = self._given.get(id(p))
        return hit is not None and hit[0]() is p and hit[1] == tuple(p.shape)

    # -- checks before a step writes anything -----------------------------------------------------------------
    def check_group(self, group: dict) -> None:
        """Raise what a step of ``group`` would refuse under this strategy (nothing here)."""

    def check_placement(self, work) -> None:
        """Refuse to step a tensor whose layer statistic would be wrong. ``work``: (group, params with a gradient,
        their states) per param group. A tensor is placed when it is one the optimizer was given (of its shape
        then), one the strategy places (a flat partition of a layout), a DTensor (the DTensor strategy is then
        set on the optimizer: an engine swapped it in place), or a whole-layer replacement: it has the shape of the
        tensor given at its position in the same param group, the group holding as many tensors as given, or as
        many as were given trainable and not empty (an engine's fp32 master copies, e.g. DeepSpeed's stage-0
        fp16/bf16 optimizer) — it then holds every element of that one layer. Under a flat layout, a decayed
        group's tensors must be the layout's. Checked again only when a group's tensors change."""
        from .stats import delta_setting

        opt = self.optimizer
        for gi, (group, ps, _) in enumerate(work):
            stats = opt.layer_stats  # set anew when a DTensor is adopted below
            setting = delta_setting(group)
            needs = setting is not None and setting.needs_statistic
            key = (tuple(map(id, ps)), needs, [p.shape for p in ps])
            last = stats._placed.get(gi)
            if last is not None and last[:3] == key:  # as at the last step (tensors kept alive: no id reuse)
                continue
            shapes = None
            for p in ps:
                _refuse_fsdp1(p, UnplacedTensorError)  # FSDP1 (use_orig_params): the given param now a shard
                if stats.places(p):
                    continue
                if stats.flat and setting is not None:
                    raise _unplaced(opt, group, p, "a decayed param group holds a tensor that is not in the "
                                                   "optimizer's flat layout (added after attach?)")
                if stats._is_given(p):
                    continue
                if is_dtensor(p):
                    stats._adopt([p])
                    stats = opt.layer_stats
                    stats._remember_given(p)
                    if stats.flat:
                        raise UnplacedTensorError("AdamHD has a flat layout and DTensor parameters at once")
                    continue
                if not needs:
                    continue  # elementwise only: exact on any piece of a layer
                if shapes is None:
                    shapes = stats._replacement_shapes(gi, group)
                if shapes.get(id(p)) == tuple(p.shape):
                    continue
                raise _unplaced(opt, group, p, "it was not given and cannot be placed in a layer")
            stats._placed[gi] = (*key, ps)

    def _adopt(self, params) -> None:
        """Set the registered DTensor strategy on the optimizer when DTensor parameters appear (given, or swapped
        in place by an engine); only the default strategy is replaced."""
        if type(self) is LayerStats and any(is_dtensor(p) for p in params):
            stats = auto_strategy(self.optimizer, params)
            if stats is None:
                raise UnplacedTensorError("AdamHD has DTensor parameters but no DTensor strategy is registered "
                                          "(import adamhd_dist before building the optimizer)")
            self.optimizer.set_layer_stats(stats)

    def _replacement_shapes(self, gi: int, group) -> dict[int, tuple]:
        """{id(tensor): the shape given at its position} when the group holds as many tensors as were given (or as
        were given trainable and not empty); else {}."""
        current = group["params"]
        for shapes in self._given_shapes.get(gi) or ():
            if len(shapes) == len(current):
                return {id(q): shape for q, shape in zip(current, shapes)}
        return {}

    def undo_point(self) -> Callable[[], None]:
        """A function that puts back the per-layer state a step is about to change (μ), for a step that raises.
        The step's :meth:`deltas` records what it overwrites; nothing is copied unless it raises."""
        undo = self._undo = []

        def restore():
            for st, mu in reversed(undo):
                if mu is None:
                    st.pop("delta_ema", None)
                else:
                    st["delta_ema"].copy_(mu)
        return restore

    # -- the step ---------------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Once per training step, before the engine's inner steps (flat layouts; nothing here)."""

    @torch.no_grad()
    def deltas(self, work) -> list:
        """One layer per parameter: δ for every param that needs one, across ALL groups, with ONE reduction of the
        layer sums; μ (``delta_ema``) advanced in the state. Returns per entry of ``work`` what :meth:`units`
        takes: here an fp32 δ vector (None where the group has no decay)."""
        from .stats import advance_deltas, delta_setting

        layers, states, settings, spans = [], [], [], []
        for group, ps, sts in work:
            setting = delta_setting(group)
            if setting is None or not ps:
                spans.append(None)
                continue
            spans.append((len(layers), len(ps)))
            layers += ps
            states += sts
            settings += [setting] * len(ps)
        if not layers:
            return [None] * len(work)
        stat = [i for i, st in enumerate(settings) if st.needs_statistic]
        sums = None
        if stat:
            if len(stat) == len(layers):
                sums = self.layer_sums(layers)
            else:
                sums = torch.zeros(len(layers), dtype=torch.float64)
                part = self.layer_sums([layers[i] for i in stat])
                sums = sums.to(part.device)
                sums[torch.tensor(stat, device=part.device)] = part
        device = sums.device if sums is not None else self.local(layers[0]).device
        has = ["delta_ema" in st for st in states]
        if all(has):
            mus = torch.stack([st["delta_ema"] for st in states]).to(device)
        elif any(has):
            mus = torch.stack([st["delta_ema"].to(device) if h else torch.zeros((), device=device)
                               for st, h in zip(states, has)])
        else:
            mus = torch.zeros(len(layers), device=device)
        numels = [self.layer_numel(p) for p in layers] if stat else [1] * len(layers)
        deltas, new_mu, new_has = advance_deltas(settings, sums, numels, mus, has)
        ema = [i for i, st in enumerate(settings) if st.mode == "ema"]
        if ema:
            undo = getattr(self, "_undo", None)
            if undo is not None:  # to put μ back if the step raises
                undo += [(states[i], mus[i].clone() if has[i] else None) for i in ema]
            old = [i for i in ema if has[i]]
            if old:  # one foreach copy instead of a copy per layer
                src = new_mu if len(old) == len(layers) else new_mu[torch.tensor(old, device=new_mu.device)]
                torch._foreach_copy_([states[i]["delta_ema"] for i in old], list(src.unbind(0)))
            for i in ema:
                if not has[i]:
                    states[i]["delta_ema"] = new_mu[i].to(layers[i].device).clone()
        return [None if span is None else deltas[span[0]:span[0] + span[1]] for span in spans]

    def units(self, group: dict, ps: list[Tensor], states: list[dict], steps: list, delta):
        """The tensors the functional core updates for ``ps`` (params of ``group`` with a gradient) and their
        states: ``(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None, steps, deltas or None, owners)``.
        Here the local tensors (as their real view when complex) with one δ each; ``owners`` is passed back to
        :meth:`record`."""
        params, grads = list(ps), [self.grad(p) for p in ps]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        vmax = [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None
        if type(self).local is not LayerStats.local:  # e.g. DTensor shards
            params, grads, m, v = ([self.local(t) for t in ts] for ts in (params, grads, m, v))
            if vmax is not None:
                vmax = [self.local(t) for t in vmax]
        if any(t.is_complex() for t in params):  # as torch.optim: the real view, two coordinates each
            params, grads, m, v = ([real_view(t) for t in ts] for ts in (params, grads, m, v))
            if vmax is not None:
                vmax = [real_view(t) for t in vmax]
        ds = delta.to(params[0].device) if delta is not None else None
        return params, grads, m, v, vmax, steps, ds, ps

    def record(self, owners, sums: Tensor) -> None:
        """Keep the update's by-product ``Σ|θ|`` per unit (``sums``, fp64, in :meth:`units`' order)."""
        for p, total in zip(owners, sums.unbind(0)):
            self.remember(p, total)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self, params: list[Tensor]) -> dict:
        """The strategy's entries of ``AdamHD.state_dict()`` (``params``: the optimizer's, in state_dict order)."""
        return {}

    def check_saved(self, layer_state, saved_layout) -> None:
        """Raise, before anything is loaded, if a saved strategy state does not fit this one."""

    def load_state_dict(self, layer_state, saved_layout) -> None:
        """Load the strategy's entries of a saved optimizer state (kept for a flat strategy set later)."""
        self._placed = {}
        self.invalidate()
        if layer_state is not None or saved_layout is not None:
            self._loaded = (layer_state or {}, saved_layout)

    def eager_params(self) -> list[Tensor]:
        """Tensors whose optimizer state is created when the strategy is set (not at their first step)."""
        return []

    # -- geometry ----------------------------------------------------------------------------------------------
    def grad(self, p: Tensor) -> Tensor:
        """The gradient the update uses for ``p``, laid out as ``p`` is (here ``p.grad`` itself)."""
        return p.grad

    def local(self, t: Tensor) -> Tensor:
        """The tensor the update writes for ``t`` (a param, its gradient or a state tensor)."""
        return t

    def layer_numel(self, p: Tensor) -> int:
        """The number of elements of the whole layer ``p`` is (padding excluded; a complex element counts as its
        two real coordinates). ``DTensor.numel()`` is the global numel, so this holds for DTensor layers too."""
        return p.numel() * (2 if p.is_complex() else 1)

    def places(self, p: Tensor) -> bool:
        """Whether this strategy knows ``p`` beyond the optimizer's own params (e.g. a flat partition)."""
        return False

    # -- the statistic -----------------------------------------------------------------------------------------
    def reduce(self, sums: Tensor, params: list[Tensor]) -> Tensor:
        """The stacked local ``Σ|θ_local|`` of ``params`` (fp64), summed over the ranks that shard them, in ONE
        collective (here: nothing to sum)."""
        return sums

    def layer_sums(self, params: list[Tensor]) -> Tensor:
        """fp64 ``(len(params),)``: each layer's whole ``Σ|θ|`` — local sums (from the last update's by-product
        where the tensor is unchanged since, else read afresh in one call), then :meth:`reduce`."""
        from .stats import layer_abs_sums

        locals_ = [real_view(self.local(p)) for p in params]
        cached, missing = {}, []
        for i, (p, t) in enumerate(zip(params, locals_)):
            hit = self._sums.get(p)
            if hit is not None and hit[1] == t._version and hit[2] == t.data_ptr():
                cached[i] = hit[0]
            else:
                missing.append(i)
        if not cached:
            sums = layer_abs_sums(locals_)
        elif not missing:  # the steady state: every sum comes from the last update
            sums = torch.stack([cached[i] for i in range(len(params))]).to(locals_[0].device)
        else:
            device = locals_[0].device
            sums = torch.empty(len(params), dtype=torch.float64, device=device)
            idx = list(cached)
            sums[torch.tensor(idx, device=device)] = torch.stack([cached[i] for i in idx]).to(device)
            sums[torch.tensor(missing, device=device)] = layer_abs_sums([locals_[i] for i in missing]).to(device)
        return self.reduce(sums, params)

    def remember(self, p: Tensor, sums: Tensor) -> None:
        """Keep ``Σ|θ|`` of what the update just stored in ``p`` (one entry per unit of ``p``)."""
        t = self.local(p)
        self._sums[p] = (sums, t._version, t.data_ptr())

    def invalidate(self) -> None:
        """Forget every kept statistic (the next step re-reads every θ)."""
        self._sums.clear()


# (predicate on a parameter, factory(optimizer) -> LayerStats), filled by the package root
_AUTO: list[tuple[Callable[[Tensor], bool], Callable[[object], LayerStats]]] = []


def register_auto_strategy(predicate: Callable[[Tensor], bool], factory: Callable[[object], LayerStats]) -> None:
    """Let the optimizer pick ``factory(optimizer)`` by itself when one of its parameters satisfies
    ``predicate`` (the package root registers the DTensor strategy this way)."""
    _AUTO.append((predicate, factory))


def auto_strategy(optimizer, params) -> LayerStats | None:
    """The registered strategy for the first parameter that needs one, or None."""
    for p in params:
        for predicate, factory in _AUTO:
            if predicate(p):
                return factory(optimizer)
    return None
