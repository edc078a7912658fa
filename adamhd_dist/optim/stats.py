"""The per-layer statistic behind δ, split so that a sharded run can reduce it exactly.

For a layer θ (one original parameter tensor), ``s = Σ|θ| / numel`` over the WHOLE tensor. On one process that
is a local sum. Under sharding each rank holds part of θ, so the step is done in three parts:

1. :func:`layer_abs_sums` — local partial sums ``Σ|θ_local|`` for every layer, in one call;
2. a reduction of the stacked partial sums across the ranks that shard the layers — ONE collective for all
   layers, by the optimizer's layer-statistic strategy (:mod:`adamhd_dist.optim.layer_stats`), never one per
   tensor;
3. :func:`advance_deltas` — ``s = sum / numel`` with the layer's true numel, then δ (and μ) from the rule below,
   for every layer at once whatever rule each layer's param group asks for. This is the one place the optimizer
   computes δ, whatever the sharding; :func:`current_delta` is the one place δ is read back for reporting.

δ rules (``c = delta_scale``, ``β = delta_beta``):

- ``"ema"``:      μ ← s at the layer's first step, else μ ← β·μ + (1−β)·s;  δ = c·μ
- ``"mean_abs"``: δ = c·s
- ``"constant"``: δ = ``delta``; no statistic is needed.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["DELTA_MODES", "DeltaSetting", "delta_setting", "advance_deltas", "current_delta", "ema_delta",
           "layer_abs_sums", "update_deltas"]

DELTA_MODES = ("ema", "mean_abs", "constant")


class DeltaSetting(NamedTuple):
    """How a param group's δ is obtained: ``mode`` with its ``scale`` (c), ``beta`` (β_δ) or fixed ``delta``."""

    mode: str
    scale: float
    beta: float
    delta: float | None

    @property
    def needs_statistic(self) -> bool:
        return self.mode != "constant"


def delta_setting(group: dict) -> DeltaSetting | None:
    """The δ setting of a param group; None when the group has no decay (``weight_decay == 0``: no δ at all)."""
    if float(group["weight_decay"]) == 0.0:
        return None
    if group["delta_mode"] == "constant":
        return DeltaSetting("constant", 0.0, 0.0, float(group["delta"]))
    return DeltaSetting(group["delta_mode"], float(group["delta_scale"]), float(group["delta_beta"]), None)


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

            if triton_adamhd.available() and all(t.dtype in triton_adamhd.SUPPORTED_DTYPES for t in ts):
                sums = triton_adamhd.layer_abs_sums_triton(ts)
        elif device.type == "cpu":
            from .kernels import cpu

            if cpu.available() and all(t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous() for t in ts):
                sums = cpu.layer_abs_sums_cpu(ts)
        if sums is None:
            sums = _foreach_abs_sums(ts)
        if len(by_device) == 1:  # no scatter (its index would be a host-to-device copy that waits for the GPU)
            return sums.to(out_device, torch.float64)
        out[torch.tensor(idx, device=out_device)] = sums.to(out_device, torch.float64)
    return out


def _foreach_abs_sums(ts: list[Tensor]) -> Tensor:
    """Σ|x| per tensor with torch's foreach norm: accumulated in fp32 (fp64 for fp64 tensors), returned fp64."""
    wide = [i for i, t in enumerate(ts) if t.dtype == torch.float64]
    if not wide:
        return torch.stack(torch._foreach_norm(ts, 1, dtype=torch.float32)).to(torch.float64)
    out = torch.empty(len(ts), dtype=torch.float64, device=ts[0].device)
    narrow = [i for i in range(len(ts)) if ts[i].dtype != torch.float64]
    for idx, dtype in ((wide, torch.float64), (narrow, torch.float32)):
        if idx:
            norms = torch._foreach_norm([ts[i] for i in idx], 1, dtype=dtype)
            out[torch.tensor(idx, device=out.device)] = torch.stack(norms).to(torch.float64)
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
        return _no_nan((scale * s).to(torch.float32)), None
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
    return _no_nan((scale * mu.to(torch.float64)).to(torch.float32))


def _no_nan(delta: Tensor) -> Tensor:
    """A layer whose θ holds NaN has no threshold: δ = 0 (no decay) on every path and in every report, instead of NaN
    spreading through the decay; an infinite mean keeps δ = inf (L2 decay)."""
    return torch.nan_to_num(delta, nan=0.0, posinf=float("inf"))


def advance_deltas(
    settings: Sequence[DeltaSetting | None],
    sums: Tensor | None,
    numels: Sequence[int],
    mus: Tensor,
    has_mu: Tensor | Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """δ of every layer for this step, each by its own setting, and the layers' new μ — the one place AdamHD
    computes δ.

    Args:
        settings: per layer, its param group's :func:`delta_setting` (None: no decay, δ is NaN and μ unchanged).
        sums: fp64 ``(L,)`` whole-layer ``Σ|θ|`` (entries of layers that need no statistic are ignored); None when
            no layer needs a statistic.
        numels: the true numel of each whole layer.
        mus: fp32 ``(L,)`` μ of each layer (entries where ``has_mu`` is False are ignored).
        has_mu: bool ``(L,)``, whether the layer has a μ yet.
    Returns:
        ``(deltas, new_mus, new_has_mu)``: fp32 ``(L,)`` δ, fp32 ``(L,)`` μ after this step (advanced for
        ``"ema"`` layers, unchanged elsewhere), and bool ``(L,)`` whether each layer has a μ now; all on
        ``mus``' device. A layer whose statistic is NaN (its θ holds NaN) gets δ = 0: no decay.
    """
    device = mus.device
    n = len(settings)
    by_setting: dict[DeltaSetting, list[int]] = {}
    for i, st in enumerate(settings):
        if st is not None:
            by_setting.setdefault(st, []).append(i)
    has = has_mu if isinstance(has_mu, Tensor) else torch.as_tensor(list(has_mu), dtype=torch.bool)
    has = has.to(device)
    if len(by_setting) == 1 and len(next(iter(by_setting.values()))) == n:
        (st,) = by_setting  # the usual case: one rule for every layer, whole-vector ops, no index selects
        if st.mode == "constant":
            return torch.full((n,), st.delta, dtype=torch.float32, device=device), mus, has
        all_have = not isinstance(has_mu, Tensor) and all(has_mu)  # known on the host: no mask to build
        d, new_mu = update_deltas(sums, numels, mus, [True] * n if all_have else has, mode=st.mode,
                                  scale=st.scale, beta=st.beta)
        d = d.to(device)
        if new_mu is None:
            return d, mus, has
        return d, new_mu.to(device), torch.ones(n, dtype=torch.bool, device=device)
    deltas = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    new_mus, new_has = mus.clone(), has.clone()
    for st, idx in by_setting.items():
        sel = torch.tensor(idx, dtype=torch.long, device=device)
        if st.mode == "constant":
            deltas[sel] = st.delta
            continue
        d, new_mu = update_deltas(sums[sel.to(sums.device)], [numels[i] for i in idx], mus[sel], has[sel],
                                  mode=st.mode, scale=st.scale, beta=st.beta)
        deltas[sel] = d.to(device)
        if new_mu is not None:
            new_mus[sel] = new_mu.to(device)
            new_has[sel] = True
    return deltas, new_mus, new_has


def current_delta(setting: DeltaSetting | None, mu: Tensor | float | None, last: float | None) -> float | None:
    """A layer's δ as of its latest step, for reporting: None without decay or while unknown (no step yet and
    not constant). ``"ema"`` reads δ = c·μ from the state (so it is known right after a checkpoint load);
    ``"mean_abs"`` the δ its latest step used (``last``)."""
    if setting is None:
        return None
    if setting.mode == "constant":
        return setting.delta
    if setting.mode == "ema":
        return None if mu is None else float(ema_delta(torch.as_tensor(mu, dtype=torch.float32), setting.scale))
    return last
