"""The functional core of AdamHD: one update rule, three implementations with one signature.

``adamhd(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, *, ...)`` updates every tensor in place:

- ``foreach=False, fused=False``: a plain loop over tensors, written for reading; the oracle for the other two;
- ``foreach=True``: ``torch._foreach_*`` ops over the whole list;
- ``fused=True``: one kernel call for the whole list (Triton on CUDA, a compiled C++ kernel on CPU).

A tensor in the lists may be a whole parameter or a view of one layer inside a flat buffer (a ZeRO partition):
every path treats each list entry as one layer with its own δ. ``steps`` are the step numbers ``t`` of this
update (already incremented by the caller); the per-layer thresholds ``deltas`` are computed by the caller from
the layer statistic (see :mod:`adamhd_dist.optim.stats`), because on a sharded model that statistic needs a collective.

Per element, in fp32 (fp64 for fp64 parameters; ``τ = lr·weight_decay``)::

    m ← m + (1−β1)(g − m);   v ← β2·v + (1−β2)·g²
    d = sqrt(v)/sqrt(1−β2^t) + ε;   a = lr/(1−β1^t)
    clip:  θ ← θ − τ·clip(θ, −δ, δ);           θ ← θ − a·m/d
    prox:  θ ← θ − a·m/d;                      θ ← θ − τ·clip(θ/(1+τ), −δ, δ)

An element whose gradient is not finite is left unchanged (θ, m and v), and counted: the function returns the
number of such elements (a 0-d int64 tensor on the tensors' device) so the caller can report it.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from typing import Sequence

import torch
from torch import Tensor

from .huber import huber_clip_, huber_clip_foreach_, huber_prox_, huber_prox_foreach_

__all__ = ["adamhd", "bias_corrections", "default_path", "check_path", "DECAYS"]

DECAYS = ("prox", "clip")

# Which kernel the fused path uses for CPU tensors: "cpp" (the compiled C++ kernel), or "triton" to run the GPU
# kernel through Triton's interpreter (TRITON_INTERPRET=1) — how the tests exercise the GPU path without a GPU.
FUSED_CPU_BACKEND = os.environ.get("ADAMHD_FUSED_CPU_BACKEND", "cpp")


def bias_corrections(steps: Sequence[float], lr: float, beta1: float, beta2: float, bias_correction: bool):
    """Per-tensor ``(step_size, sqrt(bias_correction2))`` as Python floats (fp64 host math, as torch does)."""
    if not bias_correction:
        return [lr] * len(steps), [1.0] * len(steps)
    steps = steps.tolist() if isinstance(steps, Tensor) else [float(t) for t in steps]
    distinct = set(steps)  # usually one step number for every tensor: compute each value once
    ss = {t: lr / (1.0 - beta1 ** float(t)) for t in distinct}
    bc = {t: math.sqrt(1.0 - beta2 ** float(t)) for t in distinct}
    if len(distinct) == 1:
        (t,) = distinct
        return [ss[t]] * len(steps), [bc[t]] * len(steps)
    return [ss[t] for t in steps], [bc[t] for t in steps]


def _fused_available(device: torch.device) -> bool:
    try:
        if device.type == "cuda":
            from .kernels import triton_adamhd

            return triton_adamhd.available()
        if device.type == "cpu":
            from .kernels import cpu

            return cpu.available()
    except ImportError:
        return False
    return False


def default_path(params: Sequence[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Choose ``"fused"``, ``"foreach"`` or ``"loop"`` as torch.optim does: explicit choices win; otherwise the
    fastest path that works for the tensors' device (fused where its kernel is available, else foreach)."""
    if foreach and fused:
        raise ValueError("foreach=True and fused=True are mutually exclusive: choose one (or leave both None)")
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is False and fused is None:
        return "loop"
    if fused is False and foreach is None:
        return "foreach"
    if fused is False and foreach is False:
        return "loop"
    if not params:
        return "foreach"
    if not all(torch.is_floating_point(p) for p in params):  # complex: as torch.optim, never fused by default
        return "foreach"
    devices = {p.device for p in params}
    if len(devices) == 1:
        device = next(iter(devices))
        if _fused_available(device):
            return "fused"
        if device.type == "cpu":
            _warn_cpu_fallback_once()
    return "foreach"


def capturable_devices() -> list[str]:
    """The device types a capturable step runs on outside the fused path (torch.optim's list)."""
    from torch.optim.optimizer import _get_capturable_supported_devices

    return _get_capturable_supported_devices(supports_xla=False)


FUSED_DEVICES = ("cpu", "cuda")


def check_path(path: str, params: Sequence[Tensor], steps=(), *, capturable: bool = False,
               differentiable: bool = False) -> None:
    """Raise, in torch.optim's words, what the chosen path cannot do for these tensors, before anything is written
    (a step that raises changes nothing)."""
    if path == "fused":
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        for p in params:
            check_fused_param(p)
        _check_fused_kernel(params)
        return
    if path == "foreach" and differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if capturable:
        devices = capturable_devices()
        for p, s in zip(params, steps):
            if not (isinstance(s, Tensor) and p.device.type == s.device.type and p.device.type in devices):
                raise AssertionError(f"If capturable=True, params and state_steps must be on supported devices: "
                                     f"{devices}.")


def check_fused_param(p: Tensor) -> None:
    """torch.optim's check of a parameter for ``fused=True`` (a supported device, a floating-point dtype)."""
    if not (p.device.type in FUSED_DEVICES and torch.is_floating_point(p)):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                           f"supported devices: {list(FUSED_DEVICES)} but {p.dtype} and {p.device.type}")


def _check_fused_kernel(params: Sequence[Tensor]) -> None:
    """The kernel a fused step will call is there (a missing compiler or Triton is found before the step writes
    anything, also in an earlier param group). The result of the first load is cached by the kernel modules."""
    if not params:
        return
    device = params[0].device
    triton = device.type == "cuda" or FUSED_CPU_BACKEND == "triton"
    kernel_dtypes = _TRITON_DTYPES if triton else _CPU_KERNEL_DTYPES
    if not any(p.dtype in kernel_dtypes for p in params):
        return  # every tensor takes the foreach math inside fused=True
    if triton:
        from .kernels import triton_adamhd

        if not triton_adamhd.available():
            raise RuntimeError("fused=True on CUDA needs triton (pip install 'adamhd_dist[triton]')")
    elif device.type == "cpu":
        from .kernels import cpu

        try:
            cpu.load()
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the choice to make
            raise RuntimeError(f"fused=True: the CPU kernel is unavailable ({exc}); install a C++ compiler (and "
                               f"ninja), or use foreach=True") from exc


_warned_fallback = False


def _warn_cpu_fallback_once():
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    reason = "unknown"
    try:
        from .kernels import cpu

        cpu.load()
    except Exception as exc:  # noqa: BLE001 - the reason is what we report
        reason = str(exc)
    warnings.warn(f"AdamHD: the fused CPU kernel is unavailable ({reason}); using the slower foreach path. "
                  f"Install a C++ compiler (and ninja) to enable it.", RuntimeWarning, stacklevel=4)


def adamhd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[float],
    deltas: Tensor | Sequence[float] | None,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | float | None = None,
    abs_sums_out: Tensor | None = None,
    max_exp_avg_sqs: list[Tensor] | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str,
    bias_correction: bool,
) -> Tensor:
    """Functional AdamHD update (see the module docstring). Returns the count of skipped non-finite elements.

    ``abs_sums_out``, when given (fp64, one entry per tensor), receives ``Σ|θ|`` of each tensor AFTER the update —
    the next step's layer statistic. The fused kernels get it from the same pass over the data: the C++ kernel
    bitwise equal to :func:`adamhd_dist.optim.stats.layer_abs_sums` of the updated CPU tensors; the Triton kernel as
    per-chunk fp32 sums combined with atomic adds (equal to a separate read up to the order of the additions).

    AdamW's options have AdamW's meaning on every path: ``amsgrad`` (``max_exp_avg_sqs`` keeps the running maximum
    of ``v`` and the denominator uses it; the fused kernels keep it in the same pass), ``maximize`` (the gradient's
    sign is flipped; the fused kernels divide by ``-grad_scale``, which is exact), ``capturable`` (``steps`` are 0-d tensors on the parameters' device and the bias corrections are
    computed there without a host read; on the CPU only the fused path accepts it, as torch's AdamW), and
    ``differentiable`` (the loop path only, autograd recording the update, without masking non-finite elements)."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and steps must have the same length")
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if weight_decay != 0.0 and deltas is None:
        raise ValueError("deltas are required when weight_decay != 0")
    if deltas is not None and len(deltas) != n:
        raise ValueError(f"deltas must have one entry per tensor ({n}), got {len(deltas)}")
    if abs_sums_out is not None and abs_sums_out.shape != (n,):
        raise ValueError(f"abs_sums_out must have shape ({n},), got {tuple(abs_sums_out.shape)}")
    if amsgrad and (max_exp_avg_sqs is None or len(max_exp_avg_sqs) != n):
        raise ValueError("amsgrad=True needs max_exp_avg_sqs, one per tensor")
    device = params[0].device if n else torch.device("cpu")
    if n == 0:
        return torch.zeros((), dtype=torch.int64, device=device)
    path = "loop" if differentiable and not foreach and not fused else default_path(params, foreach, fused)
    check_path(path, params, steps, capturable=capturable, differentiable=differentiable)
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay,
              bias_correction=bias_correction, grad_scale=grad_scale, maximize=maximize,
              max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else None, capturable=capturable)
    if path == "loop":
        kw["differentiable"] = differentiable
    if path == "fused":
        return _fused_adamhd(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, abs_sums_out=abs_sums_out, **kw)
    impl = _single_tensor_adamhd if path == "loop" else _multi_tensor_adamhd
    skipped = impl(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, **kw)
    if abs_sums_out is not None:
        from .stats import layer_abs_sums

        abs_sums_out.copy_(layer_abs_sums(params))
    return skipped


def _delta_list(deltas, n) -> list[float]:
    if deltas is None:
        return [math.inf] * n
    if isinstance(deltas, Tensor):
        return deltas.detach().to("cpu", torch.float64).tolist()
    return [float(d) for d in deltas]


def _grad_scale_value(grad_scale):
    if grad_scale is None:
        return None
    return float(grad_scale.item()) if isinstance(grad_scale, Tensor) else float(grad_scale)


def _tensor_bias_corrections(steps, lr, beta1, beta2, bias_correction):
    """Per-tensor ``(step_size, sqrt(bias_correction2))`` as 0-d tensors on each step's device (capturable: no
    host read), in the step counter's dtype as torch.optim's capturable paths compute them."""
    if not bias_correction:
        return [torch.as_tensor(lr, dtype=s.dtype, device=s.device) for s in steps], [None] * len(steps)
    t = torch.stack([s.detach() for s in steps])
    ss = lr / (1.0 - torch.pow(beta1, t))
    bc = torch.sqrt(1.0 - torch.pow(beta2, t))
    return list(ss.unbind(0)), list(bc.unbind(0))


def _step_corrections(steps, lr, beta1, beta2, bias_correction, capturable):
    """``(step_size, sqrt(bias_correction2))`` per tensor: as device tensors when capturable, else host floats."""
    if capturable:
        return _tensor_bias_corrections(steps, lr, beta1, beta2, bias_correction)
    return bias_corrections(steps, lr, beta1, beta2, bias_correction)


def _single_tensor_adamhd(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, *, lr, beta1, beta2, eps,
                          weight_decay, decay, bias_correction, grad_scale, max_exp_avg_sqs=None, maximize=False,
                          capturable=False, differentiable=False):
    """The reference: one tensor at a time, every intermediate in fp32 (fp64 for an fp64 parameter), easy to read."""
    if differentiable:
        return _differentiable_adamhd(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, lr=lr, beta1=beta1,
                                      beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay,
                                      bias_correction=bias_correction, grad_scale=grad_scale,
                                      max_exp_avg_sqs=max_exp_avg_sqs, maximize=maximize, capturable=capturable)
    step_sizes, bc2_sqrts = _step_corrections(steps, lr, beta1, beta2, bias_correction, capturable)
    delta_list = _delta_list(deltas, len(params))
    scale = _grad_scale_value(grad_scale)
    tau = lr * weight_decay
    skipped = 0
    for i, param in enumerate(params):
        ct = _compute_dtype(param)
        g = grads[i].to(ct, copy=True)
        if maximize:
            g.neg_()
        if scale is not None:
            g.div_(scale)
        x = param.detach().to(ct, copy=True)
        m = exp_avgs[i].to(ct, copy=True)
        v = exp_avg_sqs[i].to(ct, copy=True)
        delta = delta_list[i]

        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        vmax = None
        if max_exp_avg_sqs is not None:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(ct), v)
        denom = (vmax if vmax is not None else v).sqrt()
        if bc2_sqrts[i] is not None:
            denom = denom / bc2_sqrts[i]
        denom.add_(eps)
        if decay == "clip":
            huber_clip_(x, tau, delta)
        if capturable:
            x.sub_((m / denom).mul_(step_sizes[i]))
        else:
            x.addcdiv_(m, denom, value=-step_sizes[i])
        if decay == "prox":
            huber_prox_(x, tau, delta)

        finite = torch.isfinite(g)
        if not bool(finite.all()):
            skipped += int((~finite).sum())
            x = torch.where(finite, x, param.detach().to(ct))
            m = torch.where(finite, m, exp_avgs[i].to(ct))
            v = torch.where(finite, v, exp_avg_sqs[i].to(ct))
            if vmax is not None:
                vmax = torch.where(finite, vmax, max_exp_avg_sqs[i].to(ct))
        param.detach().copy_(x)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if vmax is not None:
            max_exp_avg_sqs[i].copy_(vmax)
    return torch.tensor(skipped, dtype=torch.int64, device=params[0].device)


def _differentiable_adamhd(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, *, lr, beta1, beta2, eps,
                           weight_decay, decay, bias_correction, grad_scale, max_exp_avg_sqs, maximize, capturable):
    """The loop as autograd can record it (``differentiable=True``, as torch.optim.AdamW's): in place on the
    parameter and the state in their own dtype, no copies, no masking. δ is a constant of the update (the layer
    statistic is read without gradient)."""
    step_sizes, bc2_sqrts = _step_corrections(steps, lr, beta1, beta2, bias_correction, capturable)
    delta_list = _delta_list(deltas, len(params))
    scale = _grad_scale_value(grad_scale)
    tau = lr * weight_decay
    for i, param in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        if scale is not None:
            g = g / scale
        m, v = exp_avgs[i], exp_avg_sqs[i]
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if max_exp_avg_sqs is not None:
            vmax = max_exp_avg_sqs[i]
            vmax.copy_(torch.maximum(vmax, v))
            denom = vmax.sqrt()
        else:
            denom = v.sqrt()
        if bc2_sqrts[i] is not None:
            denom = denom / bc2_sqrts[i]
        denom = denom + eps
        delta = delta_list[i]
        if decay == "clip" and tau != 0.0:
            param.sub_(torch.clamp(param.clone(), -delta, delta), alpha=tau)  # clamp keeps its input for backward
        param.sub_(m / denom * step_sizes[i])
        if decay == "prox" and tau != 0.0:
            param.sub_(torch.clamp(param / (1.0 + tau), -delta, delta), alpha=tau)
    return torch.zeros((), dtype=torch.int64, device=params[0].device)


def _compute_dtype(p: Tensor) -> torch.dtype:
    """The dtype the update is computed in for parameter ``p``: fp64 for fp64 parameters, else fp32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _multi_tensor_adamhd(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, *, lr, beta1, beta2, eps,
                         weight_decay, decay, bias_correction, grad_scale, max_exp_avg_sqs=None, maximize=False,
                         capturable=False):
    """``torch._foreach_*`` over the whole list (one pass per compute dtype: fp64 parameters are updated in fp64,
    the rest in fp32). Tensors whose gradient has a non-finite element take the reference path (which masks those
    elements); this costs one extra read of the gradients."""
    kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay,
              bias_correction=bias_correction, grad_scale=grad_scale, maximize=maximize, capturable=capturable)
    wide = [i for i, p in enumerate(params) if p.dtype == torch.float64]
    if wide and len(wide) < len(params):
        narrow = [i for i in range(len(params)) if params[i].dtype != torch.float64]
        skipped = None
        for idx in (narrow, wide):
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            d = None if deltas is None else pick(_delta_list(deltas, len(params)))
            n_bad = _multi_tensor_adamhd(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                                         pick(list(steps)), d, max_exp_avg_sqs=None if max_exp_avg_sqs is None
                                         else pick(max_exp_avg_sqs), **kw)
            skipped = n_bad if skipped is None else skipped + n_bad
        return skipped
    n = len(params)
    delta_list = _delta_list(deltas, n)
    tau = lr * weight_decay
    device = params[0].device

    g_norms = torch._foreach_norm([g.detach() for g in grads], float("inf"))
    finite = torch.isfinite(torch.stack([t.float() for t in g_norms])).tolist()
    bad = [i for i in range(n) if not finite[i]]
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    if bad:
        pick = lambda xs: [xs[i] for i in bad]  # noqa: E731
        skipped = skipped + _single_tensor_adamhd(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(list(steps)), pick(delta_list),
            max_exp_avg_sqs=None if max_exp_avg_sqs is None else pick(max_exp_avg_sqs), **kw).to(device)
    good = [i for i in range(n) if finite[i]]
    if not good:
        return skipped
    step_sizes, bc2_sqrts = _step_corrections([steps[i] for i in good], lr, beta1, beta2, bias_correction,
                                              capturable)

    # Work in the compute dtype (fp32, or fp64 for fp64 parameters); storage of another dtype gets copies that are
    # written back at the end.
    ct = _compute_dtype(params[good[0]])

    def work(ts):
        return [t.detach() if t.dtype == ct else t.detach().to(ct) for t in ts]

    ps = [params[i] for i in good]
    ms_store = [exp_avgs[i] for i in good]
    vs_store = [exp_avg_sqs[i] for i in good]
    vmax_store = None if max_exp_avg_sqs is None else [max_exp_avg_sqs[i] for i in good]
    x, m, v = work(ps), work(ms_store), work(vs_store)
    g = [grads[i].detach().to(ct) for i in good]
    if maximize:
        g = torch._foreach_neg(g)
    if grad_scale is not None:
        g = torch._foreach_div(g, grad_scale if not isinstance(grad_scale, Tensor) else grad_scale.item())
    ds = [delta_list[i] for i in good]

    torch._foreach_lerp_(m, g, 1.0 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
    vmax = None
    if vmax_store is not None:
        vmax = work(vmax_store)
        torch._foreach_maximum_(vmax, v)
    denom = torch._foreach_sqrt(vmax if vmax is not None else v)
    if capturable:
        if bias_correction:
            torch._foreach_div_(denom, bc2_sqrts)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, torch._foreach_neg(step_sizes))
    else:
        torch._foreach_div_(denom, bc2_sqrts)
        torch._foreach_add_(denom, eps)
    if decay == "clip":
        huber_clip_foreach_(x, tau, ds)
    if capturable:
        torch._foreach_addcdiv_(x, m, denom)
    else:
        torch._foreach_addcdiv_(x, m, denom, [-s for s in step_sizes])
    if decay == "prox":
        huber_prox_foreach_(x, tau, ds)

    stores = [(ps, x), (ms_store, m), (vs_store, v)] + ([(vmax_store, vmax)] if vmax is not None else [])
    for store, computed in stores:
        pairs = [(s, w) for s, w in zip(store, computed) if s is not w and s.dtype != ct]
        if pairs:
            torch._foreach_copy_([s.detach() for s, _ in pairs], [w for _, w in pairs])
    return skipped


_DEVICE, _DTYPE = operator.attrgetter("device"), operator.attrgetter("dtype")
# what the fused kernels store and load (other dtypes take the foreach path inside fused=True)
_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _group_by_kind(params, grads, exp_avgs, exp_avg_sqs):
    """{(device, dtypes of p, g, m, v): indices}; None when every tensor is of one kind (the usual case)."""
    if all(len(set(map(_DTYPE, ts))) == 1 for ts in (params, grads, exp_avgs, exp_avg_sqs)) \
            and len(set(map(_DEVICE, params))) == 1:
        return None
    keys = list(zip(map(_DEVICE, params), map(_DTYPE, params), map(_DTYPE, grads), map(_DTYPE, exp_avgs),
                    map(_DTYPE, exp_avg_sqs)))
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups


def _fused_adamhd(params, grads, exp_avgs, exp_avg_sqs, steps, deltas, *, lr, beta1, beta2, eps,
                  weight_decay, decay, bias_correction, grad_scale, abs_sums_out=None, max_exp_avg_sqs=None,
                  maximize=False, capturable=False):
    """One kernel call per (device, dtypes) bucket — one in the usual case — whatever the number of layers.
    ``maximize``: the kernels divide the gradient by ``-grad_scale`` (a sign flip, exact). ``amsgrad``: the kernels
    keep the running maximum (``max_exp_avg_sqs``, stored like ``v``) in the same pass."""
    if maximize:
        grad_scale = -1.0 if grad_scale is None else -grad_scale
    device = params[0].device
    device_steps = capturable and device.type != "cpu"  # the bias corrections stay on the device
    if device_steps:
        step_sizes, bc2_sqrts = _tensor_bias_corrections(steps, lr, beta1, beta2, bias_correction)
        if not bias_correction:
            bc2_sqrts = [torch.ones((), dtype=s.dtype, device=s.device) for s in step_sizes]
    else:
        step_sizes, bc2_sqrts = bias_corrections([float(t) for t in steps] if capturable else steps, lr, beta1,
                                                 beta2, bias_correction)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    vmax = max_exp_avg_sqs
    groups = _group_by_kind(params, grads, exp_avgs, exp_avg_sqs)
    if groups is None:  # one kind: no per-group sub-lists
        groups = {(device, params[0].dtype, grads[0].dtype, exp_avgs[0].dtype, exp_avg_sqs[0].dtype):
                  range(len(params))}
    for (dev, *dtypes), idx in groups.items():
        whole = len(idx) == len(params)
        pick = (lambda xs: list(xs)) if whole else (lambda xs: [xs[i] for i in idx])  # noqa: E731
        # The kernels write through raw pointers (no autograd), so no detach() per tensor is needed.
        p, g, m, v = (pick(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs))
        vm = None if vmax is None else pick(vmax)
        triton = dev.type == "cuda" or FUSED_CPU_BACKEND == "triton"
        supported = _TRITON_DTYPES if triton else _CPU_KERNEL_DTYPES
        # the kernel stores the running maximum like v (AdamHD creates and loads both in the param's dtype)
        same_vm = vm is None or all(a.dtype == b.dtype for a, b in zip(vm, v))
        if not (same_vm and all(dt in supported for dt in dtypes)):
            # dtypes the kernel does not take (fp64; fp16 on the CPU): the foreach path, same math
            d = None if deltas is None else pick(_delta_list(deltas, len(params)))
            skipped = skipped + _multi_tensor_adamhd(
                p, g, m, v, pick(list(steps)), d, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, decay=decay, bias_correction=bias_correction,
                grad_scale=grad_scale, max_exp_avg_sqs=vm, capturable=device_steps).to(device)
            if abs_sums_out is not None:
                from .stats import layer_abs_sums

                sums = layer_abs_sums(p).to(abs_sums_out)
                if whole:
                    abs_sums_out.copy_(sums)
                else:
                    abs_sums_out[torch.tensor(idx, device=abs_sums_out.device)] = sums
            continue
        if triton:
            from .kernels import triton_adamhd

            if not triton_adamhd.available():
                raise RuntimeError("fused=True on CUDA needs triton (pip install 'adamhd_dist[triton]')")

            def to_dev(xs):
                if device_steps:
                    return torch.stack(xs).to(dev, torch.float32)
                host = torch.tensor(xs, dtype=torch.float32)
                if dev.type == "cuda":
                    host = host.pin_memory()
                return host.to(dev, non_blocking=True)

            if isinstance(deltas, Tensor):
                d = deltas.detach() if len(idx) == len(params) else deltas.detach()[
                    torch.tensor(idx, device=deltas.device)]
                d = d.to(dev, torch.float32).contiguous()
            elif deltas is not None:
                d = to_dev([float(deltas[i]) for i in idx])
            else:
                d = None
            counter = torch.zeros(1, dtype=torch.int64, device=dev)
            gs = grad_scale if (grad_scale is None or isinstance(grad_scale, Tensor)) else torch.tensor(
                float(grad_scale), device=dev)
            # the kernel emits next step's Σ|θ| as it stores θ (no second pass over the parameters)
            sums = None if abs_sums_out is None else torch.empty(len(idx), dtype=torch.float32, device=dev)
            triton_adamhd.fused_adamhd_triton_(
                p, g, m, v, step_sizes=to_dev(pick(step_sizes)), bc2_sqrts=to_dev(pick(bc2_sqrts)), deltas=d,
                lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay,
                grad_scale=gs, nonfinite=counter, abs_sums=sums, max_exp_avg_sqs=vm)
            skipped = skipped + counter[0].to(device)
            if sums is not None:
                if len(idx) == len(params):
                    abs_sums_out.copy_(sums)
                else:
                    abs_sums_out[torch.tensor(idx, device=abs_sums_out.device)] = sums.to(abs_sums_out)
        elif dev.type == "cpu":
            from .kernels import cpu

            d = None if deltas is None else pick(_delta_list(deltas, len(params)))
            direct = whole and abs_sums_out is not None and abs_sums_out.device.type == "cpu" \
                and abs_sums_out.dtype == torch.float64 and abs_sums_out.is_contiguous()
            sums = None if abs_sums_out is None else (
                abs_sums_out if direct else torch.empty(len(idx), dtype=torch.float64))
            n_bad = cpu.fused_adamhd_cpu_(
                p, g, m, v, step_sizes=pick(step_sizes), bc2_sqrts=pick(bc2_sqrts), deltas=d,
                lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay,
                grad_scale=_grad_scale_value(grad_scale), abs_sums_out=sums, max_exp_avg_sqs=vm)
            skipped = skipped + int(n_bad)
            if sums is not None and not direct:
                abs_sums_out[torch.tensor(idx, device=abs_sums_out.device)] = sums.to(abs_sums_out)
        else:
            raise RuntimeError(f"fused=True is not supported on device {dev}: use foreach=True")
    return skipped
