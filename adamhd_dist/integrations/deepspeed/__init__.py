"""AdamHD under DeepSpeed: ZeRO-1/2/3, the BF16 optimizer, CPU offload and stage 0, with exact per-layer δ.

Two ways in, the same guarantee:

    # 1. the config names the optimizer: "optimizer": {"type": "AdamHD", "params": {...}}
    engine, optimizer, _, scheduler = adamhd_dist.deepspeed.initialize(model=model, config="ds_configs/zero2_adamhd.json")

    # 2. your own deepspeed.initialize (or Accelerate's DeepSpeed plugin) with an AdamHD you built
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamhd_dist.AdamHD(groups, ...), config=cfg)
    adamhd_dist.deepspeed.attach(engine)

:func:`attach` gives the engine's AdamHD the layout DeepSpeed chose: which slice of which flat fp32 partition holds
which part of which layer (:class:`~adamhd_dist.distributed.layout.FlatLayout`, as the optimizer's layer-statistic
strategy). Per training step the engine's optimizer step then first sums every layer's ``Σ|θ|`` over the
data-parallel ranks in ONE all-reduce, then runs DeepSpeed's own step (overflow check, unscale, clipping, then the
inner step per param group or ZeRO-3 sub-group). A step DeepSpeed skips for fp16 overflow never reaches the inner
step, so step, moments and μ stay as they were. Without :func:`attach`, AdamHD refuses its first step under ZeRO
(it cannot place a flat partition in a layer) instead of computing a per-partition δ.

DeepSpeed has no optimizer registry (``"type": "AdamHD"`` fails its sanity check), so :func:`initialize` reads the
config's ``"optimizer"`` section itself, builds :class:`~adamhd_dist.AdamHD` as a client optimizer, sets what
DeepSpeed needs for one (``zero_allow_untested_optimizer``; ``zero_force_ds_cpu_optimizer: false`` with offload),
and attaches. Checkpoints: :mod:`.checkpoint`. Every access to DeepSpeed's internals is in :mod:`._compat`.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...distributed.collectives import all_reduce_sums
from ...distributed.layout import FlatLayerStats, FlatLayout, Fragment
from ...optim.deltas import find_adamhd
from ...optim.grouping import param_groups as default_param_groups
from ...optim.optimizer import AdamHD
from . import _compat
from .checkpoint import LAYER_STATE_FILE, export_checkpoint, main, to_universal, wrap_checkpointing

__all__ = ["initialize", "attach", "load_config", "adamhd_kwargs", "is_adamhd_config", "check_config", "full_state",
           "export_checkpoint", "to_universal", "main", "LAYER_STATE_FILE", "ADAMHD_PARAMS"]

ADAMHD_PARAMS = tuple(k for k in inspect.signature(AdamHD.__init__).parameters
                      if k not in ("self", "params", "layer_stats"))
_ADAMHD_DEFAULT_WD = inspect.signature(AdamHD.__init__).parameters["weight_decay"].default


# ----------------------------------------------------------------------------------------------------------------
# config
def load_config(config: dict | str | os.PathLike) -> dict:
    """A DeepSpeed config as a dict (a deep copy), from a dict or a JSON file, with a clear error otherwise."""
    if isinstance(config, dict):
        _check_sections(config, "(dict)")
        return copy.deepcopy(config)
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config file not found: {str(path)!r}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}, "
                         f"column {e.colno}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r} must hold a JSON object, got {type(cfg).__name__}")
    _check_sections(cfg, str(path))
    return cfg


def _check_sections(cfg: dict, where: str) -> None:
    """The shapes DeepSpeed and this module read before anything else: named, not a traceback later."""
    for key in ("optimizer", "scheduler", "zero_optimization", "bf16", "bfloat16", "fp16"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ValueError(f'DeepSpeed config {where!r}: "{key}" must be an object ({{...}}), got {cfg[key]!r}')
    opt = cfg.get("optimizer") or {}
    if "params" in opt and not isinstance(opt["params"], dict):
        raise ValueError(f'DeepSpeed config {where!r}: "optimizer.params" must be an object, got {opt["params"]!r}')
    clip = cfg.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))):
        raise ValueError(f'DeepSpeed config {where!r}: "gradient_clipping" must be a number, got {clip!r}')


def is_adamhd_config(cfg: dict) -> bool:
    opt = cfg.get("optimizer")
    return isinstance(opt, dict) and str(opt.get("type", "")).lower() == "adamhd"


def adamhd_kwargs(cfg: dict) -> dict[str, Any]:
    """The AdamHD keyword arguments of a config's ``"optimizer": {"type": "AdamHD", "params": {...}}``."""
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict):
        raise ValueError('config has no "optimizer" section; expected {"type": "AdamHD", "params": {...}}')
    extra = sorted(set(opt) - {"type", "params"})
    if extra:
        raise ValueError(f'config "optimizer" has unknown key(s) {extra}; allowed: "type", "params"')
    params = opt.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f'config "optimizer.params" must be an object, got {type(params).__name__}')
    unknown = sorted(set(params) - set(ADAMHD_PARAMS))
    if unknown:
        raise ValueError(f'config "optimizer.params" has unknown AdamHD parameter(s) {unknown}; allowed: '
                         f"{list(ADAMHD_PARAMS)}")
    kw = dict(params)
    if "betas" in kw:
        b = kw["betas"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2):
            raise ValueError(f'config "optimizer.params.betas" must be a list of two numbers, got {b!r}')
        kw["betas"] = tuple(b)
    return kw


def _zero_section(cfg: dict) -> dict:
    z = cfg.get("zero_optimization", {})
    if not isinstance(z, dict):
        raise ValueError(f'config "zero_optimization" must be an object, got {type(z).__name__}')
    return z


def check_config(cfg: dict) -> None:
    """Refuse, before any work, the settings under which AdamHD's per-layer δ could not be exact."""
    z = _zero_section(cfg)
    stage = z.get("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):  # not True / 2.0
        raise ValueError(f'config "zero_optimization.stage" must be 0, 1, 2 or 3, got {stage!r}')
    off = z.get("offload_optimizer") or {}
    if not isinstance(off, dict):
        raise ValueError('config "zero_optimization.offload_optimizer" must be an object')
    device = off.get("device", "none")
    if device == "nvme":
        raise ValueError('config "zero_optimization.offload_optimizer.device": "nvme" is not supported with AdamHD '
                         '(optimizer state is swapped out of the flat partitions it keeps per-layer maps of); '
                         'use "cpu" or "none"')
    if device not in ("cpu", "none", None):
        raise ValueError(f'config "zero_optimization.offload_optimizer.device" must be "cpu" or "none" with AdamHD, '
                         f'got {device!r}')
    if device == "cpu" and stage not in (2, 3):
        raise ValueError(f'optimizer offload needs ZeRO stage 2 or 3, the config has stage {stage}')
    ratio = off.get("ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f'config "zero_optimization.offload_optimizer.ratio" must be a number (1.0 with AdamHD), '
                         f"got {ratio!r}")
    if device == "cpu" and float(ratio) != 1.0:
        raise ValueError(f'config "zero_optimization.offload_optimizer.ratio" = {ratio}: partial offload steps part '
                         f"of the model with a second optimizer; AdamHD needs ratio 1.0")
    mics = z.get("mics_shard_size", -1)
    if mics is not None and (isinstance(mics, bool) or not isinstance(mics, int)):
        raise ValueError(f'config "zero_optimization.mics_shard_size" must be an integer (-1: off), got {mics!r}')
    if mics is not None and mics > 0:
        raise ValueError('config "zero_optimization.mics_shard_size": MiCS is not supported with AdamHD')
    if z.get("zenflow"):
        raise ValueError('config "zero_optimization.zenflow" is not supported with AdamHD')
    tp = cfg.get("tensor_parallel") or {}
    tp_size = tp.get("autotp_size", 0) if isinstance(tp, dict) else 0
    if isinstance(tp_size, int) and not isinstance(tp_size, bool) and tp_size > 1 and stage not in (1, 2):
        raise ValueError(f'config "tensor_parallel.autotp_size" = {tp_size} with ZeRO stage {stage}: AdamHD sums a '
                         f"tensor-parallel layer's statistic over its tensor- and data-parallel ranks under ZeRO "
                         f"stage 1 or 2 only; use stage 1 or 2, or autotp_size 1")


# ----------------------------------------------------------------------------------------------------------------
# initialize and attach
def initialize(model: torch.nn.Module, config: dict | str | os.PathLike, model_parameters=None, **kwargs):
    """``deepspeed.initialize`` with AdamHD from the config's ``"optimizer"`` section, then :func:`attach`.

    Args:
        model: the torch module.
        config: a DeepSpeed config dict or JSON path. ``"optimizer": {"type": "AdamHD", "params": {...}}`` takes
            any :class:`~adamhd_dist.AdamHD` argument; any other optimizer type is passed to DeepSpeed unchanged.
        model_parameters: params or param groups for the optimizer; default
            ``adamhd_dist.param_groups(model, weight_decay)`` (decay for ndim >= 2, none for biases and norms).
        **kwargs: passed to ``deepspeed.initialize`` (e.g. ``training_data``, ``lr_scheduler``, ``mpu``).
    Returns:
        what ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed

    if "config_params" in kwargs:
        raise ValueError("pass the DeepSpeed config as config=..., not config_params")
    if "optimizer" in kwargs:
        raise ValueError("initialize builds the optimizer from the config's \"optimizer\" section; to pass your "
                         "own, call deepspeed.initialize and then adamhd_dist.deepspeed.attach(engine)")
    cfg = load_config(config)
    if not is_adamhd_config(cfg):
        return deepspeed.initialize(model=model, config=cfg, model_parameters=model_parameters, **kwargs)
    _compat.check_version()
    kw = adamhd_kwargs(cfg)
    check_config(cfg)
    if model_parameters is None:
        groups = default_param_groups(model, kw.get("weight_decay", _ADAMHD_DEFAULT_WD))
    else:
        groups = list(model_parameters)
    optimizer = AdamHD(groups, **kw)  # validates every hyperparameter before DeepSpeed starts
    ds_cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    z = _zero_section(ds_cfg)
    if z.get("stage", 0) > 0:
        ds_cfg["zero_allow_untested_optimizer"] = True
    if (z.get("offload_optimizer") or {}).get("device") == "cpu":
        ds_cfg["zero_force_ds_cpu_optimizer"] = False
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg, **kwargs)
    attach(out[0])
    return out


def _resolve(obj, module):
    """(engine or None, DeepSpeed's optimizer wrapper, the module, the AdamHD) from what a user holds."""
    engine = None
    for candidate in (obj, getattr(obj, "engine", None), getattr(obj, "model_wrapped", None),
                      getattr(obj, "deepspeed", None)):
        if candidate is not None and _compat.is_engine(candidate):
            engine = candidate
            break
    opt = find_adamhd(engine if engine is not None else obj)
    if engine is None and obj is opt:
        raise TypeError("attach needs the DeepSpeed engine (or DeepSpeed's optimizer wrapper and module=...), not "
                        "the AdamHD inside it: adamhd_dist.deepspeed.attach(engine)")
    # the object whose .optimizer is the AdamHD: DeepSpeed's wrapper (or the engine itself at stage 0 in fp32)
    holder = engine if engine is not None else obj
    while getattr(holder, "optimizer", None) is not opt:
        holder = holder.optimizer
    if module is None and engine is not None:
        module = engine.module
    return engine, holder, module, opt


def attach(engine, *, module: torch.nn.Module | None = None) -> AdamHD:
    """Make the AdamHD inside a DeepSpeed engine exact: give it the layout of the engine's partitions (ZeRO-1/2/3,
    CPU offload, the BF16 optimizer; at stage 0 layers are whole and only their names are added), make the
    engine's optimizer step sum every layer's statistic once per training step (one all-reduce), and make the
    engine's ``save_checkpoint``/``load_checkpoint`` keep μ by layer name and load at another world size.

    Call it once after ``deepspeed.initialize`` (:func:`initialize` does); calling it again does nothing.

    Args:
        engine: the ``DeepSpeedEngine`` (also what Accelerate's ``prepare`` returns as the model under its DeepSpeed
            plugin, or a transformers Trainer once training started). Also accepted: any object that holds
            DeepSpeed's optimizer through ``.optimizer`` (its ZeRO optimizer, Accelerate's prepared optimizer);
            then give ``module`` for the layer names, and checkpoints keep μ in DeepSpeed's own optimizer files
            (same world size) since there is no engine to wrap.
        module: the model whose parameter names name the layers (default: ``engine.module``).
    Returns:
        the engine's :class:`~adamhd_dist.AdamHD`.
    Raises:
        RuntimeError: a DeepSpeed version outside the tested range (see ``_compat.check_version``).
        TypeError: no AdamHD inside ``engine``.
    """
    _compat.check_version()
    engine, zopt, module, opt = _resolve(engine, module)
    if engine is not None and getattr(zopt, "_adamhd_attached", None) is not opt:
        _check_pipeline_groups(engine, opt)
    if getattr(zopt, "_adamhd_attached", None) is not opt:
        _attach_layout(zopt, opt, module)
        zopt._adamhd_attached = opt
    if engine is not None:
        engine._adamhd_optimizer = opt
        if opt.layer_stats.flat:
            wrap_checkpointing(engine, opt, _compat.dp_group(zopt))
    return opt


def _check_pipeline_groups(engine, opt: AdamHD) -> None:
    """Under a pipeline, ZeRO sums the gradient norm over the stages once per param group: stages with different
    numbers of groups would wait on each other forever at the first step. Refused here instead, on every rank."""
    stages = _compat.pipeline_stage(engine)
    if stages is None:
        return
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (stages[0], len(opt.param_groups)))
    per_stage = dict(sorted(set(counts)))
    if len(set(per_stage.values())) > 1 or len(per_stage) != stages[1]:
        raise ValueError(f"every pipeline stage needs the same number of optimizer param groups (DeepSpeed reduces "
                         f"the gradient norm across stages once per group); param groups per stage: {per_stage}. "
                         f"A stage without weight-decayed parameters gets no decay group from param_groups: give "
                         f"every stage a decayed layer, or the same groups through model_parameters")


def _names_by_id(module: torch.nn.Module | None) -> dict[int, str]:
    return {} if module is None else {id(p): n for n, p in module.named_parameters()}


def _all_reduce_fn(group):
    # NCCL has no CPU tensors: an offloaded (CPU) layout's sums then go through the current GPU
    fallback = "cuda" if dist.get_backend(group) == "nccl" else None
    return lambda sums: all_reduce_sums(sums, group, fallback or sums.device.type)


def _attach_layout(zopt, opt: AdamHD, module) -> None:
    names = _names_by_id(module)
    kind = _compat.zero_kind(zopt)
    if kind in (_compat.ZeroKind.PLAIN, _compat.ZeroKind.UNFUSED):
        if _compat.tp_group([p for g in opt.param_groups for p in g["params"]] +
                            [lp for lp, _ in (_compat.unfused_copies(zopt) if kind == _compat.ZeroKind.UNFUSED
                                              else [])]) is not None:
            raise ValueError('"tensor_parallel.autotp_size" > 1 at ZeRO stage 0: each rank holds a slice of the '
                             "split layers and AdamHD would take a slice's statistic for the layer's; use ZeRO "
                             "stage 1 or 2 with AutoTP")
        # stage 0: every layer is whole on every rank (fp32 copies at fp16/bf16); only the names to attach
        copies = {id(hp): lp for lp, hp in _compat.unfused_copies(zopt)} if kind == _compat.ZeroKind.UNFUSED else {}
        for g in opt.param_groups:
            lps = [copies.get(id(p), p) for p in g["params"]]
            if all(id(p) in names for p in lps):
                g["param_names"] = [names[id(p)] for p in lps]
        return
    group = _compat.dp_group(zopt)
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    if kind == _compat.ZeroKind.STAGE3:
        layer_params = [p for sub in _compat.stage3_view(zopt) for p in sub.params]
        table = _layout_stage3(zopt, names, rank)
    else:
        view = _compat.stage12_view(zopt, kind)
        layer_params = [p for lps in view.lp_groups for p in lps]
        table = _layout_stage12(view, names, rank)
    lnames, numels, groups, frags, shapes, index = table
    tp = _compat.tp_group(layer_params)
    if tp is None:
        reduce = _all_reduce_fn(group) if world > 1 else None
    elif kind == _compat.ZeroKind.STAGE3:
        raise ValueError('"tensor_parallel.autotp_size" > 1 with ZeRO stage 3 is not supported with AdamHD; use '
                         "ZeRO stage 1 or 2")
    else:
        reduce = _tp_reduce(layer_params, group, tp)
    layout = FlatLayout(lnames, numels, groups, frags, reduce, shapes, engine_index=index)
    opt.set_layer_stats(FlatLayerStats(layout))
    _wrap_step(zopt, opt)


def _tp_reduce(layer_params: list[Tensor], dp, tp):
    """The one collective under AutoTP: every layer's ``Σ|θ|`` summed over the whole tensor × data-parallel mesh,
    a layer AutoTP replicates counted on tensor-parallel rank 0 only, then scaled by ``local numel / whole numel``
    so that the layout's (local) numel divides it into the mean over the whole layer."""
    tp_size, tp_rank, dp_size = dist.get_world_size(group=tp), dist.get_rank(group=tp), dist.get_world_size(group=dp)
    if tp_size * dp_size != dist.get_world_size():
        raise ValueError(f'"tensor_parallel.autotp_size" = {tp_size} with {dp_size} data-parallel ranks covers '
                         f"{tp_size * dp_size} of the {dist.get_world_size()} ranks (pipeline or other model "
                         f"parallelism): AdamHD supports AutoTP only where tensor x data parallel is the whole world")
    sliced = torch.tensor([_compat.is_tp_sliced(p) for p in layer_params], dtype=torch.bool)
    local = torch.tensor([float(p.numel()) for p in layer_params], dtype=torch.float64)
    whole = torch.where(sliced, local, torch.zeros_like(local))
    dist.all_reduce(whole, group=tp)  # a split layer's numel is the sum of its slices (AutoTP may split unevenly)
    whole = torch.where(sliced, whole, local)
    weight = torch.where(sliced, torch.ones_like(local), torch.full_like(local, 1.0 if tp_rank == 0 else 0.0))
    scale = local / whole
    world_sum = _all_reduce_fn(dist.group.WORLD)

    def reduce(sums: Tensor) -> Tensor:
        return world_sum(sums * weight.to(sums.device)) * scale.to(sums.device)
    return reduce


def _layout_stage12(view: _compat.Stage12View, names: dict[int, str], rank: int):
    """ZeRO-1/2 and the BF16 optimizer: each param group is flattened (params in ``view.lp_groups`` order, at
    ``view.offsets``, with alignment padding) and cut into equal per-rank slices; ``view.partitions[g]`` is this
    rank's slice."""
    lnames, numels, groups, frags, shapes, index = [], [], [], {}, [], {}
    for gi, (lps, offsets, flat) in enumerate(zip(view.lp_groups, view.offsets, view.partitions)):
        if view.moe[gi]:
            raise ValueError("MoE param groups (expert-parallel) are not supported with AdamHD")
        index[flat] = gi
        size = flat.numel()
        lo, hi = rank * size, (rank + 1) * size
        frags[flat] = []
        for lp, start in zip(lps, offsets):
            layer = len(lnames)
            lnames.append(names.get(id(lp), f"group{gi}.param{layer}"))
            n = int(lp.numel())
            numels.append(n)
            shapes.append(tuple(lp.shape))
            groups.append(gi)
            a, b = max(start, lo), min(start + n, hi)
            if a < b:
                frags[flat].append(Fragment(layer, a - lo, b - a, a - start))
    return lnames, numels, groups, frags, shapes, index


def _layout_stage3(zopt, names: dict[int, str], rank: int):
    """ZeRO-3: every param is partitioned on its own (``ceil(numel / W)`` per rank, tail padding); a sub-group's
    flat fp32 buffer is the concatenation of its params' partitions; the inner step runs once per sub-group."""
    lnames, numels, groups, frags, shapes, index = [], [], [], {}, [], {}
    for sg, sub in enumerate(_compat.stage3_view(zopt)):
        index[sub.flat] = sg
        frags[sub.flat] = []
        offset = 0
        for p, n, shape, pn in zip(sub.params, sub.numels, sub.shapes, sub.partition_numels):
            layer = len(lnames)
            lnames.append(names.get(id(p), f"group{sub.group}.param{layer}"))
            numels.append(n)
            shapes.append(shape)
            groups.append(sub.group)
            valid = min(pn, n - rank * pn)
            if valid > 0:
                frags[sub.flat].append(Fragment(layer, offset, valid, rank * pn))
            offset += pn
    return lnames, numels, groups, frags, shapes, index


def _wrap_step(zopt, opt: AdamHD) -> None:
    if getattr(zopt, "_adamhd_wrapped", False):
        return
    inner_step = zopt.step

    def step(*args, **kwargs):
        opt.begin_step()  # one all-reduce of every layer's Σ|θ|; μ moves only if the inner step runs
        return inner_step(*args, **kwargs)

    zopt.step = step
    zopt._adamhd_wrapped = True


def full_state(engine, keys: tuple[str, ...] | None = None) -> dict[str, dict[str, Tensor]]:
    """Whole fp32 tensors of every layer the optimizer updates, by parameter name: ``"param"`` (the fp32 master
    weights) and optimizer state keys (default: ``exp_avg``, ``exp_avg_sq`` and, with amsgrad,
    ``max_exp_avg_sq``), plus ``"delta_ema"`` (μ) where a layer has one. Collective: every rank of the
    data-parallel group must call it; the result is complete on every rank.
    Holds one whole copy per key in CPU memory: for analysis and export, not for the training loop."""
    opt = find_adamhd(engine)
    if keys is None:
        keys = ("param", "exp_avg", "exp_avg_sq") + (
            ("max_exp_avg_sq",) if any(g["amsgrad"] for g in opt.param_groups) else ())
    if not opt.layer_stats.flat:  # stage 0: layers are whole on every rank
        out = {}
        for g in opt.param_groups:
            for name, p in zip(g.get("param_names", range(len(g["params"]))), g["params"]):
                st = opt.state.get(p, {})
                out[name] = {k: (p if k == "param" else st[k]).detach().float().cpu().clone()
                             for k in keys if k == "param" or k in st}
                if "delta_ema" in st:
                    out[name]["delta_ema"] = st["delta_ema"].detach().float().cpu().clone()
        return out
    lay = opt.layer_stats.layout
    group = _compat.dp_group(engine.optimizer)
    out: dict[str, dict[str, Tensor]] = {name: {} for name in lay.names}
    for key in keys:
        buf = lay.scatter_local(lambda flat: flat if key == "param" else opt.state.get(flat, {}).get(key))
        if dist.get_world_size(group=group) > 1:
            buf = _all_reduce_fn(group)(buf)  # a CPU buffer goes through the GPU under NCCL
        for name, t in lay.split_layers(buf).items():
            out[name][key] = t
    for name, st in opt.layer_state.state_dict().items():
        out[name]["delta_ema"] = st["delta_ema"]
    return out
