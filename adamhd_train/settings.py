"""The settings of one pre-training job: a typed dataclass validated on construction, each field declaring its
command-line option (:mod:`adamhd_train.options`).

:class:`TrainSettings` is what a manifest stores (``manifest.json`` → ``"settings"``); every field is checked in
``__post_init__`` with an error that names the option (``--max-steps must be a positive integer, got 0``).
:func:`adamhd_train.resolve.resolve_settings` fills it from the options a user gave.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from . import options
from .models import MODEL_NAMES
from .options import option, parse_count

__all__ = [
    "TrainSettings",
    "SettingsError",
    "JOB_FIELDS",
    "RUN_FIELDS",
    "FROM_MANIFEST_OVERRIDES",
    "parse_count",
    "flag",
]


class SettingsError(ValueError):
    """A bad option or combination of options, found before any work starts; the message names the option."""


def flag(name: str) -> str:
    """The command-line option of a :class:`TrainSettings` field, without the dashes: ``max_steps`` ->
    ``max-steps``."""
    return options.flag(TrainSettings, name)


def positive_int(name: str, v) -> int:
    """``v`` when it is an integer > 0, else a :class:`SettingsError` naming ``--<name>``."""
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SettingsError(f"--{flag(name)} must be a positive integer, got {v!r}")
    return v


def non_negative_int(name: str, v) -> int:
    """``v`` when it is an integer >= 0, else a :class:`SettingsError` naming ``--<name>``."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SettingsError(f"--{flag(name)} must be an integer >= 0, got {v!r}")
    return v


@dataclass
class TrainSettings:
    """The complete settings of one pre-training job, after defaults were resolved (what a manifest stores).

    Fields in :data:`JOB_FIELDS` define the job: a resumed run must have the same values. The rest
    (:data:`RUN_FIELDS`) may change between launches of the same job.
    """

    launch: str
    """Engine: ``"deepspeed"`` (ZeRO, from ``deepspeed_config``) or ``"fsdp"`` (FSDP2); set by ``--deepspeed`` or
    ``--fsdp``."""
    deepspeed_config: Optional[str] = option(
        "DeepSpeed config JSON (e.g. ds_configs/zero2_adamhd.json); its batch numbers, precision, clipping and LR "
        "are set from the options below", flag="deepspeed", metavar="CONFIG")
    model: str = option("model size: " + ", ".join(MODEL_NAMES),
                        default_text="gpt3-small on a GPU machine, nano on a CPU-only one")
    seq_len: int = option("tokens per sequence", default_text="the model's context")
    global_batch_tokens: int = option("tokens per optimizer step at full batch, all ranks and accumulation steps",
                                      default_text="the model's, GPT-3 table")
    micro_batch: int = option("sequences per rank per forward pass",
                              default_text="the config's train_micro_batch_size_per_gpu, or 8, reduced to divide")
    max_steps: int = option("optimizer steps of the run",
                            default_text="GPT-3's 300B tokens for the GPT-3 sizes; nano 1000, tiny 150, mini 50")
    lr: float = option("peak learning rate", default_text="the model's, GPT-3 table")
    weight_decay: float = option("weight decay λ of matrices and embeddings (AdamHD: of its Huber decay; biases "
                                 "and norms are not decayed)", default_text="the config's, or 0.1")
    grad_clip: float = option("global gradient-norm clip, 0 disables",
                              default_text="the config's gradient_clipping, or 1.0")
    warmup_tokens: int = option("linear LR warmup, tokens", default_text="GPT-3's 375M, or 5% of a shorter run")
    decay_tokens: int = option("tokens at which the cosine decay reaches --min-lr-ratio of the peak, counted from "
                               "the start", default_text="GPT-3's 260B, or the end of a shorter run")
    min_lr_ratio: float = option("LR floor as a fraction of the peak", default_text="0.1")
    ramp_tokens: int = option("batch-size ramp length, tokens, 0 disables",
                              default_text="GPT-3's 4B, scaled down for a run shorter than 260B tokens")
    ramp_start_tokens: int = option("global batch at the start of the ramp, tokens", default_text="32k, GPT-3")
    dtype: str = option("training precision; fp16 needs DeepSpeed, whose fp16 mode scales the loss",
                        choices=("auto", "fp32", "bf16", "fp16"),
                        default_text="auto: the DeepSpeed config's, bf16 on GPU for FSDP2; fp32 on a CPU-only "
                                     "machine, where fp16 is refused")
    activation_checkpointing: bool = option("recompute each block in the backward pass", default_text="off")
    seed: int = option("seed of the model initialisation and of the data order", default_text="0")
    data: str = option("corpus: 'embedded' (Python's own sources, no download), a .txt/.jsonl file or folder, or a "
                       "hub dataset name (openwebtext, hf:NAME)", default_text="embedded")
    tokenizer: str = option("'local-bpe' (trained on the corpus) or a hub tokenizer (gpt2)",
                            default_text="local-bpe")
    vocab_size: Optional[int] = option("vocabulary of the local BPE",
                                       default_text="2048 for the CPU sizes, 8192 otherwise")
    max_chars: Optional[int] = option("use at most this many characters of the corpus", default_text="all")
    val_fraction: float = option("share of the corpus held out for validation", default_text="0.01")
    data_cache: Optional[str] = option("token cache folder",
                                       default_text="$ADAMHD_DATA_CACHE or ~/.cache/adamhd_dist")
    out_dir: str = option("run directory: checkpoints, metrics, TensorBoard, the manifest and the plot",
                          default_text="runs/<model>-<config name or fsdp>")
    resume: str = option("'auto' (the newest complete checkpoint in --out-dir, if any), 'never', or a checkpoint "
                         "folder", default_text="auto")
    eval_interval: int = option("optimizer steps between validation passes (and one at the end)",
                                default_text="a tenth of the run, at most 1000")
    eval_batches: int = option("validation micro-batches per rank per pass", default_text="10")
    save_interval: int = option("optimizer steps between checkpoints (and one at the end)",
                                default_text="--eval-interval")
    log_interval: int = option("optimizer steps between metrics.jsonl records", default_text="1; 10 above 1000 steps")
    keep_checkpoints: int = option("complete checkpoints kept, 0 keeps all", default_text="2")
    exit_after_steps: Optional[int] = option("save a checkpoint and exit after this many steps of this launch "
                                             "(for time-limited jobs)")
    peak_tflops: Optional[float] = option("peak TFLOP/s per rank for MFU",
                                          default_text="the GPU's data sheet, or a CPU estimate")
    tensorboard: bool = option("do not write TensorBoard scalars", flag="no-tensorboard", action="store_false")
    # last, with defaults: a manifest written before they existed ran at tp = pp = 1
    tp: int = option("tensor-parallel degree: ranks that split each block's matrices by heads; it must divide the "
                     "heads, the MLP width and --seq-len, and tp × pp the world size. Runs with --fsdp (FSDP2 over "
                     "tensor parallelism, dp = world / tp); with --deepspeed it is checked and refused with the "
                     "reason", default_text="1", default=1)
    pp: int = option("pipeline stages (DeepSpeed, ZeRO-0/1); checked and planned, not yet run: --pp above 1 is "
                     "refused with the reason", default_text="1", default=1)

    def __post_init__(self):
        if self.launch not in ("deepspeed", "fsdp"):
            raise SettingsError(f"launch must be 'deepspeed' or 'fsdp', got {self.launch!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise SettingsError(f"--dtype must be one of fp32, bf16, fp16, got {self.dtype!r}")
        if self.launch == "fsdp" and self.dtype == "fp16":
            # fp16 gradients underflow without loss scaling, and the FSDP2 engine has none (DeepSpeed's fp16 mode
            # scales the loss itself); bf16 has fp32's exponent range and needs no scaling.
            raise SettingsError("--dtype fp16 with --fsdp: the FSDP2 engine has no loss scaling, without which fp16 "
                                "gradients underflow; use --dtype bf16 (or fp32), or DeepSpeed (--deepspeed "
                                "CONFIG), whose fp16 mode scales the loss")
        for name in ("seq_len", "global_batch_tokens", "micro_batch", "max_steps", "eval_interval",
                     "eval_batches", "save_interval", "log_interval", "ramp_start_tokens", "tp", "pp"):
            positive_int(name, getattr(self, name))
        for name in ("seed", "warmup_tokens", "decay_tokens", "ramp_tokens", "keep_checkpoints"):
            non_negative_int(name, getattr(self, name))
        if self.exit_after_steps is not None:
            positive_int("exit_after_steps", self.exit_after_steps)
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise SettingsError(f"--{flag(name)} must be a finite number >= 0, got {v!r}")
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
RUN_FIELDS = ("max_steps", "micro_batch", "tp", "pp", "deepspeed_config", "activation_checkpointing", "data_cache",
              "out_dir", "resume", "eval_interval", "eval_batches", "save_interval", "log_interval", "keep_checkpoints",
              "exit_after_steps", "peak_tflops", "tensorboard")
"""Settings that may differ between launches of one job (micro-batch, tp and pp: with the world size)."""
FROM_MANIFEST_OVERRIDES = ("out_dir", "resume", "data_cache", "max_steps", "exit_after_steps", "eval_interval",
                           "save_interval", "log_interval", "keep_checkpoints", "peak_tflops", "tensorboard")
"""Options that may be given together with ``--from-manifest`` (the others would make it another job)."""
