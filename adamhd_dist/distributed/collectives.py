"""The one collective of a sharded AdamHD step: a sum of the stacked per-layer partial sums over a process group,
on a device the group's backend supports. Shared by the engine integrations (DeepSpeed, FSDP2/DTensor)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sums", "collective_device_type"]


def collective_device_type(group, mesh_device_type: str, tensor_device_type: str) -> str:
    """The device type the sums tensor must be on for ``group``'s collective: its own when the group has a
    backend for it (gloo: CPU; "cpu:gloo,cuda:nccl": both), else the mesh's (NCCL: CUDA)."""
    try:
        supported = {d.type for d in group._device_types}
    except AttributeError:
        supported = {mesh_device_type}
    if tensor_device_type in supported:
        return tensor_device_type
    return mesh_device_type if mesh_device_type in supported else sorted(supported)[0]


def _current_device(device_type: str) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    handle = getattr(torch, device_type, None)
    return torch.device(device_type, handle.current_device() if hasattr(handle, "current_device") else 0)


def all_reduce_sums(sums: Tensor, group, fallback_device_type: str) -> Tensor:
    """``sums`` summed over ``group`` (a copy; ``sums`` is left as it is), on ``sums``' device. The collective runs
    on ``sums``' device when the group has a backend for it, else on ``fallback_device_type``'s current device
    (e.g. a CPU tensor over NCCL goes through the GPU)."""
    device_type = collective_device_type(group, fallback_device_type, sums.device.type)
    device = sums.device if device_type == sums.device.type else _current_device(device_type)
    buf = sums.to(device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(sums.device)

