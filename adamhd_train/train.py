"""GPT-3-style pre-training with AdamHD under DeepSpeed ZeRO or FSDP2: settings, validation, and the training loop.

``launch/pretrain_gpt3.py`` is the command line; this module does the work in three stages:

1. :func:`launch_context` reads how the ranks were started (deepspeed launcher, torchrun, mpirun, or a single
   process) from the environment, before any process group exists.
2. :func:`resolve_settings` turns the options a user gave (None = not given) into a complete, validated
   :class:`TrainSettings` plus the DeepSpeed config to run: defaults from the model table and the hardware, the
   batch plan (global batch in tokens -> micro-batch x ranks x accumulation), the schedule scaled to the run, the
   CPU adaptations. Every bad input fails here, on every rank, before any data, model or process group is made.
3. :func:`train` prepares the data, starts the process group, builds the model and the engine
   (:func:`adamhd_train.engine.build_engine`), resumes from the newest complete checkpoint if asked, and runs the
   loop: the batch-size ramp, gradient accumulation, clipping, the LR schedule, periodic validation, checkpoints,
   ``metrics.jsonl``/TensorBoard/tqdm, per-layer δ, the manifest, and the loss-curve PNG at the end.

Reproducibility: a run's losses depend only on its settings, the data, the world size and the software; on CPU the
same settings and world size give a bitwise-identical loss curve, and a resumed run continues the uninterrupted one
bitwise (the data position, the RNG states, the optimizer state including μ, and the LR schedule are restored).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .ports import free_port

__all__ = [
    "TrainSettings",
    "LaunchContext",
    "ResolvedRun",
    "SettingsError",
    "JOB_FIELDS",
    "RUN_FIELDS",
    "CPU_MODEL_DEFAULTS",
    "GPT3_TRAIN_TOKENS",
    "GPT3_RAMP_TOKENS",
    "launch_context",
    "parse_count",
    "resolve_settings",
    "check_resume",
    "train",
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


class SettingsError(ValueError):
    """A bad option or combination of options, found before any work starts; the message names the option."""


def parse_count(text: str) -> int:
    """A whole count from the command line, with an optional k/M/B/G/T suffix or in exponent form: 4096, 375M, 4B,
    32k, 2.6e11, 1_000. Raises ``argparse.ArgumentTypeError`` (argparse then names the flag)."""
    import argparse

    t = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = int(t) * scale  # exact for large integers
    except ValueError:
        try:
            f = float(t) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 4096, 375M, 4B)") from None
        if not math.isfinite(f) or f != int(f):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        value = int(f)
    return value


@dataclass
class TrainSettings:
    """The complete settings of one pre-training job, after defaults were resolved (what a manifest stores).

    Fields in :data:`JOB_FIELDS` define the job: a resumed run must have the same values. The rest
    (:data:`RUN_FIELDS`) may change between launches of the same job.
    """

    launch: str
    """Engine: ``"deepspeed"`` (ZeRO, from ``deepspeed_config``) or ``"fsdp"`` (FSDP2)."""
    deepspeed_config: Optional[str]
    """Path of the DeepSpeed config as given (deepspeed only)."""
    model: str
    """Model size from :data:`adamhd_train.models.MODEL_NAMES`."""
    seq_len: int
    """Tokens per training sequence (the model's context)."""
    global_batch_tokens: int
    """Tokens per optimizer step at full batch (all ranks and accumulation steps)."""
    micro_batch: int
    """Sequences per rank per forward/backward pass."""
    max_steps: int
    """Optimizer steps of the whole run."""
    lr: float
    """Peak learning rate."""
    weight_decay: float
    """λ of the Huber decay for matrices and embeddings (biases and norms are not decayed)."""
    grad_clip: float
    """Global gradient-norm clip (0 disables)."""
    warmup_tokens: int
    """Linear LR warmup length, tokens."""
    decay_tokens: int
    """Tokens at which the cosine decay reaches ``min_lr_ratio`` of the peak (counted from the start)."""
    min_lr_ratio: float
    """LR floor as a fraction of the peak."""
    ramp_tokens: int
    """Batch-size ramp length, tokens (0: full batch from the first step)."""
    ramp_start_tokens: int
    """Global batch at the first step of the ramp, tokens."""
    dtype: str
    """Training precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
    activation_checkpointing: bool
    """Recompute each block in the backward pass."""
    seed: int
    """Seed of the model initialisation and of the data order."""
    data: str
    """``"embedded"``, a ``.txt``/``.jsonl`` file or folder, or a hub dataset name."""
    tokenizer: str
    """``"local-bpe"`` or a hub tokenizer name."""
    vocab_size: Optional[int]
    """Vocabulary of the local BPE (None for a hub tokenizer)."""
    max_chars: Optional[int]
    """Cap on the corpus in characters (None: all of it)."""
    val_fraction: float
    """Share of the corpus held out for validation."""
    data_cache: Optional[str]
    """Token cache folder (None: ``$ADAMHD_DATA_CACHE`` or ``~/.cache/adamhd_dist``)."""
    out_dir: str
    """Run directory: checkpoints, metrics, TensorBoard, the manifest and the plot."""
    resume: str
    """``"auto"`` (the newest complete checkpoint in ``out_dir`` if any), ``"never"``, or a checkpoint folder."""
    eval_interval: int
    """Optimizer steps between validation passes (and one at the end)."""
    eval_batches: int
    """Validation micro-batches per rank per pass."""
    save_interval: int
    """Optimizer steps between checkpoints (and one at the end)."""
    log_interval: int
    """Optimizer steps between ``metrics.jsonl`` records."""
    keep_checkpoints: int
    """Complete checkpoints kept on disk (0: all)."""
    exit_after_steps: Optional[int]
    """Save a checkpoint and exit after this many steps of this launch (None: run to ``max_steps``)."""
    peak_tflops: Optional[float]
    """Peak TFLOP/s per rank for MFU (None: from the hardware)."""
    tensorboard: bool
    """Write TensorBoard scalars."""

    def __post_init__(self):
        if self.launch not in ("deepspeed", "fsdp"):
            raise SettingsError(f"launch must be 'deepspeed' or 'fsdp', got {self.launch!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise SettingsError(f"--dtype must be one of fp32, bf16, fp16, got {self.dtype!r}")
        for name in ("seq_len", "global_batch_tokens", "micro_batch", "max_steps", "eval_interval",
                     "eval_batches", "save_interval", "log_interval", "ramp_start_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("seed", "warmup_tokens", "decay_tokens", "ramp_tokens", "keep_checkpoints"):
            _non_negative_int(name, getattr(self, name))
        if self.exit_after_steps is not None:
            _positive_int("exit_after_steps", self.exit_after_steps)
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise SettingsError(f"--{_flag(name)} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise SettingsError(f"--lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SettingsError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.decay_tokens < self.warmup_tokens:
            raise SettingsError(f"--decay-tokens ({self.decay_tokens:,}) must be >= --warmup-tokens "
                                f"({self.warmup_tokens:,}): the decay end is counted from the start of training")
        if not 0.0 < self.val_fraction <= 0.5:
            raise SettingsError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction!r}")
        if self.peak_tflops is not None and not (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)):
            raise SettingsError(f"--peak-tflops must be a positive number, got {self.peak_tflops!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


JOB_FIELDS = ("launch", "model", "seq_len", "global_batch_tokens", "lr", "weight_decay", "grad_clip",
              "warmup_tokens", "decay_tokens", "min_lr_ratio", "ramp_tokens", "ramp_start_tokens", "dtype", "seed",
              "data", "tokenizer", "vocab_size", "max_chars", "val_fraction")
"""Settings that define the job: a run resumes only with the same values."""
RUN_FIELDS = ("max_steps", "micro_batch", "deepspeed_config", "activation_checkpointing", "data_cache", "out_dir",
              "resume", "eval_interval", "eval_batches", "save_interval", "log_interval", "keep_checkpoints",
              "exit_after_steps", "peak_tflops", "tensorboard")
"""Settings that may differ between launches of one job (micro-batch: with the world size)."""
FROM_MANIFEST_OVERRIDES = ("out_dir", "resume", "data_cache", "max_steps", "exit_after_steps", "eval_interval",
                           "save_interval", "log_interval", "keep_checkpoints", "peak_tflops", "tensorboard")
"""Options that may be given together with ``--from-manifest`` (the others would make it another job)."""


_FLAG_NAMES = {"deepspeed_config": "deepspeed", "tensorboard": "no-tensorboard"}


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, name.replace("_", "-"))


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SettingsError(f"--{_flag(name)} must be a positive integer, got {v!r}")
    return v


def _non_negative_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SettingsError(f"--{_flag(name)} must be an integer >= 0, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------------------------
# how the ranks were started
@dataclass
class LaunchContext:
    """Rank layout read from the environment before the process group exists."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    """``"deepspeed"``/``"torchrun"`` (RANK etc. set), ``"mpirun"`` (OpenMPI/PMI variables), ``"single process"``."""
    on_gpu: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> Optional[int]:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return None


def launch_context(on_gpu: Optional[bool] = None) -> LaunchContext:
    """Where this process sits: from RANK/WORLD_SIZE (deepspeed launcher, torchrun), OMPI_COMM_WORLD_* / PMI_*
    (mpirun), or nothing (a single process)."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "deepspeed"
        local = _env_int("LOCAL_RANK") or 0
        local_world = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world
    elif _env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE") is not None:
        launcher = "mpirun"
        rank = _env_int("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0
        world = _env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
        local = _env_int("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
        local_world = _env_int("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS") or world
    else:
        launcher, rank, world, local, local_world = "single process", 0, 1, 0, 1
    return LaunchContext(rank, world, local, local_world, launcher, bool(on_gpu))


# ----------------------------------------------------------------------------------------------------------------
# settings
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
    plan: Any
    """The :class:`~adamhd_train.recipe.BatchPlan` at full batch."""
    ramp: Any
    """The :class:`~adamhd_train.recipe.BatchRamp`."""
    derived: dict
    """Numbers derived from the settings, with where each default came from (printed and kept in the manifest)."""
    notes: list[str] = field(default_factory=list)
    """Adaptations made for this machine, printed at the start."""


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _looks_like_local_path(text: str) -> bool:
    from .data import _looks_like_path

    return _looks_like_path(text)


def _check_data_source(data: str) -> None:
    from .data import EMBEDDED

    if data == EMBEDDED or data.startswith("hf:"):
        return
    path = Path(data).expanduser()
    if path.exists():
        return
    if _looks_like_local_path(data):
        raise SettingsError(f"--data {data!r}: no such file or folder ({str(path.absolute())!r}); give a .txt or "
                            f".jsonl file, a folder of them, 'embedded', or a hub dataset name")


def _fmt_tokens(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{int(n)}"


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
    from adamhd_dist import deepspeed as ads
    from .data import EMBEDDED, LOCAL_BPE
    from .models import model_spec
    from .recipe import (GPT3_DECAY_TOKENS, GPT3_MIN_LR_RATIO, GPT3_RAMP_START_TOKENS, GPT3_WARMUP_TOKENS,
                         GPT3_WEIGHT_DECAY, GPT3_BETAS, GPT3_EPS, GPT3_GRAD_CLIP, BatchRamp, batch_plan)

    given = {k: v for k, v in given.items() if v is not None}
    notes: list[str] = []
    derived: dict[str, Any] = {}

    if base is not None:
        extra = sorted(k for k in given if k not in FROM_MANIFEST_OVERRIDES and k != "fsdp")
        if given.get("fsdp") and base.get("launch") != "fsdp":
            extra.append("fsdp")
        if extra:
            raise SettingsError(f"--from-manifest re-runs the manifest's job; these options would change it: "
                                f"{', '.join('--' + _flag(k) for k in extra)}. Allowed with --from-manifest: "
                                f"{', '.join('--' + _flag(k) for k in FROM_MANIFEST_OVERRIDES)}")
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
        return _finish(s, ctx, base_ds_source, notes, derived, from_manifest=True)

    # engine
    ds_path, fsdp = given.get("deepspeed_config"), bool(given.get("fsdp"))
    if ds_path and fsdp:
        raise SettingsError("--deepspeed and --fsdp are two engines: give one (deepspeed launcher or mpirun with "
                            "--deepspeed CONFIG; torchrun with --fsdp)")
    if not ds_path and not fsdp:
        raise SettingsError("choose the engine: --deepspeed CONFIG (under the deepspeed launcher or mpirun), or "
                            "--fsdp (under torchrun)")
    if fsdp and ctx.launcher == "mpirun":
        raise SettingsError("--fsdp under mpirun: start FSDP2 runs with torchrun (mpirun is for --deepspeed)")
    launch = "fsdp" if fsdp else "deepspeed"
    ds_source = None
    if launch == "deepspeed":
        try:
            ds_source = ads.load_config(ds_path)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise SettingsError(f"--deepspeed: {e}") from None

    # model and data
    model = given.get("model") or (DEFAULT_GPU_MODEL if ctx.on_gpu else DEFAULT_CPU_MODEL)
    try:
        spec = model_spec(model)
    except ValueError as e:
        raise SettingsError(f"--model: {e}") from None
    cpu_size = spec.nominal_params is None
    if "model" not in given:
        notes.append(f"model {model} (the default on a {'GPU' if ctx.on_gpu else 'CPU-only'} machine; --model)")
    data = str(given.get("data", EMBEDDED))
    _check_data_source(data)
    tokenizer = given.get("tokenizer", LOCAL_BPE)
    if tokenizer == LOCAL_BPE:
        vocab_size = given.get("vocab_size", CPU_MODEL_DEFAULTS["vocab_size"] if cpu_size else 8192)
        _positive_int("vocab_size", vocab_size)
        if vocab_size < 258:
            raise SettingsError(f"--vocab-size must be >= 258 (256 bytes + end-of-text + 1 merge), got {vocab_size}")
    else:
        if "vocab_size" in given:
            raise SettingsError(f"--vocab-size applies to --tokenizer {LOCAL_BPE} only; {tokenizer!r} has its own")
        vocab_size = None
    max_chars = given.get("max_chars")
    if max_chars is not None:
        _positive_int("max_chars", max_chars)

    # batch
    seq_len = _positive_int("seq_len", given.get("seq_len", spec.context))
    global_tokens = _positive_int("global_batch_tokens", given.get("global_batch_tokens", spec.batch_tokens))
    if global_tokens % seq_len:
        raise SettingsError(f"--global-batch-tokens ({global_tokens:,}) must be a multiple of --seq-len ({seq_len}); "
                            f"nearest: {max(1, global_tokens // seq_len) * seq_len:,}")
    sequences = global_tokens // seq_len
    if sequences % ctx.world_size:
        raise SettingsError(f"the world size ({ctx.world_size} ranks) must divide the global batch of {sequences} "
                            f"sequences (--global-batch-tokens {global_tokens:,} / --seq-len {seq_len}); use "
                            f"a multiple of {ctx.world_size * seq_len:,} tokens")
    per_rank = sequences // ctx.world_size
    if "micro_batch" in given:
        micro = _positive_int("micro_batch", given["micro_batch"])
    else:
        wanted = (ds_source or {}).get("train_micro_batch_size_per_gpu", FSDP_MICRO_BATCH) if ds_source is not None \
            else FSDP_MICRO_BATCH
        wanted = wanted if isinstance(wanted, int) and wanted > 0 else FSDP_MICRO_BATCH
        micro = _largest_divisor_at_most(per_rank, wanted)
        if micro != wanted:
            origin = "the config's" if ds_source is not None else "the default"
            notes.append(f"micro-batch {micro} ({origin} {wanted} does not divide the {per_rank} sequences "
                         f"per rank; --micro-batch)")
    try:
        plan = batch_plan(global_tokens, seq_len=seq_len, micro_batch=micro, world_size=ctx.world_size)
    except ValueError as e:
        raise SettingsError(f"--micro-batch: {e}") from None

    # optimizer
    opt_params = (ds_source or {}).get("optimizer", {}).get("params", {}) if ds_source else {}
    opt_params = opt_params if isinstance(opt_params, dict) else {}
    lr = float(given.get("lr", spec.lr))
    weight_decay = opt_params.get("weight_decay", GPT3_WEIGHT_DECAY) if "weight_decay" not in given \
        else given["weight_decay"]
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise SettingsError(f'"optimizer.params.weight_decay" of the DeepSpeed config must be a number, '
                            f"got {weight_decay!r}")
    weight_decay = float(weight_decay)
    grad_clip = float(given.get("grad_clip", (ds_source or {}).get("gradient_clipping", GPT3_GRAD_CLIP)))

    # precision
    if launch == "deepspeed":
        from .engine import config_dtype

        asked = config_dtype(ds_source)
    else:
        asked = "bf16" if ctx.on_gpu else "fp32"
    dtype = given.get("dtype", "auto")
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise SettingsError(f"--dtype must be one of auto, fp32, bf16, fp16, got {dtype!r}")
    if dtype == "auto":
        dtype = asked
        if not ctx.on_gpu and asked == "bf16":
            dtype = "fp32"
            notes.append("CPU: the config asks for bf16; training in fp32 instead (bf16 matmuls are slow on most "
                         "CPUs; --dtype bf16 keeps bf16)")
    elif dtype != asked:
        notes.append(f"precision {dtype} (--dtype; the {'config' if launch == 'deepspeed' else 'default'} is "
                     f"{asked})")
    if dtype == "fp16" and not ctx.on_gpu:
        where = "the DeepSpeed config enables fp16" if given.get("dtype", "auto") == "auto" else "--dtype fp16"
        why = ("DeepSpeed's CPU accelerator does not support fp16" if launch == "deepspeed" else
               "fp16 mixed precision needs loss scaling, which runs on GPUs")
        raise SettingsError(f"{where}, but this machine has no GPU: fp16 training needs a GPU ({why}); use "
                            f"--dtype fp32 or --dtype bf16")

    # run length and schedule
    if "max_steps" in given:
        max_steps = _positive_int("max_steps", given["max_steps"])
        target_tokens = max_steps * global_tokens
    else:
        max_steps = None
        target_tokens = (GPT3_TRAIN_TOKENS if not cpu_size
                         else CPU_MODEL_DEFAULTS["max_steps"][model] * global_tokens)
    ramp_start = min(GPT3_RAMP_START_TOKENS, global_tokens)
    ramp_start = _positive_int("ramp_start_tokens", given.get("ramp_start_tokens", ramp_start))
    if "ramp_tokens" in given:
        ramp_tokens = _non_negative_int("ramp_tokens", given["ramp_tokens"])
        ramp_src = "--ramp-tokens"
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
    try:
        BatchRamp(plan, start_tokens=ramp_start, ramp_tokens=ramp_tokens)
        # Defaults derived from the run's length use the ramp in steps of one sequence, so that they do not depend
        # on the world size or micro-batch (a run resumed at another world size is the same job). The real ramp
        # moves in whole micro-steps (its first step can be larger than the nominal start), so it consumes
        # slightly more tokens per step during the ramp.
        nominal = BatchRamp(batch_plan(global_tokens, seq_len=seq_len, micro_batch=1, world_size=1),
                            start_tokens=ramp_start, ramp_tokens=ramp_tokens)
    except ValueError as e:
        raise SettingsError(f"batch-size ramp: {e}") from None
    if max_steps is None:
        if cpu_size:
            max_steps = CPU_MODEL_DEFAULTS["max_steps"][model]
            notes.append(f"{max_steps} steps (the default for the CPU size {model}; --max-steps)")
        else:
            max_steps = nominal.step_at_tokens(GPT3_TRAIN_TOKENS)
            notes.append(f"{max_steps:,} steps = GPT-3's 300B training tokens at this batch (--max-steps)")
    run_tokens = nominal.tokens_at_step(max_steps)
    derived["nominal_run_tokens"] = run_tokens
    if "decay_tokens" in given:
        decay_tokens, decay_src = _non_negative_int("decay_tokens", given["decay_tokens"]), "--decay-tokens"
    elif run_tokens >= GPT3_DECAY_TOKENS:
        decay_tokens, decay_src = GPT3_DECAY_TOKENS, "GPT-3's 260B"
    else:
        decay_tokens, decay_src = run_tokens, "the run's length (GPT-3: 260B)"
    if "warmup_tokens" in given:
        warmup_tokens, warmup_src = _non_negative_int("warmup_tokens", given["warmup_tokens"]), "--warmup-tokens"
    elif run_tokens * WARMUP_FRACTION >= GPT3_WARMUP_TOKENS:
        warmup_tokens, warmup_src = GPT3_WARMUP_TOKENS, "GPT-3's 375M"
    else:
        warmup_tokens = min(decay_tokens, max(seq_len, int(round(run_tokens * WARMUP_FRACTION))))
        warmup_src = f"{WARMUP_FRACTION:.0%} of the run (GPT-3: 375M)"
    derived["schedule_sources"] = {"warmup_tokens": warmup_src, "decay_tokens": decay_src, "ramp_tokens": ramp_src}

    # intervals and output
    eval_interval = given.get("eval_interval", min(1000, max(1, max_steps // 10)))
    save_interval = given.get("save_interval", eval_interval)
    log_interval = given.get("log_interval", 1 if max_steps <= 1000 else 10)
    stem = Path(ds_path).stem if ds_path else "fsdp"
    out_dir = str(given.get("out_dir", Path("runs") / f"{model}-{stem}"))
    resume = str(given.get("resume", "auto"))

    s = TrainSettings(
        launch=launch, deepspeed_config=ds_path, model=model, seq_len=seq_len, global_batch_tokens=global_tokens,
        micro_batch=micro, max_steps=max_steps, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip,
        warmup_tokens=warmup_tokens, decay_tokens=decay_tokens,
        min_lr_ratio=float(given.get("min_lr_ratio", GPT3_MIN_LR_RATIO)), ramp_tokens=ramp_tokens,
        ramp_start_tokens=ramp_start, dtype=dtype,
        activation_checkpointing=bool(given.get("activation_checkpointing", False)), seed=given.get("seed", 0),
        data=data, tokenizer=tokenizer, vocab_size=vocab_size, max_chars=max_chars,
        val_fraction=float(given.get("val_fraction", 0.01)), data_cache=given.get("data_cache"), out_dir=out_dir,
        resume=resume, eval_interval=eval_interval, eval_batches=given.get("eval_batches", 10),
        save_interval=save_interval, log_interval=log_interval, keep_checkpoints=given.get("keep_checkpoints", 2),
        exit_after_steps=given.get("exit_after_steps"), peak_tflops=given.get("peak_tflops"),
        tensorboard=bool(given.get("tensorboard", True)),
    )
    if launch == "fsdp":
        derived["adamhd_kwargs"] = dict(lr=lr, betas=list(GPT3_BETAS), eps=GPT3_EPS, weight_decay=weight_decay)
    return _finish(s, ctx, ds_source, notes, derived, from_manifest=False)


def _finish(s: TrainSettings, ctx: LaunchContext, ds_source: Optional[dict], notes: list[str], derived: dict,
            *, from_manifest: bool) -> ResolvedRun:
    """The checks and derived values shared by a new job and a job rebuilt from a manifest."""
    from adamhd_dist import deepspeed as ads
    from .engine import deepspeed_config_for
    from .models import count_parameters, model_spec
    from adamhd_dist import AdamHD
    from .recipe import GPT3_BETAS, GPT3_EPS, BatchRamp, batch_plan

    import torch

    try:
        spec = model_spec(s.model)
    except ValueError as e:
        raise SettingsError(f"--model: {e}") from None
    if s.dtype == "fp16" and not ctx.on_gpu:
        raise SettingsError("the job trains in fp16, but this machine has no GPU: fp16 training needs a GPU")
    try:
        plan = batch_plan(s.global_batch_tokens, seq_len=s.seq_len, micro_batch=s.micro_batch,
                          world_size=ctx.world_size)
        ramp = BatchRamp(plan, start_tokens=s.ramp_start_tokens, ramp_tokens=s.ramp_tokens)
    except ValueError as e:
        hint = " (the manifest's job was planned for another world size)" if from_manifest else ""
        raise SettingsError(f"batch: {e}{hint}") from None
    if s.exit_after_steps is not None and s.exit_after_steps > s.max_steps:
        notes.append(f"--exit-after-steps {s.exit_after_steps} is beyond --max-steps {s.max_steps}")
    out = Path(s.out_dir)
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out-dir {s.out_dir!r} exists and is not a folder")
    if s.data_cache is not None and Path(s.data_cache).exists() and not Path(s.data_cache).is_dir():
        raise SettingsError(f"--data-cache {s.data_cache!r} exists and is not a folder")
    _check_data_source(s.data)

    ds_config = None
    if s.launch == "deepspeed":
        if ds_source is None:
            raise SettingsError("the job runs DeepSpeed but has no DeepSpeed config")
        approx_params = count_parameters(spec, max(s.vocab_size or 0, 50257), context=s.seq_len)
        try:
            ds_config, ds_notes = deepspeed_config_for(
                ds_source, micro_batch=s.micro_batch, grad_accum_steps=plan.grad_accum_steps,
                world_size=ctx.world_size, dtype=s.dtype, grad_clip=s.grad_clip, lr=s.lr,
                weight_decay=s.weight_decay, on_gpu=ctx.on_gpu, num_params=approx_params)
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
    else:
        kw = dict(lr=s.lr, betas=GPT3_BETAS, eps=GPT3_EPS, weight_decay=s.weight_decay)
        derived["optimizer_type"] = "AdamHD"
    run_tokens = ramp.tokens_at_step(s.max_steps)
    derived.update({
        "world_size": ctx.world_size,
        "tokens_per_step": plan.tokens_per_step,
        "grad_accum_steps": plan.grad_accum_steps,
        "tokens_per_micro_step": plan.tokens_per_micro_step,
        "run_tokens": run_tokens,
        "ramp_effective_start_tokens": ramp.effective_start_tokens,
        "ramp_steps": ramp.step_at_tokens(s.ramp_tokens) if s.ramp_tokens else 0,
    })
    return ResolvedRun(s, ds_source, ds_config, {k: (tuple(v) if k == "betas" else v) for k, v in kw.items()},
                       plan, ramp, derived, notes)


def check_resume(run: ResolvedRun) -> Optional[tuple[int, Path]]:
    """The checkpoint this launch continues from (``(step, folder)``), or None for a fresh start.

    ``--resume auto``: the newest complete checkpoint in ``out_dir/checkpoints`` if there is one. ``never``: a
    fresh start, refused when ``out_dir`` already holds checkpoints. A folder: that checkpoint. The run's
    manifest (beside the checkpoints) must describe the same job: a differing setting in :data:`JOB_FIELDS`
    is an error naming it.
    """
    from .checkpoints import CHECKPOINT_DIR, latest_checkpoint, read_trainer_state
    from .manifest import MANIFEST_FILE, read_manifest

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
        diff = [f"--{_flag(k)} {old.get(k)!r} -> {getattr(s, k)!r}" for k in JOB_FIELDS if old.get(k) != getattr(s, k)]
        if diff:
            raise SettingsError(f"cannot resume {str(folder)!r}: it belongs to another job ({'; '.join(diff)}). "
                                f"Use another --out-dir for a new job, or give the same options to continue it")
    state = read_trainer_state(folder)
    if state.get("launch") not in (None, s.launch):
        raise SettingsError(f"cannot resume {str(folder)!r}: it is a {state['launch']} checkpoint and this run "
                            f"uses {s.launch}")
    stage = run.derived.get("zero_stage")
    if s.launch == "deepspeed" and state.get("zero_stage") not in (None, stage):
        raise SettingsError(f"cannot resume {str(folder)!r}: written with ZeRO stage {state['zero_stage']}, this "
                            f"config uses stage {stage}")
    return step, folder


# ----------------------------------------------------------------------------------------------------------------
# the run
class _Stop:
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, exit. A signal arriving more than
    ``grace_s`` seconds after the first exits at once; one within it is the same interruption relayed (Ctrl-C
    reaches every process of the terminal's group, and the deepspeed launcher then sends SIGTERM to its ranks)."""

    def __init__(self, grace_s: float = 5.0):
        self.signum = 0
        self.grace_s = grace_s
        self._first = 0.0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum:
            if time.monotonic() - self._first > self.grace_s:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.signum, self._first = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _say(ctx: LaunchContext, msg: str = "") -> None:
    if ctx.is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _rng_state() -> dict:
    import numpy as np
    import torch

    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _eval_micro_batch(s: TrainSettings, ctx: LaunchContext, data) -> int:
    """Validation sequences per rank per batch: the training micro-batch, or fewer when the validation split
    does not hold one batch on every rank (a small corpus); a split with less than one window per rank is an
    error."""
    windows = max(0, (data.val_tokens - 1) // s.seq_len)
    if windows >= s.micro_batch * ctx.world_size:
        return s.micro_batch
    if windows < ctx.world_size:
        raise SettingsError(f"the validation split has {data.val_tokens:,} tokens = {windows} window(s) of "
                            f"--seq-len+1 = {s.seq_len + 1} tokens, fewer than one per rank ({ctx.world_size}); "
                            f"raise --val-fraction (now {s.val_fraction}) or use more data (--max-chars, --data)")
    return windows // ctx.world_size


def _init_process_group(s: TrainSettings, ctx: LaunchContext, master_port: Optional[int]) -> None:
    import torch
    import torch.distributed as dist

    if ctx.launcher == "single process":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR=os.environ.get("MASTER_ADDR",
                          "127.0.0.1"), MASTER_PORT=str(master_port or free_port()))
    backend = "nccl" if ctx.on_gpu else "gloo"
    if ctx.on_gpu:
        torch.cuda.set_device(ctx.local_rank)
    if s.launch == "deepspeed":
        import deepspeed

        port = master_port or int(os.environ.get("MASTER_PORT", 29500))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=ctx.launcher == "mpirun",
                                   distributed_port=port, verbose=False)
    else:
        kwargs = {"device_id": torch.device("cuda", ctx.local_rank)} if ctx.on_gpu else {}
        dist.init_process_group(backend, **kwargs)
    if dist.get_world_size() != ctx.world_size:
        raise RuntimeError(f"the process group has {dist.get_world_size()} ranks, the launcher announced "
                           f"{ctx.world_size}")


def _quiet_libraries() -> None:
    import logging
    import warnings

    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor.*")


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else ("es" if noun.endswith("ch") else "s"))


def _describe_start(run: ResolvedRun, ctx: LaunchContext, data, model, groups, resume_from, peak_note: str) -> str:
    from .models import GPT3_VOCAB_SIZE, count_parameters, model_spec

    s, plan, d = run.settings, run.plan, run.derived
    spec = model_spec(s.model)
    n_params = sum(p.numel() for p in model.parameters())
    dec = sum(p.numel() for p in groups[0]["params"]) if groups and groups[0]["weight_decay"] > 0 else 0
    dec_t = len(groups[0]["params"]) if dec else 0
    nodec = n_params - dec
    lines = []
    engine = (f"DeepSpeed ZeRO-{d.get('zero_stage', 0)} ({s.deepspeed_config}), optimizer {d['optimizer_type']}"
              if s.launch == "deepspeed" else "FSDP2 (fully_shard per block), optimizer AdamHD")
    lines.append(f"engine: {engine}; {ctx.world_size} rank(s) on {'GPU' if ctx.on_gpu else 'CPU'} "
                 f"({'nccl' if ctx.on_gpu else 'gloo'}), started by {ctx.launcher}")
    lines.append(f"model: {s.model} (GPT-2 blocks: {spec.n_layer} layers, d_model {spec.d_model}, {spec.n_head} heads, "
                 f"context {s.seq_len}); {n_params:,} parameters with vocabulary {data.vocab_size:,} "
                 f"(tied embeddings counted once)")
    lines.append(f"  decayed (matrices, embeddings): {dec:,} in {dec_t} tensors; undecayed (biases, norms): "
                 f"{nodec:,} in {sum(len(g['params']) for g in groups) - dec_t} tensors")
    if spec.nominal_params is not None:
        table = count_parameters(spec, GPT3_VOCAB_SIZE, context=spec.context)
        lines.append(f"  at GPT-3's vocabulary {GPT3_VOCAB_SIZE:,} and context {spec.context:,}: {table:,} parameters "
                     f"(table: {spec.nominal_params / 1e6:,.0f}M, {100 * (table / spec.nominal_params - 1):+.1f}%)")
    lines.append(data.describe())
    lines.append(f"batch: {plan.describe()}")
    lines.append(f"  tokens per step {plan.tokens_per_step:,}; micro-batch {plan.micro_batch}; gradient accumulation "
                 f"{plan.grad_accum_steps}; world size {ctx.world_size}")
    src = d["schedule_sources"] if "schedule_sources" in d else {}
    if s.ramp_tokens:
        lines.append(f"  batch ramp: {run.ramp.effective_start_tokens:,} -> {plan.tokens_per_step:,} tokens over the "
                     f"first {s.ramp_tokens:,} tokens ({d['ramp_steps']:,} steps){' [' + src['ramp_tokens'] + ']' if src else ''}")
    else:
        lines.append(f"  batch ramp: none{' [' + src['ramp_tokens'] + ']' if src else ''}")
    lines.append(f"precision: {s.dtype}; activation checkpointing {'on' if s.activation_checkpointing else 'off'}; "
                 f"gradient clipping at global norm {s.grad_clip:g}")
    import inspect

    from adamhd_dist import AdamHD

    defaults = {k: v.default for k, v in inspect.signature(AdamHD.__init__).parameters.items()}
    kw = {**defaults, **run.adamhd_kwargs}  # what the optimizer will use, its own defaults included
    lines.append(f"optimizer: peak LR {s.lr:g}, betas {tuple(kw['betas'])}, eps {kw['eps']:g}, "
                 f"weight decay {s.weight_decay:g}"
                 + (f", delta_mode {kw['delta_mode']}, delta_scale {kw['delta_scale']:g}, "
                    f"decay {kw['decay']}" if d["optimizer_type"].lower() == "adamhd" else ""))
    lines.append(f"schedule: LR warmup {s.warmup_tokens:,} tokens{' [' + src['warmup_tokens'] + ']' if src else ''}, "
                 f"cosine to {s.min_lr_ratio:.0%} of peak at {s.decay_tokens:,} tokens"
                 f"{' [' + src['decay_tokens'] + ']' if src else ''}")
    epochs = d["run_tokens"] / max(1, data.train_tokens)
    lines.append(f"run: {_n(s.max_steps, 'step')} = {d['run_tokens']:,} tokens ({epochs:.2f} epochs of the train "
                 f"split); validation every {_n(s.eval_interval, 'step')} ({_n(s.eval_batches, 'batch')} per rank), "
                 f"checkpoint every {_n(s.save_interval, 'step')} (keeping {s.keep_checkpoints or 'all'})")
    if epochs > 4:
        lines.append(f"  note: the run sees its corpus {epochs:.0f} times; for a real pre-training run give a larger "
                     f"corpus with --data (a .jsonl/.txt path or a hub dataset such as openwebtext)")
    lines.append(f"MFU: {peak_note}")
    lines.append(f"run directory: {s.out_dir}" + (f" (resuming from {resume_from[1]}, step {resume_from[0]})"
                                                  if resume_from else ""))
    return "\n".join(lines)


_UNSET = object()


def train(run: ResolvedRun, ctx: LaunchContext, *, resume_from=_UNSET, master_port: Optional[int] = None,
          argv: Optional[list[str]] = None, rerun_command: Optional[str] = None,
          expect_data_hash: Optional[str] = None) -> int:
    """Run (or continue) the job; returns the process exit status (0 when the run reached ``max_steps`` or
    stopped at ``exit_after_steps``, 128 + signal number after a SIGINT/SIGTERM checkpoint).

    Args:
        run, ctx: from :func:`resolve_settings` and :func:`launch_context`.
        resume_from: the result of :func:`check_resume` when the caller already called it (default: call it).
        master_port: rank 0's port when this process finds its ranks itself (mpirun, a single process).
        argv, rerun_command: recorded in the manifest.
        expect_data_hash: the data hash the job must train on (``--from-manifest``); another is an error.
    """
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from . import checkpoints as ck
    from .data import TokenSampler, ValBatches, prepare_data
    from .engine import build_engine
    from adamhd_dist import param_groups
    from .manifest import MANIFEST_FILE, build_manifest, read_manifest, record_resume, write_manifest
    from .metrics import MetricsLog, delta_summary, peak_flops, plot_loss_curve, read_metrics
    from .models import build_model, flops_per_token
    from .recipe import lr_scheduler

    s, plan, ramp = run.settings, run.plan, run.ramp
    out = Path(s.out_dir)
    root = out / ck.CHECKPOINT_DIR
    if resume_from is _UNSET:
        resume_from = check_resume(run)
    if resume_from is not None and resume_from[0] >= s.max_steps:
        if ctx.is_main:
            plot_loss_curve(out, title=_plot_title(s, ctx))
            print(f"the run in {s.out_dir} is complete: checkpoint {resume_from[1].name} is at step "
                  f"{resume_from[0]} and --max-steps is {s.max_steps}. Nothing to do; another --out-dir starts a "
                  f"new run.", flush=True)
        return 0

    if not ctx.on_gpu and "OMP_NUM_THREADS" not in os.environ:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // max(1, ctx.local_world_size)))
    _quiet_libraries()

    # data (every rank; the cache's file lock makes one of them build it)
    try:
        data = prepare_data(s.data, tokenizer=s.tokenizer, vocab_size=s.vocab_size, cache_dir=s.data_cache,
                            val_fraction=s.val_fraction, max_chars=s.max_chars, progress=ctx.is_main)
    except (ValueError, OSError) as e:  # a bad file, an empty folder, a hub name or tokenizer out of reach
        raise SettingsError(f"--data {s.data!r} / --tokenizer {s.tokenizer!r}: {e}") from None
    if expect_data_hash is not None and expect_data_hash != data.data_hash:
        raise SettingsError(f"the data differs from the manifest's (data hash {expect_data_hash[:12]} -> "
                            f"{data.data_hash[:12]}): the corpus, the tokenizer or the Python version (which "
                            f"supplies the embedded corpus) changed, so the job cannot be repeated exactly")
    if resume_from is not None:
        mpath = resume_from[1].parent.parent / MANIFEST_FILE
        if mpath.is_file():
            old_hash = read_manifest(mpath).get("data", {}).get("data_hash")
            if old_hash not in (None, data.data_hash):
                raise SettingsError(f"cannot resume {str(resume_from[1])!r}: the data differs from the run's "
                                    f"(data hash {old_hash[:12]} -> {data.data_hash[:12]})")

    eval_micro = _eval_micro_batch(s, ctx, data)
    try:
        TokenSampler(data, seq_len=s.seq_len, micro_batch=s.micro_batch, rank=ctx.rank, world_size=ctx.world_size,
                     seed=s.seed)
    except ValueError as e:
        raise SettingsError(f"{e}: use more data (--max-chars, --data) or a shorter --seq-len") from None
    if eval_micro != s.micro_batch and ctx.is_main:
        print(f"note: validation micro-batch {eval_micro} (the validation split of {data.val_tokens:,} tokens holds "
              f"fewer than micro-batch x world size = {s.micro_batch * ctx.world_size} windows; --val-fraction)")

    _init_process_group(s, ctx, master_port)
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.on_gpu else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model(s.model, vocab_size=data.vocab_size, context=s.seq_len, seed=s.seed,
                        activation_checkpointing=s.activation_checkpointing)
    groups = param_groups(model, s.weight_decay)

    def make_scheduler(optimizer):
        return lr_scheduler(optimizer, warmup=s.warmup_tokens, decay_end=s.decay_tokens, min_ratio=s.min_lr_ratio,
                            tokens_at_step=ramp.tokens_at_step)

    engine = build_engine(s.launch, model, device=device, make_scheduler=make_scheduler, ds_config=run.ds_config,
                          optimizer_kwargs=run.adamhd_kwargs, weight_decay=s.weight_decay, grad_clip=s.grad_clip,
                          dtype=s.dtype)

    sampler = TokenSampler(data, seq_len=s.seq_len, micro_batch=s.micro_batch, rank=rank, world_size=world,
                           seed=s.seed)
    val = ValBatches(data, seq_len=s.seq_len, micro_batch=eval_micro, rank=rank, world_size=world,
                     max_batches=s.eval_batches)

    start_step, tokens = 0, 0
    elapsed_before = 0.0  # training seconds of the earlier launches of this run (metrics' elapsed_s goes on)
    if resume_from is not None:
        folder = resume_from[1]
        engine.load(folder.parent, folder.name)
        state = ck.read_trainer_state(folder)
        sampler.load_state_dict(state["sampler"])
        start_step, tokens = int(state["step"]), int(state["tokens"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        rng_file = folder / f"rng_rank{rank}.pt"
        if state.get("world_size") == world and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))

    threads = torch.get_num_threads()
    if s.peak_tflops is not None:
        peak, peak_note = s.peak_tflops * 1e12, f"peak {s.peak_tflops:g} TFLOP/s per rank (--peak-tflops)"
    else:
        name = torch.cuda.get_device_name(device) if ctx.on_gpu else None
        peak, peak_note = peak_flops(device.type, s.dtype, threads=threads, device_name=name)
    fpt = flops_per_token(s.model, data.vocab_size, context=s.seq_len)

    log = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ck.remove_partials(root)
        if resume_from is None:
            MetricsLog.truncate(out, 0)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        else:
            MetricsLog.truncate(out, start_step)
        if resume_from is not None and (out / MANIFEST_FILE).is_file():
            record_resume(out, step=start_step, world_size=world, launcher=ctx.launcher, argv=argv)
        else:  # a new run, or one started from another run's checkpoint (--resume FOLDER)
            manifest = build_manifest(
                settings=s.to_dict(), world_size=world, launcher=ctx.launcher, deepspeed_config=run.ds_config,
                deepspeed_config_source=run.ds_config_source, data=data.manifest(),
                derived=dict(run.derived, parameters=sum(p.numel() for p in model.parameters()),
                             flops_per_token=fpt, torch_threads=threads),
                argv=argv, rerun_command=rerun_command)
            if resume_from is not None:
                manifest["started_from_checkpoint"] = {"folder": str(resume_from[1].resolve()),
                                                       "step": start_step}
            write_manifest(manifest, out)
        log = MetricsLog(out, tensorboard=s.tensorboard, purge_step=start_step + 1 if resume_from else None)
        for note in run.notes:
            print(f"note: {note}")
        print(_describe_start(run, ctx, data, model, groups, resume_from, peak_note), flush=True)
    dist.barrier()

    def evaluate() -> float:
        engine.train(False)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for window in val:
            total[0] += engine.eval_loss(window).double()
            total[1] += 1
        engine.train(True)
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def save(step: int) -> Path:
        tmp_tag = ck.partial_tag(step)
        folder = root / tmp_tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
        engine.save(root, tmp_tag)
        if ctx.is_main:
            ck.write_json_atomic({"step": step, "tokens": tokens, "sampler": sampler.state_dict(), "world_size": world,
                                  "launch": s.launch, "zero_stage": run.derived.get("zero_stage"),
                                  "micro_batch": s.micro_batch, "time": time.time(),
                                  "elapsed_s": elapsed_before + time.perf_counter() - t_start},
                                 folder / ck.TRAINER_STATE)
        dist.barrier()
        final = root / ck.tag_for(step)
        if ctx.is_main:
            ck.commit_checkpoint(root, step)
            ck.prune_checkpoints(root, s.keep_checkpoints)
        dist.barrier()
        return final

    stop_after = None if s.exit_after_steps is None else min(s.max_steps, start_step + s.exit_after_steps)
    bar = tqdm(total=s.max_steps, initial=start_step, desc=f"{s.model} {s.launch}", unit="step", dynamic_ncols=True,
               disable=not (ctx.is_main and sys.stderr.isatty()), file=sys.stderr)
    first_loss = None
    t_last, tokens_last = time.perf_counter(), tokens
    t_start, t_print, tokens_print = t_last, t_last, tokens
    exit_code, step = 0, start_step
    engine.train(True)
    with _Stop() as stopper:
        while step < s.max_steps:
            accum = ramp.accum_steps_at(tokens)
            engine.set_accum_steps(accum)
            lr_used = engine.lr()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for k in range(accum):
                loss_sum += engine.micro_step(next(sampler), last=k == accum - 1).double()
            grad_norm = engine.optimizer_step()
            step += 1
            tokens += accum * plan.tokens_per_micro_step
            flag = torch.full((), float(stopper.signum), dtype=torch.float64, device=device)
            reduced = torch.stack([loss_sum / accum, flag])
            dist.all_reduce(reduced)
            reduced = reduced.cpu()
            loss = float(reduced[0]) / world
            signalled = int(reduced[1]) > 0
            if first_loss is None:
                first_loss = loss

            is_last = step == s.max_steps
            do_eval = step % s.eval_interval == 0 or is_last
            do_log = step % s.log_interval == 0 or do_eval or is_last
            record = None
            if do_log:
                now = time.perf_counter()
                tps = (tokens - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens
                deltas = engine.deltas()
                record = {"step": step, "tokens": tokens, "loss": loss, "lr": lr_used, "grad_norm": grad_norm,
                          "batch_tokens": accum * plan.tokens_per_micro_step, "accum_steps": accum,
                          "tokens_per_s": tps, "mfu": tps * fpt / (peak * world) if peak else None,
                          "elapsed_s": elapsed_before + now - t_start, **delta_summary(deltas)}
                if do_eval:
                    vl = evaluate()
                    record.update(val_loss=vl, val_ppl=math.exp(min(vl, 80.0)))
                if ctx.is_main:
                    log.log(record)
                    if do_eval:
                        log.log_deltas(step, tokens, deltas)
                        dm = record.get("delta_median")
                        avg_tps = (tokens - tokens_print) / max(now - t_print, 1e-9)
                        t_print, tokens_print = now, tokens
                        mfu = avg_tps * fpt / (peak * world) if peak else None
                        _say(ctx, f"step {step:>6}/{s.max_steps} | tokens {tokens:,} | loss {loss:.4f} | "
                                  f"val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}) | lr {lr_used:.3g} | "
                                  f"{avg_tps:,.0f} tok/s"
                                  + (f" | MFU {100 * mfu:.2f}%" if mfu is not None else "")
                                  + (f" | δ median {dm:.4g}" if dm is not None else ""))
            if ctx.is_main:
                bar.update(1)
                if record is not None:
                    post = {"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
                    if record["mfu"] is not None:
                        post["mfu"] = f"{100 * record['mfu']:.2f}%"
                    bar.set_postfix(post, refresh=False)

            stopping = signalled or (stop_after is not None and step >= stop_after and not is_last)
            if is_last or stopping or step % s.save_interval == 0:
                folder = save(step)
                if ctx.is_main and (stopping or is_last):
                    _say(ctx, f"checkpoint: {folder}")
            if stopping:
                if signalled:
                    signum = stopper.signum or signal.SIGTERM
                    exit_code = 128 + int(signum)
                    _say(ctx, f"interrupted after step {step}: checkpoint saved; continue with --resume auto "
                              f"(the same command)")
                else:
                    _say(ctx, f"stopped after {step - start_step} steps of this launch (--exit-after-steps); "
                              f"continue with --resume auto")
                break
    bar.close()

    if ctx.is_main:
        log.close()
        png = plot_loss_curve(out, title=_plot_title(s, ctx))
        records = read_metrics(out / "metrics.jsonl")
        losses = [r["loss"] for r in records if r.get("loss") is not None]
        vals = [r for r in records if r.get("val_loss") is not None]
        if losses:
            summary = f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} (steps {records[0]['step']}-{records[-1]['step']})"
            if vals:
                summary += (f"; validation loss {vals[0]['val_loss']:.3f} -> {vals[-1]['val_loss']:.3f} "
                            f"(perplexity {vals[-1]['val_ppl']:.1f})")
            print(summary)
        deltas = engine.deltas()
        if deltas:
            ds = delta_summary(deltas)
            print(f"per-layer Huber threshold δ over {len(deltas)} layers: min {ds['delta_min']:.4g}, median "
                  f"{ds['delta_median']:.4g}, max {ds['delta_max']:.4g} (all layers in {out / 'deltas.jsonl'})")
        print(f"run directory {out}: metrics.jsonl, deltas.jsonl, tensorboard/, manifest.json, checkpoints/"
              + (f", {png.name}" if png else ""), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


def _plot_title(s: TrainSettings, ctx: LaunchContext) -> str:
    engine = f"DeepSpeed {Path(s.deepspeed_config).stem}" if s.launch == "deepspeed" else "FSDP2"
    return f"{s.model}, {engine}, {ctx.world_size} rank(s), seed {s.seed}: {Path(s.out_dir).name}"
