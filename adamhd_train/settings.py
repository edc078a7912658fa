"""The settings of one pre-training job: a typed dataclass validated on construction, and the command-line counts.

:class:`TrainSettings` is what a manifest stores (``manifest.json`` → ``"settings"``); every field is checked in
``__post_init__`` with an error that names the option (``--max-steps must be a positive integer, got 0``).
:func:`adamhd_train.resolve.resolve_settings` fills it from the options a user gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

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


def parse_count(text: str) -> int:
    """A whole count from the command line, with an optional k/M/B/G/T suffix or in exponent form: 4096, 375M, 4B,
    32k, 2.6e11, 1_000. Raises ``argparse.ArgumentTypeError`` (argparse then names the flag)."""
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


_FLAG_NAMES = {"deepspeed_config": "deepspeed", "tensorboard": "no-tensorboard"}


def flag(name: str) -> str:
    """The command-line option of a settings field, without the dashes: ``max_steps`` -> ``max-steps``."""
    return _FLAG_NAMES.get(name, name.replace("_", "-"))


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
    """Training precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (fp16 with DeepSpeed only, which scales the loss)."""
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
        if self.launch == "fsdp" and self.dtype == "fp16":
            # fp16 gradients underflow without loss scaling, and the FSDP2 engine has none (DeepSpeed's fp16 mode
            # scales the loss itself); bf16 has fp32's exponent range and needs no scaling.
            raise SettingsError("--dtype fp16 with --fsdp: the FSDP2 engine has no loss scaling, without which fp16 "
                                "gradients underflow; use --dtype bf16 (or fp32), or DeepSpeed (--deepspeed "
                                "CONFIG), whose fp16 mode scales the loss")
        for name in ("seq_len", "global_batch_tokens", "micro_batch", "max_steps", "eval_interval",
                     "eval_batches", "save_interval", "log_interval", "ramp_start_tokens"):
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
RUN_FIELDS = ("max_steps", "micro_batch", "deepspeed_config", "activation_checkpointing", "data_cache", "out_dir",
              "resume", "eval_interval", "eval_batches", "save_interval", "log_interval", "keep_checkpoints",
              "exit_after_steps", "peak_tflops", "tensorboard")
"""Settings that may differ between launches of one job (micro-batch: with the world size)."""
FROM_MANIFEST_OVERRIDES = ("out_dir", "resume", "data_cache", "max_steps", "exit_after_steps", "eval_interval",
                           "save_interval", "log_interval", "keep_checkpoints", "peak_tflops", "tensorboard")
"""Options that may be given together with ``--from-manifest`` (the others would make it another job)."""
