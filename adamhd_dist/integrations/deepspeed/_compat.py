"""Every access to DeepSpeed's internals, in one place, behind one name per concept.

AdamHD needs to know where DeepSpeed put each layer (which its public API does not say), which ranks share a
partition, and what its checkpoint files hold. All of it is read here, from the attributes and file keys of the
DeepSpeed versions in :data:`TESTED`; the rest of the integration uses only the functions below, so a DeepSpeed
release that moves something breaks this file, loudly, at :func:`check_version` or at the first access here.

Tested: DeepSpeed 0.19.8. The optimizer classes and attributes read (stage_1_and_2.DeepSpeedZeroOptimizer:
``bit16_groups``, ``round_robin_bit16_groups``, ``round_robin_bit16_offsets``, ``single_partition_of_fp32_groups``,
``dp_process_group``, ``real_dp_process_group``; bf16_optimizer.BF16_Optimizer: ``bf16_groups``,
``fp32_groups_flat_partition``; stage3.DeepSpeedZeroOptimizer_Stage3: ``fp16_groups``,
``fp32_partitioned_groups_flat``, ``fp16_partitioned_groups_flat``, ``sub_group_to_group_id``, parameters'
``ds_numel``/``ds_shape``/``ds_tensor``/``partition_numel()``; fp16.unfused_optimizer.FP16_UnfusedOptimizer:
``fp16_groups``, ``fp32_groups``) and the checkpoint keys (:data:`OPTIMIZER_FILE_KEYS`) are those of that version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["TESTED", "VERSION_ENV", "check_version", "ZeroKind", "zero_kind", "Stage12View", "stage12_view",
           "Stage3SubGroup", "stage3_view", "unfused_copies", "dp_group", "set_engine_counters",
           "refresh_low_precision", "write_frozen_partition", "saved_partitions", "frozen_fragments",
           "is_engine", "whole_numel", "tp_group", "is_tp_sliced", "loads_universal", "tp_world_size",
           "ENGINE_FILE_KEYS", "OPTIMIZER_FILE_KEYS"]

#: DeepSpeed versions whose internals this module reads (tested: 0.19.8); the same range as pyproject's extra
TESTED = ">=0.19,<0.20"
#: set to 1 to run with a DeepSpeed version outside TESTED (at your own risk: layouts are checked, not trusted)
VERSION_ENV = "ADAMHD_ALLOW_UNTESTED_DEEPSPEED"


def check_version() -> str:
    """The installed DeepSpeed version; a ``RuntimeError`` naming the tested range (and :data:`VERSION_ENV`) when
    it is outside it."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"adamhd_dist.deepspeed needs DeepSpeed (pip install 'adamhd_dist[deepspeed]'): {e}") from e
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = str(deepspeed.__version__)
    try:
        ok = Version(version) in SpecifierSet(TESTED)
    except Exception:  # an unparsable local build string
        ok = False
    if not ok and os.environ.get(VERSION_ENV, "") not in ("1", "true", "yes"):
        raise RuntimeError(
            f"adamhd_dist's DeepSpeed integration reads DeepSpeed internals (where ZeRO puts each layer) and is "
            f"tested with deepspeed{TESTED}; this is deepspeed {version}. Install a tested version "
            f"(pip install 'adamhd_dist[deepspeed]'), or set {VERSION_ENV}=1 to try this one.")
    return version


def is_engine(obj: Any) -> bool:
    """Whether ``obj`` is a ``deepspeed.DeepSpeedEngine`` (or a subclass: pipeline engines)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return isinstance(obj, DeepSpeedEngine)


# ----------------------------------------------------------------------------------------------------------------
# which optimizer wrapper DeepSpeed built around the client optimizer
class ZeroKind:
    STAGE12 = "ZeRO-1/2"
    BF16 = "BF16_Optimizer"
    STAGE3 = "ZeRO-3"
    UNFUSED = "FP16_UnfusedOptimizer (stage 0, fp16/bf16)"
    PLAIN = "no wrapper (stage 0, fp32)"


def zero_kind(zopt: Any) -> str:
    """The :class:`ZeroKind` of the optimizer DeepSpeed wraps the client optimizer in (``engine.optimizer``)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zopt, DeepSpeedZeroOptimizer):
        return ZeroKind.STAGE12
    if isinstance(zopt, BF16_Optimizer):
        return ZeroKind.BF16
    if isinstance(zopt, DeepSpeedZeroOptimizer_Stage3):
        return ZeroKind.STAGE3
    if isinstance(zopt, FP16_UnfusedOptimizer):
        return ZeroKind.UNFUSED
    return ZeroKind.PLAIN


def pipeline_stage(engine: Any) -> tuple[int, int] | None:
    """(this rank's stage, number of stages) of a ``PipelineEngine`` with more than one stage, else None."""
    stages = getattr(engine, "num_stages", None)
    if not isinstance(stages, int) or stages < 2:
        return None
    return int(engine.stage_id), stages


def loads_universal(engine: Any) -> bool:
    """Whether the engine's config says ``"checkpoint": {"load_universal": true}`` (DeepSpeed then reads the tag
    named in ``latest_universal`` and the per-parameter files that ``ds_to_universal`` wrote)."""
    probe = getattr(engine, "load_universal_checkpoint", None)
    return bool(probe()) if callable(probe) else False


def tp_world_size() -> int:
    """The size of AutoTP's tensor-parallel group (1 where DeepSpeed set none up)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    try:
        group = groups.get_tensor_model_parallel_group()
    except (AssertionError, AttributeError, RuntimeError):
        return 1
    return 1 if group is None else dist.get_world_size(group=group)


def dp_group(zopt: Any):
    """The data-parallel process group whose ranks share the partitions."""
    return zopt.dp_process_group


def is_tp_sliced(p: Tensor) -> bool:
    """Whether AutoTP holds only a slice of ``p`` on each tensor-parallel rank: it marks the weights of the
    layers it splits (``LinearLayer``, ``LinearAllreduce``, the vocab-parallel embeddings) and the biases of the
    column-wise ones with ``tensor_model_parallel = True``; everything else (norms, row-wise biases, layers it keeps
    whole) is replicated over the tensor-parallel group."""
    from deepspeed.module_inject.layers import DS_TENSOR_MODEL_PARALLEL

    return bool(getattr(p, DS_TENSOR_MODEL_PARALLEL, False))


def tp_group(params) -> Any:
    """AutoTP's tensor-parallel process group (``deepspeed.utils.groups``), or None where no param is sliced or
    the group has one rank."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if not any(is_tp_sliced(p) for p in params):
        return None
    group = groups.get_tensor_model_parallel_group()
    return group if dist.get_world_size(group=group) > 1 else None


@dataclass
class Stage12View:
    """ZeRO-1/2 or the BF16 optimizer: per param group, the low-precision params in flattening order and where
    each starts in the flattened group, and this rank's fp32 partition of it."""

    lp_groups: list[list[Tensor]]  # params per group, in the order the group was flattened
    offsets: list[list[int]]  # start of each of those params in the flattened group
    partitions: list[Tensor]  # this rank's fp32 slice of each flattened group
    moe: list[bool]  # whether each group is an expert-parallel (MoE) group


def stage12_view(zopt: Any, kind: str) -> Stage12View:
    if kind == ZeroKind.STAGE12:
        if any(g is not zopt.dp_process_group for g in zopt.real_dp_process_group):
            raise ValueError("param groups with different data-parallel groups are not supported with AdamHD")
        # round_robin_gradients reorders the params of each group before flattening; the offsets are its own
        return Stage12View([list(g) for g in zopt.round_robin_bit16_groups],
                           [[int(o) for o in offs] for offs in zopt.round_robin_bit16_offsets],
                           list(zopt.single_partition_of_fp32_groups),
                           [bool(g.get("moe", False)) for g in zopt.optimizer.param_groups])
    if kind == ZeroKind.BF16:
        groups = [list(g) for g in zopt.bf16_groups]
        offsets = []
        for g in groups:
            at, offs = 0, []
            for p in g:
                offs.append(at)
                at += p.numel()
            offsets.append(offs)
        return Stage12View(groups, offsets, list(zopt.fp32_groups_flat_partition),
                           [bool(g.get("moe", False)) for g in zopt.optimizer.param_groups])
    raise TypeError(f"not a flat-partition optimizer: {kind}")


@dataclass
class Stage3SubGroup:
    """A ZeRO-3 sub-group: the params whose partitions are concatenated, in order, in ``flat`` (this rank's fp32
    buffer), and the optimizer param group it belongs to. For each param: its whole numel and shape, and the size of
    one rank's partition (``ceil(numel / W)``, the last ranks' tails padded)."""

    flat: Tensor
    group: int
    params: list[Tensor]
    numels: list[int]
    shapes: list[tuple[int, ...]]
    partition_numels: list[int]


def stage3_view(zopt: Any) -> list[Stage3SubGroup]:
    out = []
    for sg, params in enumerate(zopt.fp16_groups):
        out.append(Stage3SubGroup(
            flat=zopt.fp32_partitioned_groups_flat[sg], group=int(zopt.sub_group_to_group_id[sg]),
            params=list(params), numels=[int(p.ds_numel) for p in params],
            shapes=[tuple(p.ds_shape) for p in params], partition_numels=[int(p.partition_numel()) for p in params]))
    return out


def unfused_copies(zopt: Any) -> list[tuple[Tensor, Tensor]]:
    """Stage 0 with fp16/bf16: (model param, its fp32 copy that the client optimizer steps), every trainable
    param; each copy is a whole layer."""
    return [(lp, hp) for lps, hps in zip(zopt.fp16_groups, zopt.fp32_groups) for lp, hp in zip(lps, hps)]


def refresh_low_precision(zopt: Any) -> None:
    """Copy the fp32 master partitions into the model's low-precision params (after writing the masters)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if isinstance(zopt, DeepSpeedZeroOptimizer_Stage3):
        for lp_flat, fp32_flat in zip(zopt.fp16_partitioned_groups_flat, zopt.fp32_partitioned_groups_flat):
            if lp_flat is not None and lp_flat.data_ptr() != fp32_flat.data_ptr():
                lp_flat.data.copy_(fp32_flat.data)
    else:
        zopt.update_lp_params()


def write_frozen_partition(p: Tensor, full: Tensor, rank: int) -> None:
    """ZeRO-3: write this rank's partition of a frozen param from the param's whole flat value."""
    pn = p.partition_numel()
    part = full[rank * pn:(rank + 1) * pn]
    p.ds_tensor.data.view(-1)[:part.numel()].copy_(part.to(p.ds_tensor.dtype))


def whole_numel(p: Tensor) -> int:
    """A ZeRO-3 param's whole numel (its own shape is (0,) while partitioned)."""
    return int(p.ds_numel)


# ----------------------------------------------------------------------------------------------------------------
# engine counters and checkpoint files
def set_engine_counters(engine: Any, saved: dict, loaded_dp_world_size) -> None:
    """Restore the step counters from a model-states file's dict (as DeepSpeed's own load does)."""
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = saved.get("skipped_steps", 0)
    engine.loaded_checkpoint_dp_world_size = loaded_dp_world_size


#: the top-level keys of an engine's model-states file that describe the engine (the rest is client state)
ENGINE_FILE_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
                    "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples",
                    "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version"}
#: where a ZeRO optimizer-states file keeps the inner optimizer's state and the fp32 master partitions (stage 1/2
#: and BF16 names first, then stage 3's)
OPTIMIZER_FILE_KEYS = {"state": ("optimizer_state_dict",), "inner": ("base_optimizer_state", "optimizer_state_dict"),
                       "masters": ("single_partition_of_fp32_groups", "fp32_flat_groups")}


def saved_partitions(sd: Any) -> tuple[dict | None, Any]:
    """(inner optimizer state_dict, list of fp32 master partitions) of one rank's ZeRO optimizer-states file, or
    (None, None) where the file does not have that shape."""
    osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
    if not isinstance(osd, dict):
        return None, None
    inner = next((osd[k] for k in OPTIMIZER_FILE_KEYS["inner"] if k in osd), None)
    masters = next((osd[k] for k in OPTIMIZER_FILE_KEYS["masters"] if k in osd), None)
    return inner, masters


def frozen_fragments(sd: dict) -> dict[str, Tensor]:
    """ZeRO-3: {frozen param name: this file's rank's partition} of a model-states file."""
    return sd.get("frozen_param_fragments") or {}
