"""From the options a user gave to a complete, validated job: :func:`resolve_settings` and :func:`check_resume`.

Each concern is resolved by its own function, which fills its :class:`~adamhd_train.settings.TrainSettings` fields
from the options (None = not given), the model table, the DeepSpeed config and the hardware, and raises a
:class:`~adamhd_train.settings.SettingsError` naming the option:

- :func:`resolve_engine`: DeepSpeed (``--deepspeed CONFIG``) or FSDP2 (``--fsdp``), and the launcher they need;
- :func:`resolve_model`: the size (GPT-3 table or a CPU size), the default by hardware;
- :func:`resolve_data`: corpus, tokenizer, vocabulary;
- :func:`resolve_parallel`: tensor-parallel and pipeline degrees (``--tp``, ``--pp``) against the model, the world
  size and the engine; the data-parallel size ``world / (tp · pp)`` is what the batch is cut over;
- :func:`resolve_batch`: the global batch in tokens -> micro-batch x data-parallel ranks x accumulation;
- :func:`resolve_optimizer`: LR, weight decay, clipping (from the options, the config, GPT-3);
- :func:`resolve_precision`: fp32/bf16/fp16 from the option, the config and the hardware;
- :func:`resolve_schedule`: run length, LR warmup and decay, batch-size ramp, scaled to the run;
- :func:`resolve_output`: run directory, resume, evaluation/checkpoint/log intervals.

Then :func:`finish_run` checks what a new job and a job rebuilt from a manifest share (the batch plan at this
world size, the folders, the data source) and builds the config passed to the engine
(:func:`deepspeed_run_config`). Every bad input fails here, on every rank, before any data, model or process group
is made.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from adamhd_dist import AdamHD
# the integration module itself: its public name adamhd_dist.deepspeed does not export is_adamhd_config and
# check_config; importing it does not import deepspeed
from adamhd_dist import deepspeed as ads

from .checkpoints import CHECKPOINT_DIR, latest_checkpoint, read_trainer_state
from .data import EMBEDDED, LOCAL_BPE, looks_like_path
from .engine import config_dtype, deepspeed_config_for
from .manifest import MANIFEST_FILE, read_manifest
from .models import ModelSpec, count_parameters, model_spec
from .ranks import LaunchContext
from .recipe import (GPT3_BETAS, GPT3_DECAY_TOKENS, GPT3_EPS, GPT3_GRAD_CLIP, GPT3_MIN_LR_RATIO,
                     GPT3_RAMP_START_TOKENS, GPT3_WARMUP_TOKENS, GPT3_WEIGHT_DECAY, BatchPlan, BatchRamp, batch_plan)
from .settings import (FROM_MANIFEST_OVERRIDES, JOB_FIELDS, SettingsError, TrainSettings, flag, non_negative_int,
                       positive_int)

__all__ = [
    "ResolvedRun",
    "resolve_settings",
    "check_resume",
    "CPU_MODEL_DEFAULTS",
    "GPT3_TRAIN_TOKENS",
    "GPT3_RAMP_TOKENS",
]

GPT3_TRAIN_TOKENS = 300_000_000_000
"""Tokens every GPT-3 model was trained on (Brown et al. 2020, section 2.2): the default run length of a GPT-3
size when ``--max-steps`` is not given."""
GPT3_RAMP_TOKENS = 4_000_000_000
"""Batch-size ramp length, tokens (GPT-3: 4-12B depending on size; the lower end is used)."""
WARMUP_FRACTION = 0.05
"""Share of a short run's tokens used for LR warmup when GPT-3's 375M tokens would not fit."""
CPU_MODEL_DEFAULTS: dict[str, Any] = {"vocab_size": 2048, "max_steps": {"nano": 1000, "tiny": 150, "mini": 50}}
"""Defaults for the CPU sizes: a small BPE vocabulary, and runs of one to a few minutes on two cores."""
DEFAULT_CPU_MODEL = "nano"
DEFAULT_GPU_MODEL = "gpt3-small"
FSDP_MICRO_BATCH = 8


@dataclass
class ResolvedRun:
    """What :func:`resolve_settings` returns: the settings, the configs, the derived numbers and the notes."""

    settings: TrainSettings
    ds_config_source: Optional[dict]
    """The DeepSpeed config file as read (deepspeed only)."""
    ds_config: Optional[dict]
    """The config passed to DeepSpeed (batch numbers, precision and CPU adaptations applied)."""
    adamhd_kwargs: dict
    """AdamHD's keyword arguments (from the config, or the GPT-3 recipe for FSDP2)."""
    plan: BatchPlan
    """The batch plan at full batch."""
    ramp: BatchRamp
    """The batch-size ramp."""
    derived: dict
    """Numbers derived from the settings, with where each default came from (printed and kept in the manifest)."""
    notes: list[str] = field(default_factory=list)
    """Adaptations made for this machine, printed at the start."""


@dataclass
class _Resolution:
    """What the concerns share while a new job is resolved: the options, the context and what is printed."""

    given: dict[str, Any]
    ctx: LaunchContext
    notes: list[str] = field(default_factory=list)
    derived: dict[str, Any] = field(default_factory=dict)


def resolve_settings(
    given: dict[str, Any],
    ctx: LaunchContext,
    *,
    base: Optional[dict[str, Any]] = None,
    base_ds_source: Optional[dict] = None,
) -> ResolvedRun:
    """Complete and validate a job's settings.

    Args:
        given: option values from the command line, by :class:`TrainSettings` field name (None = not given);
            ``deepspeed_config`` holds the ``--deepspeed`` path and ``fsdp`` is True for ``--fsdp``.
        ctx: the launch context (world size, GPU or not).
        base: the ``settings`` of a manifest (``--from-manifest``): the job is rebuilt from them and only
            :data:`FROM_MANIFEST_OVERRIDES` may be given.
        base_ds_source: the manifest's ``deepspeed_config_source``.
    Raises:
        SettingsError (a ValueError) naming the option, or FileNotFoundError for a missing file.
    """
    given = {k: v for k, v in given.items() if v is not None}
    if base is not None:
        return _from_manifest(given, ctx, base, base_ds_source)
    r = _Resolution(given, ctx)
    engine, ds_source = resolve_engine(r)
    model, spec = resolve_model(r)
    data = resolve_data(r, cpu_size=spec.nominal_params is None)
    parallel = resolve_parallel(r, spec, engine["launch"], ds_source)
    batch = resolve_batch(r, spec, ds_source, dp=r.ctx.world_size // (parallel["tp"] * parallel["pp"]))
    optimizer = resolve_optimizer(r, spec, ds_source)
    precision = resolve_precision(r, engine["launch"], ds_source)
    schedule = resolve_schedule(r, model["model"], batch, cpu_size=spec.nominal_params is None)
    output = resolve_output(r, model["model"], engine["deepspeed_config"], schedule["max_steps"])
    s = TrainSettings(**engine, **model, **data, **parallel, **batch, **optimizer, **precision, **schedule,
                      **output)
    if s.launch == "fsdp":
        r.derived["adamhd_kwargs"] = dict(lr=s.lr, betas=list(GPT3_BETAS), eps=GPT3_EPS, weight_decay=s.weight_decay)
    return finish_run(s, ctx, ds_source, r.notes, r.derived, from_manifest=False)


def _from_manifest(given: dict[str, Any], ctx: LaunchContext, base: dict[str, Any],
                   base_ds_source: Optional[dict]) -> ResolvedRun:
    """The job of a manifest's ``settings``, with the launch options :data:`FROM_MANIFEST_OVERRIDES` replaced."""
    extra = sorted(k for k in given if k not in FROM_MANIFEST_OVERRIDES and k != "fsdp")
    if given.get("fsdp") and base.get("launch") != "fsdp":
        extra.append("fsdp")
    if extra:
        raise SettingsError(f"--from-manifest re-runs the manifest's job; these options would change it: "
                            f"{', '.join('--' + flag(k) for k in extra)}. Allowed with --from-manifest: "
                            f"{', '.join('--' + flag(k) for k in FROM_MANIFEST_OVERRIDES)}")
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(base) - names)
    if unknown:
        raise SettingsError(f"manifest settings have unknown field(s) {unknown}: written by another version")
    merged = dict(base)
    merged.update(exit_after_steps=None, resume="auto")  # choices of one launch, not of the job
    merged.update({k: v for k, v in given.items() if k in names})
    try:
        s = TrainSettings(**merged)
    except TypeError as e:
        raise SettingsError(f"manifest settings are incomplete: {e}") from None
    if s.launch == "deepspeed" and ctx.launcher not in ("deepspeed", "mpirun", "single process"):
        raise SettingsError(f"the manifest's job runs DeepSpeed; start it with the deepspeed launcher or "
                            f"mpirun, not {ctx.launcher}")
    if s.launch == "fsdp" and ctx.launcher == "mpirun":
        raise SettingsError("the manifest's job runs FSDP2: start it with torchrun, not mpirun")
    return finish_run(s, ctx, base_ds_source, [], {}, from_manifest=True)


# ----------------------------------------------------------------------------------------------------------------
# one function per concern; each returns its TrainSettings fields
def resolve_engine(r: _Resolution) -> tuple[dict[str, Any], Optional[dict]]:
    """``launch`` and ``deepspeed_config``, and the DeepSpeed config file as read (None for FSDP2)."""
    ds_path, fsdp = r.given.get("deepspeed_config"), bool(r.given.get("fsdp"))
    if ds_path and fsdp:
        raise SettingsError("--deepspeed and --fsdp are two engines: give one (deepspeed launcher or mpirun with "
                            "--deepspeed CONFIG; torchrun with --fsdp)")
    if not ds_path and not fsdp:
        raise SettingsError("choose the engine: --deepspeed CONFIG (under the deepspeed launcher or mpirun), or "
                            "--fsdp (under torchrun)")
    if fsdp and r.ctx.launcher == "mpirun":
        raise SettingsError("--fsdp under mpirun: start FSDP2 runs with torchrun (mpirun is for --deepspeed)")
    if fsdp:
        return {"launch": "fsdp", "deepspeed_config": None}, None
    try:
        ds_source = ads.load_config(ds_path)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SettingsError(f"--deepspeed: {e}") from None
    return {"launch": "deepspeed", "deepspeed_config": ds_path}, ds_source


def _spec(name: str) -> ModelSpec:
    try:
        return model_spec(name)
    except ValueError as e:
        raise SettingsError(f"--model: {e}") from None


def resolve_model(r: _Resolution) -> tuple[dict[str, Any], ModelSpec]:
    """``model`` (default: gpt3-small on a GPU machine, nano on a CPU-only one), ``activation_checkpointing``,
    ``seed``; and the model's table entry."""
    model = r.given.get("model") or (DEFAULT_GPU_MODEL if r.ctx.on_gpu else DEFAULT_CPU_MODEL)
    spec = _spec(model)
    if "model" not in r.given:
        r.notes.append(f"model {model} (the default on a {'GPU' if r.ctx.on_gpu else 'CPU-only'} machine; --model)")
    return {"model": model, "activation_checkpointing": bool(r.given.get("activation_checkpointing", False)),
            "seed": r.given.get("seed", 0)}, spec


def _has_text(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether a file holds any non-whitespace byte (read until the first one)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def check_data_source(data: str) -> None:
    """A ``--data`` value that names a local path must exist (hub names and 'embedded' are checked when loaded)."""
    if data == EMBEDDED or data.startswith("hf:"):
        return
    path = Path(data).expanduser()
    if path.is_file() and not _has_text(path):
        raise SettingsError(f"--data {data!r} is empty or holds only whitespace ({path.stat().st_size:,} bytes): "
                            f"give a .txt or .jsonl file with text, a folder of them, 'embedded', or a hub dataset "
                            f"name")
    if path.exists():
        return
    if looks_like_path(data):
        raise SettingsError(f"--data {data!r}: no such file or folder ({str(path.absolute())!r}); give a .txt or "
                            f".jsonl file, a folder of them, 'embedded', or a hub dataset name")


def resolve_data(r: _Resolution, *, cpu_size: bool) -> dict[str, Any]:
    """``data``, ``tokenizer``, ``vocab_size`` (local BPE only), ``max_chars``, ``val_fraction``, ``data_cache``."""
    data = str(r.given.get("data", EMBEDDED))
    check_data_source(data)
    tokenizer = r.given.get("tokenizer", LOCAL_BPE)
    if tokenizer == LOCAL_BPE:
        vocab_size = r.given.get("vocab_size", CPU_MODEL_DEFAULTS["vocab_size"] if cpu_size else 8192)
        positive_int("vocab_size", vocab_size)
        if vocab_size < 258:
            raise SettingsError(f"--vocab-size must be >= 258 (256 bytes + end-of-text + 1 merge), got {vocab_size}")
    else:
        if "vocab_size" in r.given:
            raise SettingsError(f"--vocab-size applies to --tokenizer {LOCAL_BPE} only; {tokenizer!r} has its own")
        vocab_size = None
    max_chars = r.given.get("max_chars")
    if max_chars is not None:
        positive_int("max_chars", max_chars)
    return {"data": data, "tokenizer": tokenizer, "vocab_size": vocab_size, "max_chars": max_chars,
            "val_fraction": float(r.given.get("val_fraction", 0.01)), "data_cache": r.given.get("data_cache")}


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def resolve_batch(r: _Resolution, spec: ModelSpec, ds_source: Optional[dict], *, dp: int) -> dict[str, Any]:
    """``seq_len``, ``global_batch_tokens`` (default: the model's, GPT-3 table) and ``micro_batch`` (default: the
    config's, or 8, lowered to divide the sequences per data-parallel rank); ``dp`` is the data-parallel size,
    the world size over ``tp · pp``."""
    ctx = r.ctx
    seq_len = positive_int("seq_len", r.given.get("seq_len", spec.context))
    global_tokens = positive_int("global_batch_tokens", r.given.get("global_batch_tokens", spec.batch_tokens))
    if global_tokens % seq_len:
        raise SettingsError(f"--global-batch-tokens ({global_tokens:,}) must be a multiple of --seq-len ({seq_len}); "
                            f"nearest: {max(1, global_tokens // seq_len) * seq_len:,}")
    sequences = global_tokens // seq_len
    ranks = "the world size" if dp == ctx.world_size else f"the data-parallel size (world {ctx.world_size} / tp · pp)"
    if sequences % dp:
        raise SettingsError(f"{ranks} ({dp} ranks) must divide the global batch of {sequences} "
                            f"sequences (--global-batch-tokens {global_tokens:,} / --seq-len {seq_len}); use "
                            f"a multiple of {dp * seq_len:,} tokens")
    per_rank = sequences // dp
    if "micro_batch" in r.given:
        micro = positive_int("micro_batch", r.given["micro_batch"])
    else:
        wanted = ds_source.get("train_micro_batch_size_per_gpu", FSDP_MICRO_BATCH) if ds_source is not None \
            else FSDP_MICRO_BATCH
        wanted = wanted if isinstance(wanted, int) and wanted > 0 else FSDP_MICRO_BATCH
        micro = _largest_divisor_at_most(per_rank, wanted)
        if micro != wanted:
            origin = "the config's" if ds_source is not None else "the default"
            r.notes.append(f"micro-batch {micro} ({origin} {wanted} does not divide the {per_rank} sequences "
                           f"per rank; --micro-batch)")
    try:
        batch_plan(global_tokens, seq_len=seq_len, micro_batch=micro, world_size=dp)
    except ValueError as e:
        raise SettingsError(f"--micro-batch: {e}") from None
    return {"seq_len": seq_len, "global_batch_tokens": global_tokens, "micro_batch": micro}


def _zero_stage(ds_source: Optional[dict]) -> int:
    z = (ds_source or {}).get("zero_optimization", {})
    stage = z.get("stage", 0) if isinstance(z, dict) else 0
    return stage if isinstance(stage, int) else 0


def resolve_parallel(r: _Resolution, spec: ModelSpec, launch: str, ds_source: Optional[dict]) -> dict[str, int]:
    """``tp`` and ``pp`` (default 1 each), checked before any rank starts: tp must divide the heads (each rank
    holds whole heads) and the MLP width 4·d_model, and the sequence (``--seq-len``: the norms and the residual
    stream run sequence-parallel on seq_len / tp tokens); pp at most the blocks, tp · pp the world size (the rest
    is data parallel), and pipelines refuse ZeRO-2/3 (DeepSpeed's pipeline engine partitions optimizer state
    only). ``--fsdp --tp N`` runs (FSDP2 over tensor parallelism on a dp × tp mesh); pipelines, and tensor
    parallelism under DeepSpeed, are not yet run by the launcher: after those checks they are refused, naming the
    grid and why."""
    tp = positive_int("tp", r.given.get("tp", 1))
    pp = positive_int("pp", r.given.get("pp", 1))
    world = r.ctx.world_size
    check_tensor_parallel(tp, spec, r.given.get("seq_len", spec.context))
    if pp > 1 and pp > spec.n_layer:
        raise SettingsError(f"--pp {pp}: {spec.name} has {spec.n_layer} blocks, fewer than the pipeline stages")
    if world % (tp * pp):
        raise SettingsError(f"the world size ({world} ranks) must be a multiple of --tp {tp} × --pp {pp} = "
                            f"{tp * pp}: the ranks form a dp × tp × pp grid")
    stage = _zero_stage(ds_source)
    if pp > 1 and launch == "deepspeed" and stage >= 2:
        raise SettingsError(f"--pp {pp} with ZeRO stage {stage} (--deepspeed {r.given.get('deepspeed_config')}): "
                            f"DeepSpeed's pipeline engine allows ZeRO stage 0 or 1 only")
    if pp > 1:
        raise SettingsError(f"--pp {pp}: pipeline stages are not yet supported by the launcher (planned: DeepSpeed "
                            f"PipelineModule, ZeRO-0/1; the grid would be dp {world // (tp * pp)} × tp {tp} × pp "
                            f"{pp}); use --pp 1" + ("" if launch == "deepspeed" or tp == 1 else
                                                    f" (--fsdp --tp {tp} alone runs)"))
    if tp > 1 and launch == "deepspeed":
        raise SettingsError(f"--tp {tp} with --deepspeed: not yet supported by the launcher. DeepSpeed AutoTP "
                            f"refuses the GPT-2 blocks it trains (\"AutoTP not supported for model. Please use "
                            f"kernel injection since container policy for model exists.\": GPT-2 has an inference "
                            f"kernel policy, and its fused qkv Conv1D needs a head-aware split); use --tp 1, or "
                            f"--fsdp --tp {tp} under torchrun (FSDP2 over tensor parallelism)")
    return {"tp": tp, "pp": pp}


def check_tensor_parallel(tp: int, spec: ModelSpec, seq_len: int) -> None:
    """The tensor-parallel degree ``tp`` against the model: it divides the heads (each rank holds whole heads of
    q, k and v), the MLP width 4·d_model (a colwise slice of ``c_fc``) and the sequence (sequence parallelism)."""
    if tp == 1:
        return
    if spec.n_head % tp:
        raise SettingsError(f"--tp {tp} must divide the {spec.n_head} attention heads of {spec.name} (each rank "
                            f"holds whole heads); allowed: {_divisors_of(spec.n_head)}")
    d_ff = 4 * spec.d_model
    if d_ff % tp:
        raise SettingsError(f"--tp {tp} must divide the MLP width 4 × d_model = {d_ff} of {spec.name} (each rank "
                            f"holds a slice of it); allowed: {[d for d in _divisors_of(spec.n_head) if d_ff % d == 0]}")
    if isinstance(seq_len, int) and seq_len % tp:
        raise SettingsError(f"--seq-len {seq_len} must be a multiple of --tp {tp}: the norms and the residual "
                            f"stream run sequence-parallel, seq_len / tp tokens per rank; nearest: "
                            f"{max(tp, seq_len // tp * tp)}")


def _divisors_of(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_optimizer(r: _Resolution, spec: ModelSpec, ds_source: Optional[dict]) -> dict[str, Any]:
    """``lr`` (default: the model's), ``weight_decay`` and ``grad_clip`` (default: the config's, else GPT-3's)."""
    opt_params = (ds_source or {}).get("optimizer", {}).get("params", {})
    opt_params = opt_params if isinstance(opt_params, dict) else {}
    weight_decay = r.given["weight_decay"] if "weight_decay" in r.given \
        else opt_params.get("weight_decay", GPT3_WEIGHT_DECAY)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise SettingsError(f'"optimizer.params.weight_decay" of the DeepSpeed config must be a number, '
                            f"got {weight_decay!r}")
    grad_clip = r.given.get("grad_clip", (ds_source or {}).get("gradient_clipping", GPT3_GRAD_CLIP))
    return {"lr": float(r.given.get("lr", spec.lr)), "weight_decay": float(weight_decay),
            "grad_clip": float(grad_clip)}


def resolve_precision(r: _Resolution, launch: str, ds_source: Optional[dict]) -> dict[str, Any]:
    """``dtype``: ``auto`` takes the config's (FSDP2: bf16 on a GPU), fp32 instead of bf16 on a CPU-only machine;
    fp16 without a GPU is refused (fp16 with FSDP2 anywhere: :class:`TrainSettings`)."""
    ctx = r.ctx
    asked = config_dtype(ds_source) if launch == "deepspeed" else ("bf16" if ctx.on_gpu else "fp32")
    dtype = r.given.get("dtype", "auto")
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise SettingsError(f"--dtype must be one of auto, fp32, bf16, fp16, got {dtype!r}")
    if dtype == "auto":
        dtype = asked
        if not ctx.on_gpu and asked == "bf16":
            dtype = "fp32"
            r.notes.append("CPU: the config asks for bf16; training in fp32 instead (bf16 matmuls are slow on most "
                           "CPUs; --dtype bf16 keeps bf16)")
    elif dtype != asked:
        r.notes.append(f"precision {dtype} (--dtype; the {'config' if launch == 'deepspeed' else 'default'} is "
                       f"{asked})")
    if dtype == "fp16" and not ctx.on_gpu:
        where = "the DeepSpeed config enables fp16" if r.given.get("dtype", "auto") == "auto" else "--dtype fp16"
        why = ("DeepSpeed's CPU accelerator does not support fp16" if launch == "deepspeed" else
               "fp16 mixed precision needs loss scaling, which runs on GPUs")
        raise SettingsError(f"{where}, but this machine has no GPU: fp16 training needs a GPU ({why}); use "
                            f"--dtype fp32 or --dtype bf16")
    return {"dtype": dtype}


def _fmt_tokens(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


def _ramp(given: dict[str, Any], global_tokens: int, target_tokens: int) -> tuple[int, int, str]:
    """The batch-size ramp's start and length in tokens, and where the length came from: GPT-3's 4B of 260B, scaled
    to a shorter run; none when the batch is not above the start."""
    ramp_start = positive_int("ramp_start_tokens", given.get("ramp_start_tokens",
                                                             min(GPT3_RAMP_START_TOKENS, global_tokens)))
    if "ramp_tokens" in given:
        ramp_tokens, ramp_src = non_negative_int("ramp_tokens", given["ramp_tokens"]), "--ramp-tokens"
    elif global_tokens <= ramp_start:
        ramp_tokens, ramp_src = 0, f"none: the global batch is not above the ramp's start of {ramp_start:,} tokens"
    elif target_tokens >= GPT3_DECAY_TOKENS:
        ramp_tokens, ramp_src = GPT3_RAMP_TOKENS, "GPT-3's 4B (4-12B by size)"
    else:
        ramp_tokens = int(round(target_tokens * GPT3_RAMP_TOKENS / GPT3_DECAY_TOKENS))
        ramp_src = f"GPT-3's 4B of 260B, scaled to this run's {_fmt_tokens(target_tokens)} tokens"
    if ramp_start > global_tokens:
        raise SettingsError(f"--ramp-start-tokens ({ramp_start:,}) must not exceed the global batch "
                            f"({global_tokens:,} tokens)")
    return ramp_start, ramp_tokens, ramp_src


def _lr_schedule(given: dict[str, Any], run_tokens: int, seq_len: int) -> tuple[int, int, str, str]:
    """LR warmup and cosine-decay end in tokens (GPT-3's 375M and 260B, or 5% and the end of a shorter run), and
    where each came from."""
    if "decay_tokens" in given:
        decay_tokens, decay_src = non_negative_int("decay_tokens", given["decay_tokens"]), "--decay-tokens"
    elif run_tokens >= GPT3_DECAY_TOKENS:
        decay_tokens, decay_src = GPT3_DECAY_TOKENS, "GPT-3's 260B"
    else:
        decay_tokens, decay_src = run_tokens, "the run's length (GPT-3: 260B)"
    if "warmup_tokens" in given:
        warmup_tokens, warmup_src = non_negative_int("warmup_tokens", given["warmup_tokens"]), "--warmup-tokens"
    elif run_tokens * WARMUP_FRACTION >= GPT3_WARMUP_TOKENS:
        warmup_tokens, warmup_src = GPT3_WARMUP_TOKENS, "GPT-3's 375M"
    else:
        warmup_tokens = min(decay_tokens, max(seq_len, int(round(run_tokens * WARMUP_FRACTION))))
        warmup_src = f"{WARMUP_FRACTION:.0%} of the run (GPT-3: 375M)"
    return warmup_tokens, decay_tokens, warmup_src, decay_src


def resolve_schedule(r: _Resolution, model: str, batch: dict[str, Any], *, cpu_size: bool) -> dict[str, Any]:
    """``max_steps``, the batch-size ramp (``ramp_tokens``, ``ramp_start_tokens``) and the LR schedule
    (``warmup_tokens``, ``decay_tokens``, ``min_lr_ratio``): GPT-3's in tokens, scaled to a shorter run. Where each
    default came from goes into ``derived["schedule_sources"]``."""
    given = r.given
    seq_len, global_tokens = batch["seq_len"], batch["global_batch_tokens"]
    max_steps = positive_int("max_steps", given["max_steps"]) if "max_steps" in given else None
    if max_steps is not None:
        target_tokens = max_steps * global_tokens
    else:
        target_tokens = CPU_MODEL_DEFAULTS["max_steps"][model] * global_tokens if cpu_size else GPT3_TRAIN_TOKENS
    ramp_start, ramp_tokens, ramp_src = _ramp(given, global_tokens, target_tokens)
    try:
        # Defaults derived from the run's length use the ramp in steps of one sequence, so that they do not depend
        # on the world size or micro-batch (a run resumed at another world size is the same job). The real ramp
        # moves in whole micro-steps (its first step can be larger than the nominal start), so it consumes
        # slightly more tokens per step during the ramp.
        nominal = BatchRamp(batch_plan(global_tokens, seq_len=seq_len, micro_batch=1, world_size=1),
                            start_tokens=ramp_start, ramp_tokens=ramp_tokens)
    except ValueError as e:
        raise SettingsError(f"batch-size ramp: {e}") from None
    if max_steps is None and cpu_size:
        max_steps = CPU_MODEL_DEFAULTS["max_steps"][model]
        r.notes.append(f"{max_steps} steps (the default for the CPU size {model}; --max-steps)")
    elif max_steps is None:
        max_steps = nominal.step_at_tokens(GPT3_TRAIN_TOKENS)
        r.notes.append(f"{max_steps:,} steps = GPT-3's 300B training tokens at this batch (--max-steps)")
    run_tokens = nominal.tokens_at_step(max_steps)
    warmup_tokens, decay_tokens, warmup_src, decay_src = _lr_schedule(given, run_tokens, seq_len)
    r.derived["nominal_run_tokens"] = run_tokens
    r.derived["schedule_sources"] = {"warmup_tokens": warmup_src, "decay_tokens": decay_src, "ramp_tokens": ramp_src}
    return {"max_steps": max_steps, "ramp_tokens": ramp_tokens, "ramp_start_tokens": ramp_start,
            "warmup_tokens": warmup_tokens, "decay_tokens": decay_tokens,
            "min_lr_ratio": float(given.get("min_lr_ratio", GPT3_MIN_LR_RATIO))}


def resolve_output(r: _Resolution, model: str, ds_path: Optional[str], max_steps: int) -> dict[str, Any]:
    """``out_dir`` (default ``runs/<model>-<config name or fsdp>``), ``resume``, the evaluation, checkpoint and log
    intervals (a tenth of the run, at most 1000 steps; log every step up to 1000 steps), and the launch options."""
    given = r.given
    eval_interval = given.get("eval_interval", min(1000, max(1, max_steps // 10)))
    stem = Path(ds_path).stem if ds_path else "fsdp"
    return {"out_dir": str(given.get("out_dir", Path("runs") / f"{model}-{stem}")),
            "resume": str(given.get("resume", "auto")),
            "eval_interval": eval_interval, "eval_batches": given.get("eval_batches", 10),
            "save_interval": given.get("save_interval", eval_interval),
            "log_interval": given.get("log_interval", 1 if max_steps <= 1000 else 10),
            "keep_checkpoints": given.get("keep_checkpoints", 2), "exit_after_steps": given.get("exit_after_steps"),
            "peak_tflops": given.get("peak_tflops"), "tensorboard": bool(given.get("tensorboard", True))}


# ----------------------------------------------------------------------------------------------------------------
# shared by a new job and a job rebuilt from a manifest
def finish_run(s: TrainSettings, ctx: LaunchContext, ds_source: Optional[dict], notes: list[str], derived: dict,
               *, from_manifest: bool) -> ResolvedRun:
    """The checks and derived values shared by a new job and a job rebuilt from a manifest."""
    spec = _spec(s.model)
    dp = ctx.world_size // (s.tp * s.pp)
    if ctx.world_size % (s.tp * s.pp):
        raise SettingsError(f"the world size ({ctx.world_size} ranks) must be a multiple of --tp {s.tp} × --pp "
                            f"{s.pp} = {s.tp * s.pp}" + (" (the manifest's job was planned for another world size)"
                                                          if from_manifest else ""))
    check_tensor_parallel(s.tp, spec, s.seq_len)
    if s.dtype == "fp16" and not ctx.on_gpu:
        raise SettingsError("the job trains in fp16, but this machine has no GPU: fp16 training needs a GPU")
    try:
        plan = batch_plan(s.global_batch_tokens, seq_len=s.seq_len, micro_batch=s.micro_batch, world_size=dp)
        ramp = BatchRamp(plan, start_tokens=s.ramp_start_tokens, ramp_tokens=s.ramp_tokens)
    except ValueError as e:
        hint = " (the manifest's job was planned for another world size)" if from_manifest else ""
        raise SettingsError(f"batch: {e}{hint}") from None
    if s.exit_after_steps is not None and s.exit_after_steps > s.max_steps:
        notes.append(f"--exit-after-steps {s.exit_after_steps} is beyond --max-steps {s.max_steps}")
    check_writable_folder("out-dir", s.out_dir)
    if s.data_cache is not None:
        check_writable_folder("data-cache", s.data_cache)
    check_data_source(s.data)

    if s.launch == "deepspeed":
        ds_config, kw = deepspeed_run_config(s, ctx, ds_source, spec, plan, notes, derived)
    else:
        ds_config, kw = None, dict(lr=s.lr, betas=GPT3_BETAS, eps=GPT3_EPS, weight_decay=s.weight_decay)
        derived["optimizer_type"] = "AdamHD"
    derived.update({
        "world_size": ctx.world_size,
        "dp": dp, "tp": s.tp, "pp": s.pp,
        "tokens_per_step": plan.tokens_per_step,
        "grad_accum_steps": plan.grad_accum_steps,
        "tokens_per_micro_step": plan.tokens_per_micro_step,
        "run_tokens": ramp.tokens_at_step(s.max_steps),
        "ramp_effective_start_tokens": ramp.effective_start_tokens,
        "ramp_steps": ramp.step_at_tokens(s.ramp_tokens) if s.ramp_tokens else 0,
    })
    return ResolvedRun(s, ds_source, ds_config, {k: (tuple(v) if k == "betas" else v) for k, v in kw.items()},
                       plan, ramp, derived, notes)


def deepspeed_run_config(s: TrainSettings, ctx: LaunchContext, ds_source: Optional[dict], spec: ModelSpec,
                         plan: BatchPlan, notes: list[str], derived: dict) -> tuple[dict, dict]:
    """The config passed to DeepSpeed (:func:`adamhd_train.engine.deepspeed_config_for`) and the optimizer's
    keyword arguments; an AdamHD section is checked by building an AdamHD from it."""
    if ds_source is None:
        raise SettingsError("the job runs DeepSpeed but has no DeepSpeed config")
    approx_params = count_parameters(spec, max(s.vocab_size or 0, 50257), context=s.seq_len)
    try:
        ds_config, ds_notes = deepspeed_config_for(
            ds_source, micro_batch=s.micro_batch, grad_accum_steps=plan.grad_accum_steps,
            world_size=plan.world_size, dtype=s.dtype, grad_clip=s.grad_clip, lr=s.lr,
            weight_decay=s.weight_decay, on_gpu=ctx.on_gpu, num_params=approx_params, tp=s.tp)
    except ValueError as e:
        raise SettingsError(f"--deepspeed {s.deepspeed_config}: {e}") from None
    notes.extend(ds_notes)
    if ads.is_adamhd_config(ds_config):
        try:
            kw = ads.adamhd_kwargs(ds_config)
            ads.check_config(ds_config)
            AdamHD([torch.zeros(1, requires_grad=True)], **kw)
        except (ValueError, TypeError) as e:
            raise SettingsError(f"--deepspeed {s.deepspeed_config}: {e}") from None
    else:
        kw = dict(ds_config["optimizer"].get("params", {}))
    z = ds_config.get("zero_optimization", {})
    derived["zero_stage"] = z.get("stage", 0) if isinstance(z, dict) else 0
    derived["optimizer_type"] = ds_config["optimizer"]["type"]
    return ds_config, kw


def check_writable_folder(option: str, folder: str) -> None:
    """Refuse, before any data or process group is set up, a folder the run could not write: one that is a file,
    that lies under a file, or whose nearest existing folder refuses a new entry (a read-only filesystem, no
    permission). Probed by creating and removing an empty folder there, which is what the run will do."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise SettingsError(f"--{option} {folder!r} exists and is not a folder")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise SettingsError(f"--{option} {folder!r} lies under {str(base)!r}, which is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".adamhd-write-probe-", dir=base)
        os.rmdir(probe)
    except OSError as e:
        reason = {errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left"}.get(e.errno, e.strerror)
        raise SettingsError(f"--{option} {folder!r} cannot be written: creating an entry in {str(base)!r} failed "
                            f"({reason}); choose a writable folder") from None


def check_resume(run: ResolvedRun) -> Optional[tuple[int, Path]]:
    """The checkpoint this launch continues from (``(step, folder)``), or None for a fresh start.

    ``--resume auto``: the newest complete checkpoint in ``out_dir/checkpoints`` if there is one. ``never``: a
    fresh start, refused when ``out_dir`` already holds checkpoints. A folder: that checkpoint. The run's
    manifest (beside the checkpoints) must describe the same job: a differing setting in :data:`JOB_FIELDS`
    is an error naming it.
    """
    s = run.settings
    root = Path(s.out_dir) / CHECKPOINT_DIR
    if s.resume == "never":
        found = latest_checkpoint(root)
        if found is not None:
            raise SettingsError(f"--resume never: {s.out_dir!r} already holds a run (checkpoint {found[1].name}); "
                                f"continue it with --resume auto or choose another --out-dir")
        return None
    if s.resume == "auto":
        found = latest_checkpoint(root)
        if found is None:
            return None
        step, folder = found
    else:
        folder = Path(s.resume)
        try:
            state = read_trainer_state(folder)
        except FileNotFoundError as e:
            raise SettingsError(f"--resume: {e} (use 'auto', 'never' or a checkpoint folder such as "
                                f"{s.out_dir}/checkpoints/step100)") from None
        step = int(state["step"])
    manifest_path = folder.parent.parent / MANIFEST_FILE
    if manifest_path.is_file():
        old = read_manifest(manifest_path)["settings"]
        diff = [f"--{flag(k)} {old.get(k)!r} -> {getattr(s, k)!r}" for k in JOB_FIELDS if old.get(k) != getattr(s, k)]
        if diff:
            raise SettingsError(f"cannot resume {str(folder)!r}: it belongs to another job ({'; '.join(diff)}). "
                                f"Use another --out-dir for a new job, or give the same options to continue it")
    state = read_trainer_state(folder)
    if state.get("launch") not in (None, s.launch):
        raise SettingsError(f"cannot resume {str(folder)!r}: it is a {state['launch']} checkpoint and this run "
                            f"uses {s.launch}")
    old_tp = int(state.get("tp", 1))
    if (old_tp > 1) != (s.tp > 1):
        raise SettingsError(f"cannot resume {str(folder)!r}: written at --tp {old_tp}, this run uses --tp {s.tp}; a "
                            f"tensor-parallel model has separate q, k and v layers (the fused c_attn is split), so a "
                            f"checkpoint moves between --tp 1 and --tp above 1 in neither direction. Use --tp "
                            f"{old_tp if old_tp > 1 else 1}" + (" (or another above 1)" if old_tp > 1 else ""))
    stage = run.derived.get("zero_stage")
    if s.launch == "deepspeed" and state.get("zero_stage") not in (None, stage):
        raise SettingsError(f"cannot resume {str(folder)!r}: written with ZeRO stage {state['zero_stage']}, this "
                            f"config uses stage {stage}")
    return step, folder
