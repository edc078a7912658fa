"""``apply_fsdp``: shard a transformers model with PyTorch FSDP2 block by block, as users do.

After ``torch.distributed.init_process_group``::

    from torch.distributed.fsdp import MixedPrecisionPolicy
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = apply_fsdp(GPT2LMHeadModel(config), mp_policy=mp)
    opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, weight_decay=0.1), lr=6e-4)

HSDP (replicate across groups of ranks, shard inside each group) takes a 2-D mesh::

    mesh = init_device_mesh("cuda", (replicas, shards), mesh_dim_names=("replicate", "shard"))
    apply_fsdp(model, mesh=mesh)

The optimizer needs nothing else: AdamHD sees DTensor parameters and reduces its per-layer statistic over the
shard dimension in one collective per step (:mod:`adamhd_dist.distributed.dtensor`).

FSDP1 (``FullyShardedDataParallel``) is refused by AdamHD with :data:`FSDP1_MESSAGE`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..optim.layer_stats import FSDP1_MESSAGE

__all__ = ["apply_fsdp", "transformer_blocks", "FSDP1_MESSAGE"]


def transformer_blocks(model: nn.Module, block_classes: Iterable[str | type] | None = None) -> list[nn.Module]:
    """The modules to shard one by one: instances of ``block_classes`` (class names or types), by default the
    model's ``_no_split_modules`` (transformers: ``["GPT2Block"]``, ``["LlamaDecoderLayer"]``, ...), outermost
    matches only, in ``named_modules()`` order.

    Raises:
        ValueError: ``block_classes`` not given and the model has no ``_no_split_modules``, or nothing matched.
    """
    if block_classes is None:
        block_classes = getattr(model, "_no_split_modules", None)
        if not block_classes:
            raise ValueError(f"block_classes: {type(model).__name__} has no _no_split_modules; pass the block "
                             f"classes to shard one by one (e.g. block_classes=['GPT2Block'])")
    if isinstance(block_classes, (str, type)):
        block_classes = [block_classes]
    names = {c if isinstance(c, str) else c.__name__ for c in block_classes}
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names and module is not model:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if not blocks:
        raise ValueError(f"block_classes: no module of {type(model).__name__} is a {sorted(names)}")
    return blocks


def apply_fsdp(
    model: nn.Module,
    mesh=None,
    mp_policy=None,
    *,
    offload_policy=None,
    reshard_after_forward: bool = True,
    block_classes: Iterable[str | type] | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``): each transformer block, then the root (which keeps the
    embeddings, the final norm and a tied LM head together, so tied weights stay one parameter).

    Args:
        model: a built (not yet sharded) model, e.g. ``GPT2LMHeadModel(config)``; modified in place.
        mesh: a 1-D DeviceMesh (FSDP) or a 2-D (replicate, shard) mesh (HSDP); default: all ranks of the
            default process group on the current accelerator (CPU when there is none).
        mp_policy: a ``MixedPrecisionPolicy`` (e.g. bf16 params with fp32 gradient reduction); default fp32.
        offload_policy: e.g. ``CPUOffloadPolicy()``: sharded params, grads and the optimizer step on the CPU.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3 style).
        block_classes: the block types to shard one by one (default: the model's ``_no_split_modules``).
    Returns:
        ``model``, its parameters now DTensors sharded on dim 0 over the mesh's shard dimension.
    Raises:
        ValueError: naming ``mesh`` (not 1-D or 2-D), ``model`` (already sharded) or ``block_classes``.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from .dtensor import is_dtensor

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("model: apply_fsdp needs an initialised default process group "
                         "(torch.distributed.init_process_group)")
    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(f"model: {type(model).__name__} already has DTensor parameters (sharded twice?)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device_type = accel.type if accel is not None else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim not in (1, 2):
        raise ValueError(f"mesh: expected a 1-D (shard) or 2-D (replicate, shard) DeviceMesh, got {mesh.ndim}-D "
                         f"{mesh}")
    kwargs = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
                  offload_policy=offload_policy or OffloadPolicy())
    for block in transformer_blocks(model, block_classes):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model
