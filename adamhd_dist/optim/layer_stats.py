"""The layer-statistic strategy: the one thing sharding changes for AdamHD, handed to the optimizer as an object.

δ needs, per layer (one original, unsharded parameter tensor), ``Σ|θ|`` over the WHOLE layer and its true numel.
Which tensors the optimizer updates, which layer each belongs to, and how partial sums become whole-layer sums
depend on how the model is sharded; the optimizer asks a :class:`LayerStats` for all three and computes δ itself,
in one place (:func:`adamhd_dist.optim.stats.advance_deltas`). Strategies:

- :class:`LayerStats` (this module, the default): every parameter is a whole layer on this process;
- ``DTensorLayerStats`` (:mod:`adamhd_dist.distributed.dtensor`): DTensor parameters (FSDP2, HSDP, TP); the
  local shards are updated and the sums are reduced over the sharded mesh dimensions in one collective;
- ``FlatLayerStats`` (:mod:`adamhd_dist.distributed.layout`): flat per-rank buffers that hold parts of many
  layers (DeepSpeed ZeRO); the sums of every layer are reduced once per training step.

A strategy also says which tensors it can *place*. The optimizer refuses to step a tensor that needs a statistic
and that nobody can place (:class:`UnplacedTensorError`): that is how a per-shard statistic would otherwise be
computed silently (a ZeRO partition handed to the optimizer by an engine it was not attached to).

This module knows no engine: the DTensor strategy is found through :func:`register_auto_strategy`, which the
package root fills in (``adamhd_dist/__init__.py``), so the optimizer sets it up by itself when DTensor parameters
appear, also when an engine swaps them into its param groups in place (Accelerate's FSDP2 ``prepare``).
"""

from __future__ import annotations

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
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` or a subclass of it (checked without importing
    torch.distributed)."""
    return any(c.__name__ == "DTensor" for c in type(t).__mro__) and hasattr(t, "to_local")


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real view (real and imaginary parts as two coordinates), as torch.optim steps it."""
    return torch.view_as_real(t) if t.is_complex() else t


class LayerStats:
    """Every parameter is a whole layer on this process (no sharding): local tensors, local sums, no collective.

    Subclasses override the geometry (:meth:`local`, :meth:`layer_numel`, :meth:`places`) and the reduction
    (:meth:`reduce`); a flat strategy (``flat = True``) also splits each flat tensor into per-layer units. The
    by-product cache is shared: the fused update emits ``Σ|θ|`` of what it stores, and the next step reuses it
    while the tensor is provably unchanged (same version counter and address).
    """

    #: True when the optimizer's tensors are flat buffers holding parts of many layers (see FlatLayerStats).
    flat = False

    def __init__(self):
        self.optimizer = None
        # tensor -> (Σ|θ| per unit after its last update, version counter and address of the updated tensor)
        self._sums: dict[Tensor, tuple[Tensor, int, int]] = {}

    def bind(self, optimizer) -> None:
        """Called by the optimizer when the strategy is set (validate against its param groups here)."""
        self.optimizer = optimizer

    # -- geometry ----------------------------------------------------------------------------------------------
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
