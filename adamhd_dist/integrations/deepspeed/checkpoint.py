"""DeepSpeed checkpoints with AdamHD: μ by layer name beside DeepSpeed's own files, loads at another world size,
and the export of a whole checkpoint by parameter name.

``engine.save_checkpoint`` (wrapped by :func:`wrap_checkpointing`) stores the inner optimizer state as DeepSpeed
does (``exp_avg``, ``exp_avg_sq``, ``step`` per flat partition) plus μ of every layer keyed by parameter name, in the
inner state and in ``adamhd_layer_state.pt`` beside the shards (DeepSpeed's universal conversion drops keys it does
not know). ``engine.load_checkpoint`` restores μ from either; at another world size every saved piece of a layer is
matched to where that layer lives now. :func:`export_checkpoint` (``python -m adamhd_dist.deepspeed export``)
writes the full fp32 model and the full optimizer state, by parameter name, without starting DeepSpeed.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ...fsutil import CHECKSUMS, atomic_write, verify_checksums
from ...optim.optimizer import AdamHD
from ...optim.stats import delta_setting
from . import _compat

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""The per-element optimizer state carried through a reshard and the export (amsgrad's running maximum too)."""

__all__ = ["LAYER_STATE_FILE", "wrap_checkpointing", "export_checkpoint", "to_universal", "resolve_tag_dir", "iter_saved_fragments",
           "reshard_optimizer_state", "main"]

LAYER_STATE_FILE = "adamhd_layer_state.pt"


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _side_file(engine) -> str:
    """The side file's name in a tag folder: one per pipeline stage (each stage holds other layers, its μ is
    written by the stage's first data-parallel rank), else one for the whole run."""
    stages = _compat.pipeline_stage(engine)
    return LAYER_STATE_FILE if stages is None else f"adamhd_layer_state.stage{stages[0]}.pt"


def _side_info(engine, opt: AdamHD, group) -> dict:
    stages = _compat.pipeline_stage(engine)
    return {"layer_state": opt.layer_state.state_dict(), "world_size": dist.get_world_size(group=group),
            "zero_stage": engine.zero_optimization_stage(), "tp_size": _compat.tp_world_size(),
            "pipeline_stages": 1 if stages is None else stages[1], "format": 1}


def _universal_layer_state(tag_dir: Path) -> dict:
    """μ by layer name from every AdamHD side file in a universal checkpoint's folder (one per pipeline stage of
    the run that wrote the source checkpoint, or one): independent of how the layers are cut now."""
    files = sorted(tag_dir.glob("adamhd_layer_state*.pt"))
    if not files:
        raise ValueError(
            f"universal checkpoint {str(tag_dir)!r} has no AdamHD layer state ({LAYER_STATE_FILE}): DeepSpeed's "
            f"ds_to_universal keeps the weights and moments but not μ, and loading it would restart every layer's "
            f"δ average silently. Convert with `python -m adamhd_dist.deepspeed to-universal SOURCE_TAG_DIR "
            f"{str(tag_dir)!r}`, which copies it, or copy adamhd_layer_state*.pt from the source checkpoint's tag "
            f"folder into this one")
    state: dict = {}
    for path in files:
        state.update(_read_side(path)["layer_state"])
    return state


def _check_universal_coverage(layer_state: dict | None, opt: AdamHD, tag_dir: Path) -> None:
    """Every decayed layer of this optimizer must find its μ in a universal checkpoint that has any μ."""
    if not layer_state:
        return
    lay = opt.layer_stats.layout
    ema = [(d := delta_setting(g)) is not None and d.mode == "ema" for g in opt.param_groups]
    decayed = [name for name, g in zip(lay.names, lay.groups) if ema[g]]
    missing = [name for name in decayed if name not in layer_state]
    if missing:
        raise ValueError(f"universal checkpoint {str(tag_dir)!r} has no μ for {len(missing)} decayed layer(s) of "
                         f"this model, e.g. {missing[:3]}: it holds another model, or a side file of a pipeline "
                         f"stage was not copied into it")


def _refuse_universal_zero3(engine, tag_dir: Path) -> None:
    """ZeRO-3 reads a universal checkpoint into its fp32 partitions exactly, but the run then leaves the
    uninterrupted one (seen by hand with tests/test_deepspeed.py's model, 4.4e-3 of max|θ| five steps later):
    refused until it is exact. Our own reshard covers ZeRO-3 at another data-parallel size."""
    if engine.zero_optimization_stage() == 3:
        raise ValueError(
            f'"checkpoint": {{"load_universal": true}} with ZeRO stage 3 ({str(tag_dir)!r}): not supported with AdamHD '
            f"(after DeepSpeed's universal load at stage 3 the run does not continue as the uninterrupted one). To "
            f"change the data-parallel size at ZeRO-3, load the original checkpoint without load_universal: "
            f"adamhd_dist reshards it exactly by layer name; universal checkpoints load at ZeRO stage 1 or 2")


def _refuse_model_parallel_reshard(side: dict, tag_dir: Path, engine, world: int) -> None:
    """adamhd_dist's own reshard matches flat pieces by layer name: it is exact for data-parallel ranks only. A
    checkpoint with tensor-parallel slices or pipeline stages changes layout through DeepSpeed's universal
    checkpoint instead."""
    saved_tp, tp = side.get("tp_size", 1), _compat.tp_world_size()
    saved_pp = side.get("pipeline_stages", 1)
    stages = _compat.pipeline_stage(engine)
    pp = 1 if stages is None else stages[1]
    if saved_tp == tp == 1 and saved_pp == pp == 1:
        return
    raise ValueError(
        f"checkpoint {str(tag_dir)!r} was written at tensor-parallel size {saved_tp}, {saved_pp} pipeline "
        f"stage(s) and {side['world_size']} data-parallel ranks; this engine runs tensor-parallel size {tp}, {pp} "
        f"stage(s) and {world} data-parallel ranks. Loading it at another layout is supported through DeepSpeed's "
        f"universal checkpoint: `python -m adamhd_dist.deepspeed to-universal {str(tag_dir)!r} OUT_DIR`, then "
        f'load with "checkpoint": {{"load_universal": true}}')


def wrap_checkpointing(engine, opt: AdamHD, group) -> None:
    """Make ``engine.save_checkpoint`` write AdamHD's side file and ``engine.load_checkpoint`` restore μ, and load a
    checkpoint saved at another data-parallel world size piece by piece (idempotent)."""
    if getattr(engine, "_adamhd_ckpt_wrapped", False):
        return
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, *args, **kwargs):
        tag = f"global_step{engine.global_steps}" if tag is None else tag
        out = save(save_dir, tag, *args, **kwargs)
        writer = dist.get_rank() == 0 if _compat.pipeline_stage(engine) is None else dist.get_rank(group=group) == 0
        if writer:
            _atomic_torch_save(_side_info(engine, opt, group), Path(save_dir) / str(tag) / _side_file(engine))
        dist.barrier()
        return out

    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        # every load may write the fp32 masters through .data (no version-counter bump): re-read the statistic
        opt.invalidate_layer_stats()
        universal = _compat.loads_universal(engine)
        if tag is None:
            latest = Path(load_dir) / ("latest_universal" if universal else "latest")
            if not latest.is_file():
                return load(load_dir, tag, *args, **kwargs)
            tag = latest.read_text().strip()
        tag_dir = Path(load_dir) / str(tag)
        if universal:  # DeepSpeed reshards weights and moments; μ comes by layer name from the side files
            _refuse_universal_zero3(engine, tag_dir)
            layer_state = _universal_layer_state(tag_dir) if tag_dir.is_dir() else None
            _check_universal_coverage(layer_state, opt, tag_dir)
            out = load(load_dir, tag, *args, **kwargs)
            if out[0] is not None and layer_state is not None:
                opt.layer_state.load_state_dict(layer_state, strict=False)
            opt.invalidate_layer_stats()
            return out
        side = _read_side(tag_dir / _side_file(engine))
        world = dist.get_world_size(group=group)
        wants_optim = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        if side is not None and wants_optim:
            same = side["world_size"] == world and side.get("tp_size", 1) == _compat.tp_world_size()
            if not same:
                _refuse_model_parallel_reshard(side, tag_dir, engine, world)
        if side is not None and wants_optim and side["world_size"] != world:
            if side["zero_stage"] != engine.zero_optimization_stage():
                raise ValueError(f"checkpoint {str(Path(load_dir) / str(tag))!r} was written at ZeRO stage "
                                 f"{side['zero_stage']}; this engine runs stage {engine.zero_optimization_stage()}")
            if engine.zero_optimization_stage() == 3:
                # DeepSpeed looks for one model-states file per current rank: load the whole checkpoint here
                out = _load_stage3_resharded(engine, opt, group, Path(load_dir) / str(tag),
                                             kwargs.get("load_lr_scheduler_states", True))
            else:
                kwargs["load_optimizer_states"] = False
                out = load(load_dir, tag, *args, **kwargs)
                if out[0] is not None:
                    reshard_optimizer_state(engine, opt, Path(load_dir) / str(tag))
        else:
            out = load(load_dir, tag, *args, **kwargs)
        if out[0] is not None and side is not None and wants_optim:
            opt.layer_state.load_state_dict(side["layer_state"])
        opt.invalidate_layer_stats()
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
    inner, masters = _compat.saved_partitions(sd)
    if inner is None and masters is None:
        raise ValueError(f"{str(path)!r} is not a DeepSpeed ZeRO optimizer state file (no optimizer_state_dict)")
    if not isinstance(inner, dict) or "flat_layout" not in inner or masters is None:
        raise ValueError("this ZeRO checkpoint has no AdamHD flat layout: it was not written through "
                         "adamhd_dist.deepspeed, so it cannot be loaded at another world size")
    return inner, masters


def iter_saved_fragments(tag_dir: Path):
    """Yield ``(layer name, offset, {"param", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}: 1-D fp32 pieces, step)``
    for every piece
    of every layer in a ZeRO checkpoint written through this module, one rank file at a time."""
    for path in _optim_files(tag_dir):
        inner, masters = _saved_partitions(_load_file(path), path)
        for idx, meta in inner["flat_layout"].items():
            st = inner["state"].get(idx, {})
            master = masters[meta["engine_index"]].detach().reshape(-1)
            step = st.get("step")
            for name, start, numel, offset in meta["fragments"]:
                pieces = {"param": master[start:start + numel]}
                for key in MOMENTS:
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
    lay = opt.layer_stats.layout
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
            for key in MOMENTS:
                if key in pieces:
                    if key not in st:  # amsgrad's running maximum, before the first step made it
                        st[key] = torch.zeros_like(st["exp_avg_sq"])
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
    opt.layer_state.load_state_dict(layer_state, strict=False)
    _compat.refresh_low_precision(engine.optimizer)
    opt.invalidate_layer_stats()  # the masters were written through .data


@torch.no_grad()
def _load_stage3_resharded(engine, opt: AdamHD, group, tag_dir: Path, load_lr_scheduler_states: bool = True):
    """Load a ZeRO-3 checkpoint written at another world size: module buffers and frozen params from the saved
    model states, trainable params with their optimizer state through the layout, and the engine's counters and
    scheduler."""
    first, pieces = _model_states(tag_dir)
    rank = dist.get_rank(group=group)
    saved_module = first.get("module") or {}
    for name in first.get("buffer_names") or []:
        if name not in saved_module:
            raise ValueError(f"checkpoint {str(tag_dir)!r} names the buffer {name!r} but holds no value for it")
        engine.module.get_buffer(name).copy_(saved_module[name])
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            continue
        if name not in pieces:
            raise ValueError(f"checkpoint {str(tag_dir)!r} has no saved value for the frozen parameter {name!r}")
        _compat.write_frozen_partition(p, pieces[name][:_compat.whole_numel(p)], rank)
    reshard_optimizer_state(engine, opt, tag_dir)
    _compat.set_engine_counters(engine, first, first.get("dp_world_size"))
    if load_lr_scheduler_states and engine.lr_scheduler is not None and first.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(first["lr_scheduler"])
    return str(tag_dir), {k: v for k, v in first.items() if k not in _compat.ENGINE_FILE_KEYS}


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
        for name, frag in _compat.frozen_fragments(sd).items():
            pieces.setdefault(name, []).append(frag.reshape(-1))
    return first, {name: torch.cat(parts) for name, parts in pieces.items()}


@torch.no_grad()
def export_checkpoint(checkpoint_dir: str | os.PathLike, tag: str | None = None,
                      out: str | os.PathLike | None = None) -> dict:
    """The full fp32 model and the full optimizer state of a ZeRO checkpoint written through this module, by
    parameter name, without starting DeepSpeed or a process group.

    Returns (and with ``out``, saves atomically) ``{"model": state_dict of fp32 tensors (trainable params from
    the fp32 masters, frozen params, buffers, tied aliases), "optimizer": {name: {"exp_avg", "exp_avg_sq" (and
    amsgrad's "max_exp_avg_sq"), "step", and "delta_ema" where the layer has μ}}, "global_steps", "zero_stage",
    "world_size", "verified"}``; the model part loads into the unwrapped model with ``model.load_state_dict``.

    A tag folder with a ``checksums.json`` (the launcher writes one into every checkpoint) is verified before
    anything is read: a file that is missing, has another size or another checksum is a ValueError naming it.
    ``"verified"`` says whether the record was there."""
    tag_dir = resolve_tag_dir(checkpoint_dir, tag)
    problems = verify_checksums(tag_dir)
    if problems:
        raise ValueError(f"checkpoint {str(tag_dir)!r} fails verification against its {CHECKSUMS}, nothing was "
                         f"exported:\n  " + "\n  ".join(problems))
    _refuse_model_parallel_export(tag_dir)
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
              "zero_stage": _saved_zero_stage(tag_dir), "world_size": first.get("dp_world_size"), "verified": problems is not None}
    if out is not None:
        _atomic_torch_save(result, Path(out))
    return result


def _refuse_model_parallel_export(tag_dir: Path) -> None:
    """The export joins data-parallel pieces by layer name: a tensor-parallel rank file holds slices of the split
    layers under their whole names, and a pipeline checkpoint one stage's layers per file, so neither is exported
    (a universal checkpoint holds every parameter whole, in ``zero/<name>/fp32.pt``)."""
    mp_ranks = {m.group(1) for f in tag_dir.glob("*model_states.pt") if (m := re.search(r"mp_rank_(\d+)", f.name))}
    stage_files = sorted(f.name for f in tag_dir.glob("adamhd_layer_state.stage*.pt"))
    side = _read_side(tag_dir / LAYER_STATE_FILE)
    tp = 1 if side is None else side.get("tp_size", 1)
    if len(mp_ranks) > 1 or tp > 1 or stage_files:
        what = f"pipeline stages ({', '.join(stage_files)})" if stage_files else \
            f"tensor-parallel slices ({max(tp, len(mp_ranks))} model-parallel ranks)"
        raise ValueError(f"checkpoint {str(tag_dir)!r} holds {what}: export joins data-parallel pieces only. "
                         f"DeepSpeed's universal checkpoint writes every parameter whole (weights and moments, "
                         f"zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt): `python -m adamhd_dist.deepspeed "
                         f"to-universal {str(tag_dir)!r} OUT_DIR` (μ by layer name in OUT_DIR/{LAYER_STATE_FILE})")


def to_universal(tag_dir: str | os.PathLike, out_dir: str | os.PathLike, *, workers: int = 4) -> Path:
    """DeepSpeed's ``ds_to_universal`` on one checkpoint folder, keeping AdamHD's μ: the side files of the source
    (one per pipeline stage, or one) are copied into ``out_dir``, where ``"load_universal": true`` finds them (it
    reads the folder named in ``out_dir``'s parent ``latest_universal``, which the conversion writes). A source with
    a ``checksums.json`` is verified first. Returns ``out_dir``."""
    src, out = Path(tag_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {str(src)!r}")
    problems = verify_checksums(src)
    if problems:
        raise ValueError(f"checkpoint {str(src)!r} fails verification against its {CHECKSUMS}, nothing was "
                         f"converted:\n  " + "\n  ".join(problems))
    sides = sorted(src.glob("adamhd_layer_state*.pt"))
    if not sides:
        raise ValueError(f"{str(src)!r} has no AdamHD layer state ({LAYER_STATE_FILE}): it was not saved through "
                         f"adamhd_dist.deepspeed (initialize or attach), so there is no μ to keep")
    for path in sides:
        _read_side(path)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {str(out)!r} exists and is not empty")
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed (exit {proc.returncode}) on {str(src)!r}:\n"
                           + (proc.stderr or proc.stdout)[-4000:])
    for path in sides:
        data = path.read_bytes()
        atomic_write(out / path.name, lambda f, data=data: f.write(data), binary=True)
    return out


def _saved_zero_stage(tag_dir: Path):
    side = _read_side(tag_dir / LAYER_STATE_FILE)
    return None if side is None else side["zero_stage"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adamhd_dist.deepspeed",
                                     description="Tools for ZeRO checkpoints written by adamhd_dist.deepspeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the full fp32 model and the full optimizer state (by parameter "
                                       "name) of a ZeRO checkpoint to one file")
    ex.add_argument("checkpoint_dir", help="the folder given to engine.save_checkpoint (or one tag folder in it)")
    ex.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    ex.add_argument("--out", required=True, help="output file (.pt), written atomically")
    uni = sub.add_parser("to-universal", help="DeepSpeed's universal checkpoint (ds_to_universal) of one checkpoint "
                                              "folder, with AdamHD's μ copied in: load it at another data- or "
                                              'tensor-parallel size with "checkpoint": {"load_universal": true}')
    uni.add_argument("tag_dir", help="the checkpoint's tag folder (e.g. ckpt/global_step1000)")
    uni.add_argument("out_dir", help="the universal checkpoint's folder, beside the source (e.g. "
                                     "ckpt/global_step1000_universal); its parent gets 'latest_universal'")
    uni.add_argument("--workers", type=int, default=4, help="processes extracting ZeRO shards (default 4)")
    args = parser.parse_args(argv)
    if args.command == "to-universal":
        if args.workers < 1:
            parser.error(f"--workers {args.workers}: must be at least 1")
        try:
            out = to_universal(args.tag_dir, args.out_dir, workers=args.workers)
        except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
            parser.error(str(e))
        print(f"wrote universal checkpoint {out} with AdamHD's μ ({LAYER_STATE_FILE}); load it with "
              f'"checkpoint": {{"load_universal": true}} from {out.parent}')
        return 0
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
          f"stage {result['zero_stage']} on {result['world_size']} ranks; "
          + ("every file verified against its checksums" if result["verified"] else
             f"not verified (the checkpoint has no {CHECKSUMS})"))
    return 0
