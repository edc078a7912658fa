"""The GPT-3 pre-training schedule (Brown et al. 2020, appendix B) as pure functions.

Units. GPT-3 states its schedule in TOKENS: the global batch (0.5M ... 3.2M tokens per optimizer step), the LR
warmup (375M tokens), the cosine decay (to 10% of peak at 260B tokens) and the batch-size ramp (32k tokens up to the
full batch over the first 4-12B tokens). A training loop counts optimizer STEPS and MICRO-BATCHES (sequences of
``seq_len`` tokens per rank per forward pass). This module converts between them:

- :func:`batch_plan` turns a global batch in tokens into micro-batch × ranks × accumulation steps;
- :class:`BatchRamp` gives the accumulation steps at a consumed-token count, and the tokens consumed before a step;
- :func:`lr_factor` is unit-free (position, warmup and decay end in the same unit);
- :func:`lr_scheduler` is a ``torch.optim.lr_scheduler.LambdaLR`` counted in steps, or in tokens when given
  ``tokens_at_step`` (e.g. :meth:`BatchRamp.tokens_at_step`).

    >>> plan = batch_plan(524_288, seq_len=2048, micro_batch=8, world_size=8)
    >>> plan.grad_accum_steps
    4
    >>> ramp = BatchRamp(plan, start_tokens=32_768, ramp_tokens=4_000_000_000)
    >>> ramp.accum_steps_at(0), ramp.accum_steps_at(4_000_000_000)
    (1, 4)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = [
    "GPT3_BETAS",
    "GPT3_EPS",
    "GPT3_WEIGHT_DECAY",
    "GPT3_GRAD_CLIP",
    "GPT3_WARMUP_TOKENS",
    "GPT3_DECAY_TOKENS",
    "GPT3_MIN_LR_RATIO",
    "GPT3_RAMP_START_TOKENS",
    "BatchPlan",
    "batch_plan",
    "BatchRamp",
    "lr_factor",
    "lr_scheduler",
]

GPT3_BETAS = (0.9, 0.95)
GPT3_EPS = 1e-8
GPT3_WEIGHT_DECAY = 0.1
GPT3_GRAD_CLIP = 1.0
GPT3_WARMUP_TOKENS = 375_000_000
"""Linear LR warmup length, tokens."""
GPT3_DECAY_TOKENS = 260_000_000_000
"""Token count at which the cosine decay reaches its floor (counted from the start of training), tokens."""
GPT3_MIN_LR_RATIO = 0.1
"""LR floor as a fraction of the peak."""
GPT3_RAMP_START_TOKENS = 32_768
"""Global batch at the start of the batch-size ramp ("32k tokens"), tokens."""


def _positive_int(label: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return value


def _non_negative(label: str, value, integer: bool = False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{label} must be a non-negative finite {kind}, got {value!r}")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is cut into micro-batches. Build it with :func:`batch_plan`."""

    global_batch_tokens: int
    """Tokens per optimizer step, all ranks and accumulation steps together."""
    seq_len: int
    """Tokens per sequence (the model's context)."""
    micro_batch: int
    """Sequences per rank per forward/backward pass."""
    world_size: int
    """Data-parallel ranks."""
    grad_accum_steps: int
    """Forward/backward passes per rank per optimizer step."""

    @property
    def global_batch_sequences(self) -> int:
        """Sequences per optimizer step."""
        return self.global_batch_tokens // self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step (= ``global_batch_tokens``)."""
        return self.global_batch_tokens

    @property
    def tokens_per_micro_step(self) -> int:
        """Tokens of one micro-batch on every rank together: the unit the batch size moves in."""
        return self.micro_batch * self.world_size * self.seq_len

    @property
    def tokens_per_rank_micro_batch(self) -> int:
        """Tokens of one micro-batch on one rank."""
        return self.micro_batch * self.seq_len

    def describe(self) -> str:
        """One line with the derived numbers, for the run log."""
        return (f"global batch {self.global_batch_tokens:,} tokens = {self.global_batch_sequences:,} sequences x "
                f"{self.seq_len:,} tokens = micro-batch {self.micro_batch} x {self.world_size} rank(s) x "
                f"{self.grad_accum_steps} gradient accumulation step(s)")


def batch_plan(global_batch_tokens: int, seq_len: int, micro_batch: int, world_size: int) -> BatchPlan:
    """Derive the gradient accumulation steps for a global batch given in tokens.

    ``global_batch_tokens = seq_len × micro_batch × world_size × grad_accum_steps`` must hold exactly; otherwise a
    ``ValueError`` names the field that does not divide and the values that would.
    """
    _positive_int("global_batch_tokens", global_batch_tokens)
    _positive_int("seq_len", seq_len)
    _positive_int("micro_batch", micro_batch)
    _positive_int("world_size", world_size)
    if global_batch_tokens % seq_len:
        raise ValueError(f"global_batch_tokens ({global_batch_tokens:,}) must be a multiple of seq_len ({seq_len}); "
                         f"nearest: {max(1, global_batch_tokens // seq_len) * seq_len:,}")
    sequences = global_batch_tokens // seq_len
    if sequences % world_size:
        raise ValueError(f"world_size ({world_size}) must divide the global batch of {sequences} sequences "
                         f"(global_batch_tokens {global_batch_tokens:,} / seq_len {seq_len})")
    per_rank = sequences // world_size
    if per_rank % micro_batch:
        fits = [d for d in _divisors(per_rank) if d <= 1024][:12]
        raise ValueError(f"micro_batch ({micro_batch}) must divide the {per_rank} sequences per rank "
                         f"({sequences} sequences / world_size {world_size}); allowed: {fits}")
    return BatchPlan(global_batch_tokens, seq_len, micro_batch, world_size, per_rank // micro_batch)


@dataclass(frozen=True)
class BatchRamp:
    """GPT-3's batch-size warmup: the global batch grows linearly from ``start_tokens`` to the plan's full batch
    over the first ``ramp_tokens`` consumed tokens, in whole micro-steps (one micro-batch on every rank).

    At ``c`` consumed tokens the target batch is ``start + (full - start) · min(1, c / ramp_tokens)`` tokens; the
    step runs ``clamp(floor(target / tokens_per_micro_step), 1, plan.grad_accum_steps)`` accumulation steps. The
    smallest batch is one micro-step, so with many ranks the effective start can exceed ``start_tokens``
    (:attr:`effective_start_tokens`). ``ramp_tokens = 0`` disables the ramp.
    """

    plan: BatchPlan
    start_tokens: int = GPT3_RAMP_START_TOKENS
    """Global batch at the first step, tokens."""
    ramp_tokens: int = 0
    """Consumed tokens after which the full batch is used, tokens (GPT-3: 4-12B depending on size)."""
    _cum: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.plan, BatchPlan):
            raise ValueError(f"plan must be a BatchPlan (from batch_plan()), got {type(self.plan).__name__}")
        _positive_int("start_tokens", self.start_tokens)
        _non_negative("ramp_tokens", self.ramp_tokens, integer=True)
        if self.start_tokens > self.plan.global_batch_tokens:
            raise ValueError(f"start_tokens ({self.start_tokens:,}) must not exceed the global batch "
                             f"({self.plan.global_batch_tokens:,} tokens)")

    @property
    def effective_start_tokens(self) -> int:
        """Global batch of the first step after rounding to whole micro-steps, tokens."""
        return self.accum_steps_at(0) * self.plan.tokens_per_micro_step

    def accum_steps_at(self, consumed_tokens: int) -> int:
        """Gradient accumulation steps (per rank) of the optimizer step that starts after ``consumed_tokens``."""
        _non_negative("consumed_tokens", consumed_tokens)
        full = self.plan.grad_accum_steps
        if self.ramp_tokens == 0 or consumed_tokens >= self.ramp_tokens:
            return full
        target = self.start_tokens + (self.plan.global_batch_tokens - self.start_tokens) * (
            consumed_tokens / self.ramp_tokens)
        return max(1, min(full, int(target // self.plan.tokens_per_micro_step)))

    def batch_tokens_at(self, consumed_tokens: int) -> int:
        """Global batch in tokens of the optimizer step that starts after ``consumed_tokens``."""
        return self.accum_steps_at(consumed_tokens) * self.plan.tokens_per_micro_step

    def _ramp_table(self) -> list[int]:
        # _cum[k] = tokens consumed before step k, for every step that starts inside the ramp, plus the first after.
        if not self._cum:
            cum, consumed = [0], 0
            # the accumulation count never decreases: once a step is full-size, all later ones are
            while consumed < self.ramp_tokens and self.accum_steps_at(consumed) < self.plan.grad_accum_steps:
                consumed += self.batch_tokens_at(consumed)
                cum.append(consumed)
            self._cum.extend(cum)
        return self._cum

    def tokens_at_step(self, step: int) -> int:
        """Tokens consumed before optimizer step ``step`` (0-based), i.e. after ``step`` steps."""
        _non_negative("step", step, integer=True)
        cum = self._ramp_table()
        if step < len(cum):
            return cum[step]
        return cum[-1] + (step - (len(cum) - 1)) * self.plan.global_batch_tokens

    def step_at_tokens(self, tokens: int) -> int:
        """Number of optimizer steps needed to consume at least ``tokens`` tokens."""
        _non_negative("tokens", tokens)
        cum = self._ramp_table()
        if tokens <= cum[-1]:
            return bisect.bisect_left(cum, tokens)
        return len(cum) - 1 + math.ceil((tokens - cum[-1]) / self.plan.global_batch_tokens)


def lr_factor(position: float, *, warmup: float, decay_end: float, min_ratio: float = GPT3_MIN_LR_RATIO) -> float:
    """Multiplier of the peak LR at ``position``: linear warmup, then cosine decay to ``min_ratio``, then flat.

        position < warmup:               position / warmup
        warmup ≤ position < decay_end:   min_ratio + (1 - min_ratio) · ½(1 + cos(π · (position - warmup) /
                                                                                 (decay_end - warmup)))
        position ≥ decay_end:            min_ratio

    ``position``, ``warmup`` and ``decay_end`` share one unit, tokens or steps (GPT-3: warmup 375M tokens,
    decay_end 260B tokens). ``decay_end`` is counted from the start of training, not from the end of warmup.
    """
    _non_negative("position", position)
    _non_negative("warmup", warmup)
    _non_negative("decay_end", decay_end)
    if not (isinstance(min_ratio, (int, float)) and 0.0 <= min_ratio <= 1.0):
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio!r}")
    if decay_end < warmup:
        raise ValueError(f"decay_end ({decay_end}) must be >= warmup ({warmup})")
    if position < warmup:
        return position / warmup
    if position >= decay_end:
        return float(min_ratio)
    progress = (position - warmup) / (decay_end - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup: float,
    decay_end: float,
    min_ratio: float = GPT3_MIN_LR_RATIO,
    tokens_at_step: Optional[Callable[[int], int]] = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that scales each param group's ``lr`` (the peak) by :func:`lr_factor`.

    Call ``scheduler.step()`` once after every ``optimizer.step()``. Optimizer step ``k`` (0-based) runs at the
    factor of the position reached AFTER it, so the first step already has a non-zero LR:

    - ``tokens_at_step=None``: ``warmup`` and ``decay_end`` are in optimizer steps; position = ``k + 1``.
    - ``tokens_at_step`` given (e.g. ``BatchRamp.tokens_at_step`` or ``lambda s: s * plan.tokens_per_step``):
      ``warmup`` and ``decay_end`` are in tokens; position = ``tokens_at_step(k + 1)``.

    The scheduler's ``state_dict`` holds the step count, so a resumed run continues the same curve.
    """
    lr_factor(0, warmup=warmup, decay_end=decay_end, min_ratio=min_ratio)  # validate before any work
    if tokens_at_step is not None and not callable(tokens_at_step):
        raise ValueError(f"tokens_at_step must be callable (step -> tokens) or None, got {tokens_at_step!r}")
    position = (lambda k: k + 1) if tokens_at_step is None else (lambda k: tokens_at_step(k + 1))

    def factor(k: int) -> float:
        return lr_factor(position(k), warmup=warmup, decay_end=decay_end, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
