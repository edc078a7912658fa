"""The per-layer statistic behind δ, split so that a sharded run can reduce it exactly.

For a layer θ (one original parameter tensor), ``s = Σ|θ| / numel`` over the WHOLE tensor. On one process that
is a local sum. Under sharding each rank holds part of θ, so the step is done in three parts:

1. :func:`layer_abs_sums` — local partial sums ``Σ|θ_local|`` for every layer, in one call;
2. a reduction of the stacked partial sums across the ranks that shard the layers — ONE collective for all
   layers, issued by the engine integration, never one per tensor;
3. :func:`update_deltas` — ``s = sum / numel`` with the layer's true numel, then δ from the rule below.

δ rules (``c = delta_scale``, ``β = delta_beta``):

- ``"ema"``:      μ ← s at the layer's first step, else μ ← β·μ + (1−β)·s;  δ = c·μ
- ``"mean_abs"``: δ = c·s
- ``"constant"``: δ = ``delta``; no statistic is needed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["DELTA_MODES", "ema_delta", "layer_abs_sums", "update_deltas"]

DELTA_MODES = ("ema", "mean_abs", "constant")


def layer_abs_sums(tensors: Sequence[Tensor]) -> Tensor:
    """``Σ|x|`` of each tensor, accumulated in fp32 per tensor and returned as fp64 ``(len(tensors),)``.

    One fused launch per device on CUDA (Triton when available, else ``torch._foreach_norm``); on CPU one call of
    the C++ kernel, whose summation order depends only on each tensor's values and numel (not on its address or
    the thread count), so a resumed run reproduces the statistic bit for bit. The result lives on the first
    tensor's device."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    out_device = tensors[0].device
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = torch.empty(len(tensors), dtype=torch.float64, device=out_device)
    for device, idx in by_device.items():
        ts = [tensors[i].detach() for i in idx]
        sums = None
        if device.type == "cuda":
            from .kernels import triton_adamhd

            if triton_adamhd.available():
                sums = triton_adamhd.layer_abs_sums_triton(ts)
        elif device.type == "cpu":
            from .kernels import cpu

            if cpu.available() and all(t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous() for t in ts):
                sums = cpu.layer_abs_sums_cpu(ts)
        if sums is None:
            norms = torch._foreach_norm(ts, 1, dtype=torch.float32)
            sums = torch.stack(norms)
        if len(by_device) == 1:  # no scatter (its index would be a host-to-device copy that waits for the GPU)
            return sums.to(out_device, torch.float64)
        out[torch.tensor(idx, device=out_device)] = sums.to(out_device, torch.float64)
    return out


_NUMEL_CACHE: dict[tuple, Tensor] = {}


def _numel_tensor(numels: tuple[int, ...], device: torch.device) -> Tensor:
    """The layers' numels as an fp64 tensor on ``device``, kept between steps (a fresh one would be a
    host-to-device copy every step, which waits for the GPU)."""
    key = (numels, device)
    t = _NUMEL_CACHE.get(key)
    if t is None:
        if len(_NUMEL_CACHE) >= 16:
            _NUMEL_CACHE.pop(next(iter(_NUMEL_CACHE)))
        t = _NUMEL_CACHE[key] = torch.tensor(numels, dtype=torch.float64).to(device)
    return t


def update_deltas(
    sums: Tensor,
    numels: Tensor | Sequence[int],
    mus: Tensor | None,
    has_mu: Tensor | Sequence[bool] | None,
    *,
    mode: str,
    scale: float,
    beta: float,
    delta: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """δ for each layer from its GLOBAL abs-sum and numel.

    Args:
        sums: fp64 ``(L,)`` reduced ``Σ|θ|`` per layer (ignored for ``"constant"``).
        numels: the true number of elements of each whole layer (padding excluded).
        mus: fp32 ``(L,)`` previous μ per layer (``"ema"`` only); entries where ``has_mu`` is False are ignored.
        has_mu: whether the layer already has a μ (False at its first step).
    Returns:
        ``(deltas, new_mus)``: fp32 ``(L,)`` δ on ``sums``' device, and the new fp32 μ (``None`` unless ``"ema"``).
    """
    device = sums.device
    n = sums.numel()
    if mode == "constant":
        return torch.full((n,), float(delta), dtype=torch.float32, device=device), None
    numels_t = numels.to(device, torch.float64) if isinstance(numels, Tensor) else _numel_tensor(tuple(numels), device)
    s = sums.to(torch.float64) / numels_t.clamp_min(1.0)
    if mode == "mean_abs":
        return (scale * s).to(torch.float32), None
    if mode != "ema":
        raise ValueError(f"delta_mode must be one of {DELTA_MODES}, got {mode!r}")
    if mus is None or has_mu is None:
        new_mu = s
    elif not isinstance(has_mu, Tensor) and all(has_mu):  # no mask to build (a host-to-device copy)
        new_mu = beta * mus.to(device, torch.float64) + (1.0 - beta) * s
    else:
        has = torch.as_tensor(has_mu, dtype=torch.bool, device=device)
        prev = mus.to(device, torch.float64)
        new_mu = torch.where(has, beta * prev + (1.0 - beta) * s, s)
    new_mu32 = new_mu.to(torch.float32)
    return ema_delta(new_mu32, scale), new_mu32


def ema_delta(mu: Tensor, scale: float) -> Tensor:
    """δ = c·μ of the ``"ema"`` rule, from the stored fp32 μ (fp64 product, rounded to fp32 once)."""
    return (scale * mu.to(torch.float64)).to(torch.float32)
