"""AdamHD on DTensor parameters (FSDP2, HSDP, tensor and sequence parallel, and their 2-D and 3-D meshes): the
exact per-layer statistic.

Under ``fully_shard`` every parameter is a DTensor whose local tensor is a slice of the layer. Elementwise math
works on the local tensors unchanged; the layer statistic ``s = Σ|θ| / numel`` does not, because each rank only
sees its slice. :class:`DTensorLayerStats` is the optimizer's layer-statistic strategy for them:

- ``grad(p)``: ``p.grad`` redistributed to ``p``'s placements when it has others (tensor parallelism gives a
  sequence-parallel norm's weight a ``Partial`` gradient and a vocabulary-parallel embedding a ``Replicate`` one),
  as torch's optimizers get it from DTensor's ops, so every TP copy of a replicated parameter stays identical;
- ``local(t)``: ``t.to_local()`` for a DTensor (the shard the update writes), ``t`` otherwise;
- ``layer_numel(p)``: the numel of the whole layer (``DTensor.numel()`` is the global one);
- ``reduce(sums, params)``: the local partial sums ``Σ|θ_local|`` of all layers, stacked, summed over the
  mesh dimensions on which the layers are sharded in ONE ``all_reduce`` per step.

The optimizer sets it up by itself when a DTensor parameter appears: given to it, or swapped into its param groups
in place by an engine (Accelerate's FSDP2 ``prepare``).

Which ranks are summed: the union ``S`` of the mesh dimensions on which some parameter is split (``Shard``, or
the ``_StridedShard`` FSDP2 over TP gives its "dp" dimension: :func:`is_sharded`). FSDP2 gives ``S = {shard}``;
HSDP's 2-D (replicate, shard) mesh also gives ``S = {shard}``, so the replicate dimension, whose ranks hold
copies, is never summed; FSDP2 over TP gives ``S = {dp, tp}``. With several sharded dimensions (FSDP + tensor
parallel) the collective runs over the flattened sub-mesh of ``S`` (the mesh needs ``mesh_dim_names``); a layer
that is replicated along a dimension of ``S`` is counted once, from the rank at coordinate 0 of that dimension.
A plain tensor in the same optimizer keeps local semantics: its sum is not reduced.

The collective runs on a device its process group supports: under NCCL a CPU sums tensor (FSDP2's
``CPUOffloadPolicy``) is moved to the current CUDA device for the ``all_reduce`` and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, placement_types

from ..optim.layer_stats import LayerStats, is_dtensor
from ..optim.stats import delta_setting
from .collectives import all_reduce_sums

__all__ = ["DTensorLayerStats", "is_dtensor"]  # is_dtensor: the one the optimizer core uses


_STRIDED = getattr(placement_types, "_StridedShard", ())


def is_sharded(placement) -> bool:
    """Whether a mesh dimension's placement splits the tensor: ``Shard``, or the ``_StridedShard`` FSDP2 gives a
    tensor-parallel parameter on its data-parallel dimension (not a ``Shard`` subclass, so ``is_shard()`` says
    False for it). The local tensors of the ranks along such a dimension hold disjoint parts of the layer."""
    return placement.is_shard() or isinstance(placement, _STRIDED)


@dataclass(frozen=True)
class _Plan:
    """How the stacked sums of one optimizer are reduced (recomputed when its parameters change)."""

    mesh: Any  # DeviceMesh of the DTensor parameters, or None (no DTensor needs a statistic)
    dims: tuple[int, ...]  # mesh dimensions summed over (those with a Shard placement)
    group: Any  # ProcessGroup over ``dims``, or None when nothing is sharded


class DTensorLayerStats(LayerStats):
    """The layer-statistic strategy for DTensor parameters (see the module docstring).

    Raises (when bound to an optimizer, and whenever its parameters change):
        ValueError: DTensor parameters on different device meshes, a parameter with a ``Partial`` placement, or
            several sharded mesh dimensions on a mesh without ``mesh_dim_names``.
    """

    def __init__(self, optimizer=None):
        super().__init__()
        self._plan_key: tuple | None = None
        self._plan: _Plan | None = None
        self._weights_key: tuple | None = None
        self._weights: tuple[Tensor, Tensor] | None = None
        if optimizer is not None:
            self.bind(optimizer)

    def bind(self, optimizer, previous: LayerStats | None = None) -> None:
        super().bind(optimizer, previous)
        self.plan()  # validate now, where the user builds the optimizer

    def validate(self) -> None:
        self.plan()

    # -- geometry ---------------------------------------------------------------------------------------------
    def grad(self, p: Tensor) -> Tensor:
        """``p.grad`` with ``p``'s placements: a gradient laid out otherwise is redistributed first, as torch's
        optimizers get it from DTensor's own ops. Tensor parallelism makes such gradients: a sequence-parallel
        norm's replicated weight gets a ``Partial`` gradient (each rank's part of the sequence), a
        vocabulary-parallel embedding's ``Shard(0)`` weight a ``Replicate`` one. Their local parts are not the
        parameter's local gradient, so they must not reach the elementwise update as they are."""
        g = p.grad
        if isinstance(p, DTensor):
            if not isinstance(g, DTensor):
                raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} ({p.placements}) has a plain "
                                 f"{type(g).__name__} gradient of shape {tuple(g.shape)}; AdamHD needs a DTensor "
                                 f"gradient on the parameter's mesh")
            if g.placements != p.placements or g.device_mesh != p.device_mesh:
                g = g.redistribute(p.device_mesh, p.placements)
        return g

    def local(self, t: Tensor) -> Tensor:
        """The local shard of a DTensor (what the update writes), or the tensor itself. The optimizer calls it
        under ``no_grad``, where ``to_local()`` is the shard itself (not an autograd view)."""
        return t.to_local() if isinstance(t, DTensor) else t

    # -- the statistic ----------------------------------------------------------------------------------------
    def reduce(self, sums: Tensor, params: list[Tensor]) -> Tensor:
        """Sum the stacked local ``Σ|θ_local|`` of ``params`` (fp64) over the sharded mesh dimensions, in one
        ``all_reduce``; plain tensors keep their local sum."""
        plan = self.plan()
        if plan.group is None or sums.numel() == 0:
            return sums
        weight, local = self._entry_weights(params, sums)
        if weight is None:  # every entry a DTensor whose local sum counts in full
            return all_reduce_sums(sums, plan.group, plan.mesh.device_type)
        reduced = all_reduce_sums(sums * weight, plan.group, plan.mesh.device_type)
        return torch.where(local, sums, reduced)

    # -- planning ---------------------------------------------------------------------------------------------
    def _stat_params(self) -> list[Tensor]:
        """The params of the groups whose δ needs the statistic, in the optimizer's order."""
        out = []
        for g in self.optimizer.param_groups:
            st = delta_setting(g)
            if st is not None and st.needs_statistic:
                out += g["params"]
        return out

    def plan(self) -> _Plan:
        """The reduction plan for the optimizer's current param groups (cached)."""
        params = self._stat_params()
        all_dt = [p for g in self.optimizer.param_groups for p in g["params"] if is_dtensor(p)]
        key = (tuple(id(p) for p in params), tuple(id(p) for p in all_dt))
        if key == self._plan_key and self._plan is not None:
            return self._plan
        mesh = None
        for p in all_dt:
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise ValueError(
                    f"params: AdamHD's DTensor parameters must share one device mesh (found {mesh} and "
                    f"{p.device_mesh}); build one optimizer per mesh")
            for placement in p.placements:
                if placement.is_partial():
                    raise ValueError(f"params: a DTensor parameter of shape {tuple(p.shape)} has a Partial "
                                     f"placement {p.placements}; parameters must be Shard or Replicate")
        stat_dt = [p for p in params if is_dtensor(p)]
        dims = tuple(sorted({d for p in stat_dt for d, pl in enumerate(p.placements) if is_sharded(pl)}))
        group = self._group(mesh, dims) if dims else None
        self._plan = _Plan(mesh=mesh, dims=dims, group=group)
        self._plan_key = key
        self._weights_key = None
        return self._plan

    @staticmethod
    def _group(mesh, dims: tuple[int, ...]):
        if len(dims) == 1:
            return mesh.get_group(dims[0])
        names = mesh.mesh_dim_names
        if not names:
            raise ValueError(
                f"params: the DTensor parameters are sharded on mesh dimensions {list(dims)} of a mesh without "
                f"mesh_dim_names; name the mesh dimensions (init_device_mesh(..., mesh_dim_names=...)) so the "
                f"layer statistic can be reduced over their flattened sub-mesh in one collective")
        sub = mesh[tuple(names[d] for d in dims)] if len(dims) < mesh.ndim else mesh
        return sub._flatten().get_group()

    @staticmethod
    def _weight(p: Tensor, dims: tuple[int, ...]) -> float:
        """1.0 when this rank's local sum of ``p`` counts towards the reduced sum, 0.0 for a replica that must
        not be counted twice (Replicate on a summed dimension, at a coordinate other than 0)."""
        for d in dims:
            if not is_sharded(p.placements[d]) and p.device_mesh.get_local_rank(d) != 0:
                return 0.0
        return 1.0

    def _entry_weights(self, params: list[Tensor], sums: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Per entry: (weight in the reduction, whether it is a plain tensor's local sum); (None, None) when every
        entry counts in full."""
        key = (tuple(id(p) for p in params), sums.device)
        if key != self._weights_key:
            dims = self._plan.dims
            w = [self._weight(p, dims) if is_dtensor(p) else 0.0 for p in params]
            if all(x == 1.0 for x in w):
                self._weights = (None, None)
            else:
                local = [not is_dtensor(p) for p in params]
                self._weights = (torch.tensor(w, dtype=sums.dtype, device=sums.device),
                                 torch.tensor(local, dtype=torch.bool, device=sums.device))
            self._weights_key = key
        return self._weights
