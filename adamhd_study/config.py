"""What a comparison runs: :class:`CompareConfig` (validated on construction, errors naming the flag) and the
presets :func:`tiny` (CPU) and :func:`gpt3_small` (GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from adamhd_train.models import MODEL_NAMES
from adamhd_train.options import flag, option

from .analysis import OutlierSchedule

__all__ = ["ARMS", "PRESETS", "ROOT", "CompareConfig", "preset", "tiny", "gpt3_small"]

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: relative DeepSpeed config paths not found from the working directory are read from it."""
ARMS = ("baseline", "large-batch", "outliers")
"""The arms a comparison can run (``CompareConfig.arms``)."""
DEFAULT_OPTIMIZERS = {"adamhd": "ds_configs/zero2_adamhd.json", "adamw": "ds_configs/zero2_adamw.json"}


def _flag(name: str) -> str:
    return "--" + flag(CompareConfig, name)


def csv_list(text: str) -> tuple[str, ...]:
    """A comma-separated command-line list: ``"baseline,outliers"`` -> ``("baseline", "outliers")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def float_list(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers from the command line."""
    try:
        return tuple(float(x) for x in csv_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def named_config(text: str) -> tuple[str, str]:
    """``NAME=CONFIG`` from the command line: an optimizer's name and its DeepSpeed config."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CONFIG, e.g. adamw=ds_configs/zero2_adamw.json")
    return name.strip(), path.strip()


def _is_positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v > 0


@dataclass
class CompareConfig:
    """Everything a comparison runs. Presets are functions (:func:`tiny`, :func:`gpt3_small`); the command line
    overrides fields. Validated on construction: errors name the field (as its command-line flag) and the allowed
    values."""

    preset: str
    """Name of the preset the values came from (for the report)."""
    model: str
    """Model size, from :data:`adamhd_train.models.MODEL_NAMES`."""
    max_steps: int
    """Optimizer steps of the baseline arm (the large-batch arm runs ``max_steps // large_batch_factor``)."""
    seq_len: int
    """Tokens per sequence."""
    global_batch_tokens: int
    """Tokens per optimizer step in the baseline arm."""
    micro_batch: int
    """Sequences per rank per forward pass (all arms)."""
    out_dir: str = option("output folder: one run directory per run, report.md, results.json, the plots",
                          default_text="runs/compare-<preset>")
    """Output folder: ``runs/`` with one run directory per run, ``report.md``, ``results.json``, the PNGs."""
    lr: Optional[float] = None
    """Peak learning rate of every optimizer (None: the model's default from the GPT-3 table)."""
    weight_decay: float = 0.1
    """λ of every optimizer (decoupled decay of the matrices and embeddings)."""
    seeds: int = option("seeds per arm and optimizer: 0 .. N-1", default=1)
    """Seeds per arm and optimizer: seeds 0 .. seeds-1 (model initialisation and data order)."""
    arms: tuple = option(f"comma-separated, from {', '.join(ARMS)}", type=csv_list, default=ARMS)
    """Which arms to run, from :data:`ARMS`; ``baseline`` is required (the others are compared against it)."""
    optimizers: dict = option("an optimizer and its DeepSpeed config; repeat for each", flag="optimizer",
                              action="append", type=named_config, metavar="NAME=CONFIG",
                              default_factory=lambda: dict(DEFAULT_OPTIMIZERS))
    """``{name: DeepSpeed config path}``; each config's ``"optimizer"`` section names the optimizer."""
    reference: str = option("the optimizer the others are measured against", default="adamw")
    """The optimizer the others are compared against (a key of ``optimizers``)."""
    large_batch_factor: int = option("global-batch multiplier of the large-batch arm", default=4)
    """Global-batch multiplier of the ``large-batch`` arm (the steps are divided by it: same tokens)."""
    outlier_rate: float = option("share of micro-batches with an outlier", default=0.02)
    """Share of micro-batches with an outlier gradient in the ``outliers`` arm."""
    outlier_scale: float = option("spike size in gradient RMS units, or the multiplier in scale mode",
                                  default=100.0)
    """Spike size in units of a tensor's gradient RMS (``spike`` mode), or the gradient multiplier (``scale``)."""
    outlier_fraction: float = option("share of each tensor's entries spiked", default=1e-3)
    """Share of each tensor's entries spiked at an outlier event."""
    outlier_mode: str = option("sparse spikes or the whole gradient scaled", choices=("spike", "scale"),
                               default="spike")
    """``"spike"`` (sparse large entries) or ``"scale"`` (whole gradient × ``outlier_scale``)."""
    sparsities: tuple = option("pruning sparsities, comma-separated", type=float_list,
                               default=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5))
    """Magnitude-pruning sparsities evaluated on the baseline arm's final weights."""
    prune_scope: str = option("one magnitude threshold for all decayed matrices (global) or one per tensor",
                              choices=("global", "layer"), default="global")
    """``"global"`` (one magnitude threshold over all decayed matrices) or ``"layer"`` (the sparsity per tensor)."""
    target_loss: Optional[float] = option("validation loss for steps-to-target",
                                          default_text="the higher of the two final losses, which both reached",
                                          default=None)
    """Validation loss for steps-to-target (None: per arm and seed, the higher of the reference's and the
    candidate's final validation losses, i.e. the loss both reached)."""
    eval_interval: int = 20
    """Steps between validation passes of the baseline arm (the large-batch arm: divided by the factor)."""
    eval_batches: int = 8
    """Validation micro-batches per pass during training (the loss curves)."""
    final_eval_batches: Optional[int] = option("validation micro-batches for final and pruned models",
                                               default=None)
    """Validation micro-batches for the final and pruned evaluations (None: the whole validation split)."""
    data: str = "embedded"
    """Corpus: ``"embedded"``, a .txt/.jsonl file or folder, or a hub dataset name."""
    tokenizer: str = "local-bpe"
    """``"local-bpe"`` or a hub tokenizer name."""
    vocab_size: Optional[int] = 2048
    """Vocabulary of the local BPE (None for a hub tokenizer)."""
    max_chars: Optional[int] = None
    """Cap on the corpus in characters (None: all)."""
    val_fraction: float = 0.01
    """Share of the corpus held out for validation."""
    data_cache: Optional[str] = None
    """Token cache (None: the launcher's default, ``$ADAMHD_DATA_CACHE`` or ``~/.cache/adamhd_dist``)."""
    dtype: Optional[str] = None
    """Training precision for every run (None: the launcher's choice: the config's, fp32 on a CPU)."""
    nproc: int = option("ranks per run (1: one process; more: the deepspeed launcher)", default=1)
    """Ranks per run: 1 runs the launcher as one process; more start it with the ``deepspeed`` launcher."""
    parallel: int = option("runs at the same time", default=1)
    """Runs at the same time (each gets ``cpus // (parallel · nproc)`` threads on a CPU machine)."""
    run_timeout_s: float = option("seconds per run before it is stopped", flag="run-timeout", default=3600.0)
    """Wall-clock limit per run; a run past it is stopped and reported as failed."""
    min_effect: float = option("smallest loss difference in nats counted as real", default=0.01)
    """Smallest validation-loss difference (nats) counted as real, whatever the seed noise."""
    alpha: float = option("level of the two-sided paired t test a loss difference must pass with two seeds or "
                          "more", default=0.05)
    """Significance level of the paired t test that a loss difference must pass with two seeds or more."""
    speedup_tolerance: float = option("speed-ups within 1 ± this count as none", default=0.05)
    """Speed-ups within 1 ± this are reported as no measurable difference."""
    prune_tolerance: float = option("relative perplexity increase a pruned model may have", default=0.05)
    """Relative perplexity increase a pruned model may have and still count as tolerating the sparsity."""

    def __post_init__(self):
        self._check_sizes()
        self._check_arms()
        self._check_optimizers()
        self._check_thresholds()
        self._check_evaluation()
        self.outlier_schedule(0)  # validates the outlier fields

    def _check_sizes(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"--model: unknown model {self.model!r} (allowed: {', '.join(MODEL_NAMES)})")
        for name in ("max_steps", "seq_len", "global_batch_tokens", "micro_batch", "seeds", "large_batch_factor",
                     "eval_interval", "eval_batches", "nproc", "parallel"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{_flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        if self.global_batch_tokens % self.seq_len:
            raise ValueError(f"--global-batch-tokens ({self.global_batch_tokens}) must be a multiple of --seq-len "
                             f"({self.seq_len})")
        if self.dtype not in (None, "auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--dtype must be one of auto, fp32, bf16, fp16 (or omitted), got {self.dtype!r}")
        if not (isinstance(self.run_timeout_s, (int, float)) and self.run_timeout_s > 0):
            raise ValueError(f"--run-timeout must be a positive number of seconds, got {self.run_timeout_s!r}")

    def _check_arms(self) -> None:
        self.arms = tuple(self.arms)
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"--arms: unknown arm(s) {bad} (allowed: {', '.join(ARMS)})" if bad else
                             f"--arms: give at least 'baseline' (allowed: {', '.join(ARMS)})")
        if "baseline" not in self.arms:
            raise ValueError(f"--arms must include 'baseline' (the other arms are measured against it), got "
                             f"{','.join(self.arms)}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"--arms lists an arm twice: {','.join(self.arms)}")
        self.arms = tuple(a for a in ARMS if a in self.arms)
        if "large-batch" in self.arms and self.max_steps < self.large_batch_factor:
            raise ValueError(f"--max-steps ({self.max_steps}) must be >= --large-batch-factor "
                             f"({self.large_batch_factor}) for the large-batch arm to take a step")

    def _check_optimizers(self) -> None:
        if not isinstance(self.optimizers, dict) or len(self.optimizers) < 2:
            raise ValueError(f"--optimizer: give at least two optimizers as NAME=CONFIG, got "
                             f"{self.optimizers!r}")
        for name, path in self.optimizers.items():
            if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"--optimizer: name {name!r} must be non-empty letters, digits, '-', '_' or '.'")
            if not Path(path).is_file() and not (ROOT / path).is_file():
                raise ValueError(f"--optimizer {name}={path}: no such DeepSpeed config file")
        if self.reference not in self.optimizers:
            raise ValueError(f"--reference {self.reference!r} is not one of the optimizers "
                             f"({', '.join(self.optimizers)})")

    def _check_thresholds(self) -> None:
        for name in ("weight_decay", "min_effect", "speedup_tolerance", "prune_tolerance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {v!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be a number in (0, 1), got {self.alpha!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if self.target_loss is not None and not (isinstance(self.target_loss, (int, float))
                                                 and math.isfinite(self.target_loss)):
            raise ValueError(f"--target-loss must be a finite number, got {self.target_loss!r}")

    def _check_evaluation(self) -> None:
        if self.final_eval_batches is not None and not _is_positive_int(self.final_eval_batches):
            raise ValueError(f"--final-eval-batches must be a positive integer or omitted (whole validation split), "
                             f"got {self.final_eval_batches!r}")
        self.sparsities = tuple(float(s) for s in self.sparsities)
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError(f"--sparsities must be numbers in [0, 1), got {self.sparsities!r}")
        self.sparsities = tuple(sorted(set(self.sparsities) | {0.0}))
        if self.prune_scope not in ("global", "layer"):
            raise ValueError(f"--prune-scope must be 'global' or 'layer', got {self.prune_scope!r}")

    def outlier_schedule(self, seed: int, accum_steps: int = 1) -> OutlierSchedule:
        """The :class:`~adamhd_study.analysis.OutlierSchedule` of the outlier arm for training seed ``seed``: seeded
        ``1000 + seed`` (the same for every optimizer), no events during the first 5% of the micro-batches (the
        LR warmup)."""
        try:
            return OutlierSchedule(seed=1000 + seed, rate=self.outlier_rate, scale=self.outlier_scale,
                                   fraction=self.outlier_fraction, mode=self.outlier_mode,
                                   start=(self.max_steps * accum_steps) // 20)
        except ValueError as e:
            raise ValueError(f"--{str(e).replace('outlier ', 'outlier-', 1)}") from None

    def config_path(self, optimizer: str) -> Path:
        """The DeepSpeed config file of ``optimizer`` (relative paths: from the working directory, else the
        repository root)."""
        p = Path(self.optimizers[optimizer])
        return (p if p.is_file() else ROOT / p).resolve()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arms"], d["sparsities"] = list(self.arms), list(self.sparsities)
        return d


def tiny(out_dir: str = "runs/compare-tiny") -> CompareConfig:
    """The CPU preset: the ``tiny`` model (4 layers, d_model 128, ~1.07M parameters with a 2048-token BPE)
    on 4M characters of the embedded corpus (Python's own sources, no download), 320 steps of 2,048 tokens
    (655k tokens, about half an epoch), validation every 16 steps, final and pruned models on 16 validation
    micro-batches (32k tokens), one seed; the two optimizers of an arm run side by side on one thread each.
    Six runs (3 arms × 2 optimizers) within 15 minutes on 2 CPU cores."""
    return CompareConfig(preset="tiny", model="tiny", max_steps=320, seq_len=128, global_batch_tokens=2048,
                         micro_batch=16, out_dir=out_dir, eval_interval=16, eval_batches=8,
                         final_eval_batches=16, data="embedded", tokenizer="local-bpe", vocab_size=2048,
                         max_chars=4_000_000, val_fraction=0.05, parallel=2, run_timeout_s=1800.0)


def gpt3_small(out_dir: str = "runs/compare-gpt3-small") -> CompareConfig:
    """The GPU preset: GPT-3 Small (125M) with GPT-3's batch (0.5M tokens), LR 6e-4, betas (0.9, 0.95), weight
    decay 0.1 and clipping at 1.0, for 2,000 steps (1.05B tokens) on OpenWebText with the GPT-2 tokenizer (a
    download on first use; give --data for a local corpus), one run at a time on all local GPUs."""
    return CompareConfig(preset="gpt3-small", model="gpt3-small", max_steps=2000, seq_len=2048,
                         global_batch_tokens=524_288, micro_batch=16, out_dir=out_dir, eval_interval=100,
                         eval_batches=20, final_eval_batches=50, data="openwebtext", tokenizer="gpt2",
                         vocab_size=None, max_chars=None, val_fraction=0.005, nproc=max(1, torch.cuda.device_count()),
                         parallel=1, run_timeout_s=24 * 3600.0)


PRESETS: dict[str, Callable[..., CompareConfig]] = {"tiny": tiny, "gpt3-small": gpt3_small}
"""Preset name -> function returning its :class:`CompareConfig`."""


def preset(name: str, **overrides) -> CompareConfig:
    """The preset ``name`` with fields replaced by ``overrides`` (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r} (allowed: {', '.join(PRESETS)})")
    base = PRESETS[name]()
    names = {f.name for f in dataclasses.fields(CompareConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown CompareConfig field(s) {unknown} (allowed: {sorted(names)})")
    return dataclasses.replace(base, **overrides)
