"""AdamHD on DTensor parameters (PyTorch FSDP2, HSDP, FSDP + tensor parallel): the exact per-layer statistic.

Under ``fully_shard`` every parameter is a DTensor whose local tensor is a slice of the layer. Elementwise math
works on the local tensors unchanged; the layer statistic ``s = Σ|θ| / numel`` does not, because each rank only
sees its slice. :func:`install_dtensor_hooks` gives an :class:`~adamhd_dist.AdamHD` three hooks:

- ``local_tensor(t)``: ``t.to_local()`` for a DTensor (the shard the update writes), ``t`` otherwise;
- ``layer_numel(p)``: the numel of the whole layer (``DTensor.numel()`` is the global one);
- ``reduce_layer_sums(sums)``: the local partial sums ``Σ|θ_local|`` of all layers, stacked, summed over the
  mesh dimensions on which the layers are sharded in ONE ``all_reduce`` per step.

Which ranks are summed: the union ``S`` of the mesh dimensions on which some parameter has a ``Shard``
placement. FSDP2 gives ``S = {shard}``; HSDP's 2-D (replicate, shard) mesh also gives ``S = {shard}``, so the
replicate dimension, whose ranks hold copies, is never summed. With several sharded dimensions (FSDP + tensor
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
from torch.distributed.tensor import DTensor

from .collectives import all_reduce_sums

__all__ = ["install_dtensor_hooks", "is_dtensor", "DTensorLayerStats"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return isinstance(t, DTensor)


@dataclass(frozen=True)
class _Plan:
    """How the stacked sums of one optimizer are reduced (recomputed when its param groups change)."""

    mesh: Any  # DeviceMesh of the DTensor parameters, or None (no DTensor needs a statistic)
    dims: tuple[int, ...]  # mesh dimensions summed over (those with a Shard placement)
    group: Any  # ProcessGroup over ``dims``, or None when nothing is sharded
    uniform: bool  # every layer that needs a statistic is a DTensor whose local sum counts in full


class DTensorLayerStats:
    """The three AdamHD engine hooks for DTensor parameters (see the module docstring).

    Args:
        optimizer: the :class:`~adamhd_dist.AdamHD` whose parameters include DTensors.
    Raises:
        ValueError: DTensor parameters on different device meshes, a parameter with a ``Partial`` placement, or
            several sharded mesh dimensions on a mesh without ``mesh_dim_names``.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self._plan_key: tuple | None = None
        self._plan: _Plan | None = None
        self._weights_key: tuple | None = None
        self._weights: tuple[Tensor, Tensor] | None = None
        self.plan()  # validate now, where the user builds the optimizer

    # -- hooks ----------------------------------------------------------------------------------------------
    @staticmethod
    def local_tensor(t: Tensor) -> Tensor:
        """The local shard of a DTensor (what the update writes), or the tensor itself. The optimizer calls it
        under ``no_grad``, where ``to_local()`` is the shard itself (not an autograd view)."""
        return t.to_local() if isinstance(t, DTensor) else t

    @staticmethod
    def layer_numel(p: Tensor) -> int:
        """Number of elements of the whole (unsharded) layer; ``DTensor.numel()`` is the global numel."""
        return int(p.numel())

    def reduce_layer_sums(self, sums: Tensor) -> Tensor:
        """Sum the stacked local ``Σ|θ_local|`` (fp64, one entry per layer that needs δ, in the optimizer's
        order) over the sharded mesh dimensions, in one ``all_reduce``; plain tensors keep their local sum."""
        plan = self.plan()
        if plan.group is None or sums.numel() == 0:
            return sums
        if plan.uniform:
            return self._all_reduce(sums, plan)
        weight, local = self._entry_weights(sums)
        reduced = self._all_reduce(sums * weight, plan)
        return torch.where(local, sums, reduced)

    # -- planning -------------------------------------------------------------------------------------------
    def _stat_params(self) -> list[Tensor]:
        """The params of the groups whose δ needs the statistic (λ > 0, not "constant"), in the optimizer's order."""
        needs = self.optimizer._needs_delta
        return [p for g in self.optimizer.param_groups if needs(g) for p in g["params"]]

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
        dims = tuple(sorted({d for p in stat_dt for d, pl in enumerate(p.placements) if pl.is_shard()}))
        group = self._group(mesh, dims) if dims else None
        uniform = all(is_dtensor(p) and self._weight(p, dims) == 1.0 for p in params)
        self._plan = _Plan(mesh=mesh, dims=dims, group=group, uniform=uniform)
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
            if not p.placements[d].is_shard() and p.device_mesh.get_local_rank(d) != 0:
                return 0.0
        return 1.0

    def _entry_weights(self, sums: Tensor) -> tuple[Tensor, Tensor]:
        """Per entry of ``sums``: (weight in the reduction, whether the entry is a plain tensor's local sum).

        The entries follow AdamHD._group_deltas: the params of the groups that need δ, in order, that have
        a gradient this step."""
        entries = [p for p in self._stat_params() if p.grad is not None]
        if len(entries) != sums.numel():
            raise RuntimeError(
                f"AdamHD DTensor hooks: {sums.numel()} layer sums for {len(entries)} parameters with gradients "
                f"in groups that need δ; the optimizer and its hooks disagree on the layer order")
        key = (tuple(id(p) for p in entries), sums.device)
        if key != self._weights_key or self._weights is None:
            dims = self._plan.dims
            w = [self._weight(p, dims) if is_dtensor(p) else 0.0 for p in entries]
            local = [not is_dtensor(p) for p in entries]
            self._weights = (torch.tensor(w, dtype=sums.dtype, device=sums.device),
                             torch.tensor(local, dtype=torch.bool, device=sums.device))
            self._weights_key = key
        return self._weights

    def _all_reduce(self, sums: Tensor, plan: _Plan) -> Tensor:
        return all_reduce_sums(sums, plan.group, plan.mesh.device_type)


def install_dtensor_hooks(optimizer) -> DTensorLayerStats:
    """Give ``optimizer`` (an :class:`~adamhd_dist.AdamHD` holding DTensor parameters) the hooks that make its
    per-layer statistic exact: ``local_tensor``, ``layer_numel`` and ``reduce_layer_sums`` (one collective per
    step over the shard dimension(s)). AdamHD calls this by itself when a param group holds a DTensor; the
    returned object is also kept as ``optimizer.dtensor_stats``."""
    stats = DTensorLayerStats(optimizer)
    optimizer.local_tensor = stats.local_tensor
    optimizer.layer_numel = stats.layer_numel
    optimizer.reduce_layer_sums = stats.reduce_layer_sums
    optimizer.dtensor_stats = stats
    return stats
