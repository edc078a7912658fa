"""AdamHD under DeepSpeed: ZeRO-1/2/3, the BF16 optimizer and CPU offload, with exact per-layer δ.

    engine, optimizer, _, scheduler = adamhd_dist.deepspeed.initialize(model=model, config="ds_configs/zero2_adamhd.json")

DeepSpeed has no optimizer registry (``"type": "AdamHD"`` fails its sanity check), so :func:`initialize` reads the
config's ``"optimizer"`` section itself, builds :class:`~adamhd_dist.AdamHD` as a client optimizer, sets what
DeepSpeed needs for one (``zero_allow_untested_optimizer``; ``zero_force_ds_cpu_optimizer: false`` with offload),
then gives the optimizer the layout DeepSpeed chose: which slice of which flat fp32 partition holds which part of
which layer (:class:`~adamhd_dist.distributed.layout.FlatLayout`). Per training step, the engine's optimizer step first sums
every layer's ``Σ|θ|`` over the data-parallel ranks in ONE all-reduce, then runs DeepSpeed's own step (overflow
check, unscale, clipping, then the inner step per param group or ZeRO-3 sub-group). A step DeepSpeed skips for fp16
overflow never reaches the inner step, so step, moments and μ stay as they were.

Checkpoints: ``engine.save_checkpoint`` stores the inner optimizer state as DeepSpeed does (``exp_avg``,
``exp_avg_sq``, ``step`` per flat partition, so DeepSpeed's universal checkpoint can reshard them) plus μ of every
layer keyed by parameter name, in the inner state and in ``adamhd_layer_state.pt`` beside the shards (DeepSpeed's
universal conversion drops keys it does not know). ``engine.load_checkpoint`` restores μ from either, at any world
size. :func:`export_checkpoint` (``python -m adamhd_dist.deepspeed export``) writes the full fp32 model and the
full optimizer state, by parameter name, from a ZeRO checkpoint.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...distributed.collectives import all_reduce_sums
from ...optim.deltas import layer_deltas, register_layer_deltas
from ...fsutil import atomic_write
from ...optim.grouping import param_groups as default_param_groups
from ...distributed.layout import FlatLayout, Fragment
from ...optim.optimizer import AdamHD

__all__ = ["initialize", "load_config", "adamhd_kwargs", "attach_layout", "full_state", "export_checkpoint",
           "LAYER_STATE_FILE", "ADAMHD_PARAMS"]

LAYER_STATE_FILE = "adamhd_layer_state.pt"
ADAMHD_PARAMS = tuple(k for k in inspect.signature(AdamHD.__init__).parameters if k not in ("self", "params"))
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


# ----------------------------------------------------------------------------------------------------------------
# initialize
def initialize(model: torch.nn.Module, config: dict | str | os.PathLike, model_parameters=None, **kwargs):
    """``deepspeed.initialize`` with AdamHD from the config's ``"optimizer"`` section, exact under ZeRO.

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
                         "own, call deepspeed.initialize and then adamhd_dist.deepspeed.attach_layout(engine)")
    cfg = load_config(config)
    if not is_adamhd_config(cfg):
        return deepspeed.initialize(model=model, config=cfg, model_parameters=model_parameters, **kwargs)
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
    attach_layout(out[0])
    return out


def _inner_adamhd(engine) -> AdamHD:
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, AdamHD):
        opt = getattr(opt, "optimizer", None)
    if opt is None:
        raise TypeError("this DeepSpeed engine does not run an AdamHD optimizer")
    return opt


def _names_by_id(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def _all_reduce_fn(group):
    # NCCL has no CPU tensors: an offloaded (CPU) layout's sums then go through the current GPU
    fallback = "cuda" if dist.get_backend(group) == "nccl" else None
    return lambda sums: all_reduce_sums(sums, group, fallback or sums.device.type)


def _layout_stage12(zopt, names: dict[int, str], lp_groups, flat_parts, rr_groups, rr_offsets, rank):
    """ZeRO-1/2 and the BF16 optimizer: each param group is flattened (in ``rr_groups`` order, at ``rr_offsets``,
    with alignment padding) and cut into equal per-rank slices; ``flat_parts[g]`` is this rank's slice."""
    lnames, numels, groups, frags, shapes, index = [], [], [], {}, [], {}
    for gi, lps in enumerate(lp_groups):
        if zopt.optimizer.param_groups[gi].get("moe", False):
            raise ValueError("MoE param groups (expert-parallel) are not supported with AdamHD")
        flat = flat_parts[gi]
        index[flat] = gi
        size = flat.numel()
        lo, hi = rank * size, (rank + 1) * size
        where = {id(p): int(o) for p, o in zip(rr_groups[gi], rr_offsets[gi])}
        frags[flat] = []
        for lp in lps:
            layer = len(lnames)
            lnames.append(names.get(id(lp), f"group{gi}.param{layer}"))
            n = int(lp.numel())
            numels.append(n)
            shapes.append(tuple(getattr(lp, "ds_shape", lp.shape)))
            groups.append(gi)
            a, b = max(where[id(lp)], lo), min(where[id(lp)] + n, hi)
            if a < b:
                frags[flat].append(Fragment(layer, a - lo, b - a, a - where[id(lp)]))
    return lnames, numels, groups, frags, shapes, index


def _layout_stage3(zopt, names: dict[int, str]):
    """ZeRO-3: every param is partitioned on its own (``ceil(numel / W)`` per rank, tail padding); a sub-group's
    flat fp32 buffer is the concatenation of its params' partitions; the inner step runs once per sub-group."""
    rank = dist.get_rank(group=zopt.dp_process_group)
    lnames, numels, groups, frags, shapes, index = [], [], [], {}, [], {}
    for sg, params in enumerate(zopt.fp16_groups):
        flat = zopt.fp32_partitioned_groups_flat[sg]
        gi = zopt.sub_group_to_group_id[sg]
        index[flat] = sg
        frags[flat] = []
        offset = 0
        for p in params:
            layer = len(lnames)
            lnames.append(names.get(id(p), f"group{gi}.param{layer}"))
            numels.append(int(p.ds_numel))
            shapes.append(tuple(p.ds_shape))
            groups.append(gi)
            pn = int(p.partition_numel())
            valid = min(pn, int(p.ds_numel) - rank * pn)
            if valid > 0:
                frags[flat].append(Fragment(layer, offset, valid, rank * pn))
            offset += pn
    return lnames, numels, groups, frags, shapes, index


def attach_layout(engine) -> AdamHD:
    """Give the engine's AdamHD the layout of its ZeRO partitions and make the engine's optimizer step sum the
    per-layer statistics once per training step. Safe to call on any stage (stage 0 keeps whole layers)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = _inner_adamhd(engine)
    zopt = engine.optimizer
    names = _names_by_id(engine.module)
    if isinstance(zopt, DeepSpeedZeroOptimizer):
        group = zopt.dp_process_group
        table = _layout_stage12(zopt, names, zopt.bit16_groups, zopt.single_partition_of_fp32_groups,
                                zopt.round_robin_bit16_groups, zopt.round_robin_bit16_offsets,
                                dist.get_rank(group=group))
        if any(g is not group for g in zopt.real_dp_process_group):
            raise ValueError("param groups with different data-parallel groups are not supported with AdamHD")
    elif isinstance(zopt, BF16_Optimizer):
        group = zopt.dp_process_group
        offsets = [list(itertools.accumulate([0] + [p.numel() for p in g]))[:-1] for g in zopt.bf16_groups]
        table = _layout_stage12(zopt, names, zopt.bf16_groups, zopt.fp32_groups_flat_partition,
                                zopt.bf16_groups, offsets, dist.get_rank(group=group))
    elif isinstance(zopt, DeepSpeedZeroOptimizer_Stage3):
        table = _layout_stage3(zopt, names)
        group = zopt.dp_process_group
    else:
        # stage 0 (plain or FP16_Optimizer): every layer is whole on every rank; only names to attach
        for g in opt.param_groups:
            if "param_names" not in g and all(id(p) in names for p in g["params"]):
                g["param_names"] = [names[id(p)] for p in g["params"]]
        engine._adamhd_optimizer = opt
        return opt
    lnames, numels, groups, frags, shapes, index = table
    world = dist.get_world_size(group=group)
    layout = FlatLayout(lnames, numels, groups, frags, _all_reduce_fn(group) if world > 1 else None, shapes,
                        engine_index=index)
    engine._adamhd_dp_group = group
    opt.set_layout(layout)
    _wrap_step(zopt, opt)
    _wrap_checkpointing(engine, opt)
    engine._adamhd_optimizer = opt
    return opt


def _wrap_step(zopt, opt: AdamHD) -> None:
    if getattr(zopt, "_adamhd_wrapped", False):
        return
    inner_step = zopt.step

    def step(*args, **kwargs):
        opt.begin_step()  # one all-reduce of every layer's Σ|θ|; μ moves only if the inner step runs
        return inner_step(*args, **kwargs)

    zopt.step = step
    zopt._adamhd_wrapped = True


def full_state(engine, keys: tuple[str, ...] = ("param", "exp_avg", "exp_avg_sq")) -> dict[str, dict[str, Tensor]]:
    """Whole fp32 tensors of every layer the optimizer updates, by parameter name: ``"param"`` (the fp32 master
    weights) and optimizer state keys, plus ``"delta_ema"`` (μ) where a layer has one. Collective: every rank of
    the data-parallel group must call it; the result is complete on every rank.
    Holds one whole copy per key in CPU memory: for analysis and export, not for the training loop."""
    opt = engine._adamhd_optimizer
    lay = opt.layout
    if lay is None:  # stage 0: layers are whole on every rank
        out = {}
        for g in opt.param_groups:
            for name, p in zip(g.get("param_names", range(len(g["params"]))), g["params"]):
                st = opt.state.get(p, {})
                out[name] = {k: (p if k == "param" else st[k]).detach().float().cpu().clone()
                             for k in keys if k == "param" or k in st}
                if "delta_ema" in st:
                    out[name]["delta_ema"] = st["delta_ema"].detach().float().cpu().clone()
        return out
    group = engine._adamhd_dp_group
    out: dict[str, dict[str, Tensor]] = {name: {} for name in lay.names}
    for key in keys:
        buf = lay.scatter_local(lambda flat: flat if key == "param" else opt.state.get(flat, {}).get(key))
        if dist.get_world_size(group=group) > 1:
            dist.all_reduce(buf, group=group)
        for name, t in lay.split_layers(buf).items():
            out[name][key] = t
    for name, st in lay.state_dict().items():
        out[name]["delta_ema"] = st["delta_ema"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _side_info(engine, opt: AdamHD) -> dict:
    return {"layer_state": opt.layout.state_dict(), "world_size": dist.get_world_size(group=engine._adamhd_dp_group),
            "zero_stage": engine.zero_optimization_stage(), "format": 1}


def _wrap_checkpointing(engine, opt: AdamHD) -> None:
    if getattr(engine, "_adamhd_ckpt_wrapped", False):
        return
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, *args, **kwargs):
        tag = f"global_step{engine.global_steps}" if tag is None else tag
        out = save(save_dir, tag, *args, **kwargs)
        if dist.get_rank() == 0:
            _atomic_torch_save(_side_info(engine, opt), Path(save_dir) / str(tag) / LAYER_STATE_FILE)
        dist.barrier()
        return out

    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        if tag is None:
            latest = Path(load_dir) / "latest"
            if not latest.is_file():
                return load(load_dir, tag, *args, **kwargs)
            tag = latest.read_text().strip()
        side = _read_side(Path(load_dir) / str(tag) / LAYER_STATE_FILE)
        world = dist.get_world_size(group=engine._adamhd_dp_group)
        wants_optim = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        if side is not None and wants_optim and side["world_size"] != world:
            if side["zero_stage"] != engine.zero_optimization_stage():
                raise ValueError(f"checkpoint {str(Path(load_dir) / str(tag))!r} was written at ZeRO stage "
                                 f"{side['zero_stage']}; this engine runs stage {engine.zero_optimization_stage()}")
            if engine.zero_optimization_stage() == 3:
                # DeepSpeed looks for one model-states file per current rank: load the whole checkpoint here
                out = _load_stage3_resharded(engine, opt, Path(load_dir) / str(tag),
                                             kwargs.get("load_lr_scheduler_states", True))
            else:
                kwargs["load_optimizer_states"] = False
                out = load(load_dir, tag, *args, **kwargs)
                if out[0] is not None:
                    reshard_optimizer_state(engine, opt, Path(load_dir) / str(tag))
        else:
            out = load(load_dir, tag, *args, **kwargs)
        if out[0] is not None and side is not None and wants_optim:
            opt.layout.load_state_dict(side["layer_state"])
        return out

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    engine._adamhd_ckpt_wrapped = True


def _load_file(path: Path, *, weights_only: bool = False):
    """torch.load of a checkpoint file; an unreadable or truncated one is a ValueError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read checkpoint file {str(path)!r}: {type(e).__name__}: {e}") from None


def _read_side(path: Path) -> dict | None:
    """The AdamHD side file of a tag folder (None when absent), checked."""
    if not path.is_file():
        return None
    side = _load_file(path, weights_only=True)
    missing = [k for k in ("layer_state", "world_size", "zero_stage") if not isinstance(side, dict) or k not in side]
    if missing:
        raise ValueError(f"checkpoint file {str(path)!r} is not an AdamHD layer-state file (format 1): it lacks "
                         f"{missing}")
    return side


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else -1


def _optim_files(tag_dir: Path) -> list[Path]:
    files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank_of)
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer state files (*zero_pp_rank_*_optim_states.pt) in {str(tag_dir)!r}")
    return files


def _saved_partitions(sd: dict, path: Path):
    """(inner AdamHD state_dict, list of fp32 master partitions) of one rank's ZeRO optimizer file."""
    osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
    if not isinstance(osd, dict):
        raise ValueError(f"{str(path)!r} is not a DeepSpeed ZeRO optimizer state file (no optimizer_state_dict)")
    inner = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
    masters = osd.get("single_partition_of_fp32_groups", osd.get("fp32_flat_groups"))
    if not isinstance(inner, dict) or "flat_layout" not in inner or masters is None:
        raise ValueError("this ZeRO checkpoint has no AdamHD flat layout: it was not written through "
                         "adamhd_dist.deepspeed, so it cannot be loaded at another world size")
    return inner, masters


def iter_saved_fragments(tag_dir: Path):
    """Yield ``(layer name, offset, {"param", "exp_avg", "exp_avg_sq"}: 1-D fp32 pieces, step)`` for every piece
    of every layer in a ZeRO checkpoint written through this module, one rank file at a time."""
    for path in _optim_files(tag_dir):
        inner, masters = _saved_partitions(_load_file(path), path)
        for idx, meta in inner["flat_layout"].items():
            st = inner["state"].get(idx, {})
            master = masters[meta["engine_index"]].detach().reshape(-1)
            step = st.get("step")
            for name, start, numel, offset in meta["fragments"]:
                pieces = {"param": master[start:start + numel]}
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        pieces[key] = st[key].reshape(-1)[start:start + numel]
                yield name, offset, pieces, step
        yield None, None, {"layer_state": inner.get("layer_state", {})}, None
        del inner, masters  # one rank file in memory at a time


@torch.no_grad()
def reshard_optimizer_state(engine, opt: AdamHD, tag_dir: Path) -> None:
    """Fill this rank's fp32 master partitions, moments and step from a checkpoint written at another world
    size: every saved piece of a layer lands where that layer's elements live now (matched by name and element
    range), then the model's low-precision copies are refreshed from the masters."""
    lay = opt.layout
    want: dict[str, list] = {}
    for flat, frags in lay.fragments.items():
        for f in frags:
            want.setdefault(lay.names[f.layer], []).append((flat, f))
    filled = {flat: 0 for flat in lay.fragments}
    steps = set()
    layer_state = {}
    for name, offset, pieces, step in iter_saved_fragments(tag_dir):
        if name is None:
            layer_state.update(pieces["layer_state"])
            continue
        if step is not None:
            steps.add(float(step))
        n = pieces["param"].numel()
        for flat, f in want.get(name, []):
            a, b = max(offset, f.offset), min(offset + n, f.offset + f.numel)
            if a >= b:
                continue
            src = slice(a - offset, b - offset)
            dst = slice(f.start + a - f.offset, f.start + b - f.offset)
            flat.data.view(-1)[dst] = pieces["param"][src].to(flat.device, flat.dtype)
            st = opt.state[flat]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in pieces:
                    st[key].view(-1)[dst] = pieces[key][src].to(st[key].device, st[key].dtype)
            filled[flat] += b - a
    for flat, frags in lay.fragments.items():
        need = sum(f.numel for f in frags)
        if filled[flat] != need:
            raise ValueError(f"checkpoint {str(tag_dir)!r} covers {filled[flat]} of the {need} elements this rank "
                             f"holds: it does not hold the same model")
    if len(steps) > 1:
        raise ValueError(f"checkpoint {str(tag_dir)!r} has partitions at different steps {sorted(steps)}")
    step = steps.pop() if steps else 0.0
    for flat in lay.fragments:
        opt.state[flat]["step"] = torch.tensor(step, dtype=torch.float32)
    lay.load_state_dict(layer_state, strict=False)
    _refresh_low_precision(engine.optimizer)


_ENGINE_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                "checkpoint_parallel_dimensions", "ds_config", "ds_version"}


@torch.no_grad()
def _load_stage3_resharded(engine, opt: AdamHD, tag_dir: Path, load_lr_scheduler_states: bool = True):
    """Load a ZeRO-3 checkpoint written at another world size: frozen params from their saved per-rank pieces,
    trainable ones with their optimizer state through the layout, and the engine's counters and scheduler."""
    first, pieces = _model_states(tag_dir)
    rank = dist.get_rank(group=engine._adamhd_dp_group)
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            continue
        if name not in pieces:
            raise ValueError(f"checkpoint {str(tag_dir)!r} has no saved value for the frozen parameter {name!r}")
        full = pieces[name][:p.ds_numel]
        pn = p.partition_numel()
        part = full[rank * pn:(rank + 1) * pn]
        p.ds_tensor.data.view(-1)[:part.numel()].copy_(part.to(p.ds_tensor.dtype))
    reshard_optimizer_state(engine, opt, tag_dir)
    engine.global_steps = first["global_steps"]
    engine.global_samples = first.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = first.get("skipped_steps", 0)
    engine.loaded_checkpoint_dp_world_size = first.get("dp_world_size")
    if load_lr_scheduler_states and engine.lr_scheduler is not None and first.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(first["lr_scheduler"])
    return str(tag_dir), {k: v for k, v in first.items() if k not in _ENGINE_KEYS}


def _refresh_low_precision(zopt) -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if isinstance(zopt, DeepSpeedZeroOptimizer_Stage3):
        for lp_flat, fp32_flat in zip(zopt.fp16_partitioned_groups_flat, zopt.fp32_partitioned_groups_flat):
            if lp_flat is not None and lp_flat.data_ptr() != fp32_flat.data_ptr():
                lp_flat.data.copy_(fp32_flat.data)
    else:
        zopt.update_lp_params()


# ----------------------------------------------------------------------------------------------------------------
# export
def resolve_tag_dir(checkpoint_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """The folder of one checkpoint: ``checkpoint_dir/tag``, with ``tag`` read from ``checkpoint_dir/latest`` when
    not given; ``checkpoint_dir`` may also be that folder itself."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {str(root)!r}")
    if tag is None:
        if list(root.glob("*optim_states.pt")):
            return root
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{str(root)!r} has no 'latest' file and no checkpoint files: pass the tag")
        tag = latest.read_text().strip()
    tag_dir = root / str(tag)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint tag {tag!r} not found in {str(root)!r}")
    return tag_dir


def _model_states(tag_dir: Path) -> tuple[dict, dict[str, Tensor]]:
    """(rank 0's model-states dict, {frozen param name: its ZeRO-3 pieces of every rank joined, flat}); the pieces
    are padded to the partition size, so a caller cuts the result to the parameter's numel."""
    files = sorted(tag_dir.glob("*model_states.pt"), key=_rank_of)
    if not files:
        raise FileNotFoundError(f"no model state files (*model_states.pt) in {str(tag_dir)!r}")
    first = None
    pieces: dict[str, list[Tensor]] = {}
    for path in files:
        sd = _load_file(path)
        first = sd if first is None else first
        for name, frag in (sd.get("frozen_param_fragments") or {}).items():
            pieces.setdefault(name, []).append(frag.reshape(-1))
    return first, {name: torch.cat(parts) for name, parts in pieces.items()}


@torch.no_grad()
def export_checkpoint(checkpoint_dir: str | os.PathLike, tag: str | None = None,
                      out: str | os.PathLike | None = None) -> dict:
    """The full fp32 model and the full optimizer state of a ZeRO checkpoint written through this module, by
    parameter name, without starting DeepSpeed or a process group.

    Returns (and with ``out``, saves atomically) ``{"model": state_dict of fp32 tensors (trainable params from
    the fp32 masters, frozen params, buffers, tied aliases), "optimizer": {name: {"exp_avg", "exp_avg_sq",
    "step", and "delta_ema" where the layer has μ}}, "global_steps", "zero_stage", "world_size"}``; the model
    part loads into the unwrapped model with ``model.load_state_dict``."""
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    first, frozen_frags = _model_states(tag_dir)
    shapes: dict[str, tuple] = {}
    for group in first.get("param_shapes") or []:
        shapes.update({k: tuple(v) for k, v in group.items()})
    full: dict[str, dict[str, Tensor]] = {}
    steps: dict[str, float] = {}
    layer_state: dict = {}
    covered: dict[str, int] = {}
    for name, offset, pieces, step in iter_saved_fragments(tag_dir):
        if name is None:
            layer_state.update(pieces["layer_state"])
            continue
        if name not in shapes:
            raise ValueError(f"checkpoint {str(tag_dir)!r}: layer {name!r} has no recorded shape")
        numel = math.prod(shapes[name])
        dst = full.setdefault(name, {k: torch.zeros(numel, dtype=torch.float32) for k in pieces})
        for key, piece in pieces.items():
            dst[key][offset:offset + piece.numel()] = piece.float()
        covered[name] = covered.get(name, 0) + pieces["param"].numel()
        if step is not None:
            steps[name] = float(step)
    for name in shapes:
        n = covered.get(name, 0)
        if n != math.prod(shapes[name]):
            raise ValueError(f"checkpoint {str(tag_dir)!r} holds {n} of the {math.prod(shapes[name])} elements of "
                             f"{name!r}: a rank file is missing")
    model: dict[str, Tensor] = {}
    module = first.get("module") or {}
    frozen_shapes = first.get("frozen_param_shapes") or {}
    for name, shape in frozen_shapes.items():
        if name in frozen_frags:  # ZeRO-3: each rank saved its partition
            model[name] = frozen_frags[name][:math.prod(shape)].view(tuple(shape)).float().clone()
        elif name in module:
            model[name] = module[name].float().clone()
    for name in first.get("buffer_names") or []:
        if name in module:
            model[name] = module[name].clone()
    for name, st in full.items():
        model[name] = st["param"].view(shapes[name]).clone()
    for alias, source in (first.get("shared_params") or {}).items():
        if source in model:
            model[alias] = model[source]
    optimizer = {}
    for name, st in full.items():
        entry = {k: v.view(shapes[name]).clone() for k, v in st.items() if k != "param"}
        entry["step"] = steps.get(name, 0.0)
        if name in layer_state and "delta_ema" in layer_state[name]:
            entry["delta_ema"] = torch.as_tensor(layer_state[name]["delta_ema"], dtype=torch.float32).clone()
        optimizer[name] = entry
    result = {"model": model, "optimizer": optimizer, "global_steps": first.get("global_steps"),
              "zero_stage": _saved_zero_stage(tag_dir), "world_size": first.get("dp_world_size")}
    if out is not None:
        _atomic_torch_save(result, Path(out))
    return result


def _saved_zero_stage(tag_dir: Path):
    side = _read_side(tag_dir / LAYER_STATE_FILE)
    return None if side is None else side["zero_stage"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m adamhd_dist.deepspeed",
                                     description="Tools for ZeRO checkpoints written by adamhd_dist.deepspeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the full fp32 model and the full optimizer state (by parameter "
                                       "name) of a ZeRO checkpoint to one file")
    ex.add_argument("checkpoint_dir", help="the folder given to engine.save_checkpoint (or one tag folder in it)")
    ex.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    ex.add_argument("--out", required=True, help="output file (.pt), written atomically")
    args = parser.parse_args(argv)
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} is a folder: give a file path (.pt)")
    try:
        result = export_checkpoint(args.checkpoint_dir, args.tag, args.out)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    n = sum(t.numel() for t in result["model"].values() if torch.is_tensor(t))
    with_mu = sum("delta_ema" in st for st in result["optimizer"].values())
    print(f"wrote {args.out}: {len(result['model'])} model tensors ({n:,} elements), optimizer state of "
          f"{len(result['optimizer'])} layers ({with_mu} with μ), step {result['global_steps']}, saved at ZeRO "
          f"stage {result['zero_stage']} on {result['world_size']} ranks")
    return 0


def _is_engine(obj) -> bool:
    return hasattr(obj, "_adamhd_optimizer")


register_layer_deltas(_is_engine, lambda engine: layer_deltas(engine._adamhd_optimizer))


if __name__ == "__main__":
    raise SystemExit(main())
