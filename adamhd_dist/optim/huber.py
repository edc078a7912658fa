"""The Huber decay rule, on its own.

Huber penalty per coordinate: ``H_δ(a) = a²/2`` if ``|a| ≤ δ`` else ``δ|a| − δ²/2``; its gradient is
``clip(a, −δ, δ)``. AdamHD applies it decoupled from the Adam direction, with strength ``τ = lr · weight_decay``,
in one of two forms:

- ``prox`` (default): the closed-form proximal step of ``τ·H_δ``, applied after the Adam step::

      prox(x) = x / (1 + τ)            if |x| ≤ (1 + τ)·δ
              = x − τ·δ·sign(x)        otherwise
              = x − τ·clip(x / (1 + τ), −δ, δ)       (the same thing, written branch-free)

- ``clip``: an explicit gradient step of ``τ·H_δ`` before the Adam step, the order torch.optim.AdamW uses::

      x ← x − τ·clip(x, −δ, δ)

Both move a coordinate by at most ``τ·δ`` (bounded regularisation force), and ``prox`` never flips a sign.
With ``δ = +inf`` they are L2 decay (``prox``: ``x/(1+τ)``, ``clip``: AdamW's ``x·(1−τ)``); with ``δ = 0`` they do
nothing. Every path of the optimizer (loop, foreach, fused kernels) uses the branch-free form above.
"""

from __future__ import annotations

import torch

__all__ = ["huber_penalty", "huber_prox_", "huber_clip_", "huber_prox_foreach_", "huber_clip_foreach_"]


def huber_penalty(x: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
    """Elementwise Huber penalty ``H_δ(x)``."""
    a = x.abs()
    return torch.where(a <= delta, 0.5 * a * a, delta * a - 0.5 * delta * delta)


def huber_prox_(x: torch.Tensor, tau: float, delta: float | torch.Tensor) -> torch.Tensor:
    """In place: ``x ← prox_{τ·H_δ}(x) = x − τ·clip(x/(1+τ), −δ, δ)``. Returns ``x``."""
    if tau == 0.0:
        return x
    shrink = torch.clamp(x / (1.0 + tau), -delta, delta)  # type: ignore[arg-type]
    return x.sub_(shrink, alpha=tau)


def huber_clip_(x: torch.Tensor, tau: float, delta: float | torch.Tensor) -> torch.Tensor:
    """In place: ``x ← x − τ·clip(x, −δ, δ)`` (a gradient step on ``τ·H_δ``). Returns ``x``."""
    if tau == 0.0:
        return x
    return x.sub_(torch.clamp(x, -delta, delta), alpha=tau)  # type: ignore[arg-type]


def huber_prox_foreach_(xs: list[torch.Tensor], tau: float, deltas: list[float]) -> list[torch.Tensor]:
    """:func:`huber_prox_` over a list of tensors with one δ each, in ``torch._foreach_*`` ops. Returns ``xs``."""
    if tau == 0.0 or not xs:
        return xs
    shrink = torch._foreach_div(xs, 1.0 + tau)
    torch._foreach_clamp_max_(shrink, list(deltas))
    torch._foreach_clamp_min_(shrink, [-d for d in deltas])
    torch._foreach_add_(xs, shrink, alpha=-tau)
    return xs


def huber_clip_foreach_(xs: list[torch.Tensor], tau: float, deltas: list[float]) -> list[torch.Tensor]:
    """:func:`huber_clip_` over a list of tensors with one δ each, in ``torch._foreach_*`` ops. Returns ``xs``."""
    if tau == 0.0 or not xs:
        return xs
    c = torch._foreach_clamp_max(xs, list(deltas))
    torch._foreach_clamp_min_(c, [-d for d in deltas])
    torch._foreach_add_(xs, c, alpha=-tau)
    return xs
