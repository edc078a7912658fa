"""Fused multi-tensor AdamHD step on the CPU: a C++ extension JIT-built on first use.

The source, ``cpu_adamhd.cpp``, ships next to this file and is compiled by
:func:`torch.utils.cpp_extension.load` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``) the first time :func:`load` is called; later processes reuse
the cached build. The kernel is parallelised over torch's intra-op thread pool
(``torch.set_num_threads``) and vectorised for the build machine's CPU (``-march=native``), so the
extension name carries a fingerprint of the CPU flags: a cache shared between different machines does
not hand one machine another's instructions.

One call updates a whole list of tensors (separate allocations, or contiguous views into one flat
buffer); see :func:`fused_adamhd_cpu_` for the math. :func:`layer_abs_sums_cpu` computes the per-layer statistic
``Σ|x|`` in one call, and the update can emit the same statistic for the values it stores (``abs_sums_out``), bit
for bit equal, in the same pass over the data.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["load", "available", "fused_adamhd_cpu_", "layer_abs_sums_cpu", "SUM_BLOCK", "SUM_LANES"]

# Summation order of the layer statistic Σ|x| (layer_abs_sums_cpu and fused_adamhd_cpu_'s abs_sums_out); fixed in
# cpu_adamhd.cpp (kSumBlock, kSumLanes), listed here for documentation and tests only.
SUM_BLOCK = 2048
SUM_LANES = 32

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_adamhd.cpp")
# -ffp-contract=off: no implicit FMA, so every element rounds the same way whether it lands in the vector body
# or in a scalar remainder (results independent of thread split / view offsets: ZeRO partitions stay exact).
# No -ffast-math: inf / NaN must follow IEEE. -fno-math-errno only lets sqrt vectorise.
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fopenmp-simd", "-fno-math-errno", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]
_DECAY_MODES = {"none": 0, "prox": 1, "clip": 2}

_lock = threading.Lock()
_module: Any = None
_error: str | None = None


def _cpu_fingerprint() -> str:
    """A short hash of what ``-march=native`` depends on (CPU model and flags)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def load():
    """Build (first time) and import the extension; return the module.

    Raises ``RuntimeError`` with the reason when it cannot be built (no C++ compiler, no OpenMP, ...).
    The outcome is cached: a failed build is not retried within the process.
    """
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        try:
            from torch.utils import cpp_extension

            name = f"adamhd_cpu_{_cpu_fingerprint()}"
            build_dir = cpp_extension._get_build_directory(name, verbose=False)
            if not any(f.endswith(".so") for f in os.listdir(build_dir)):
                print(f"adamhd_dist: building the fused CPU kernel (first use only, about a minute) in {build_dir}",
                      file=sys.stderr, flush=True)
            # Build with the ninja installed beside this interpreter (the pinned one) whatever PATH says: two
            # ninja versions each take the other's build log as stale and would rebuild on every alternation.
            path = os.environ.get("PATH", "")
            os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), path])
            try:
                _module = cpp_extension.load(
                    name=name,
                    sources=[_SOURCE],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    verbose=bool(os.environ.get("ADAMHD_VERBOSE_BUILD")),
                )
            finally:
                os.environ["PATH"] = path
        except Exception as exc:  # compiler missing, build error, import error, ...
            _error = f"adamhd CPU kernel could not be built: {type(exc).__name__}: {exc}"
            raise RuntimeError(_error) from exc
        return _module


def available() -> bool:
    """True when :func:`load` succeeds (the result is cached; never raises)."""
    try:
        load()
    except Exception:
        return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _check_plain(name: str, tensors: Sequence[torch.Tensor]) -> None:
    """The kernel reads raw storage: refuse, with a message, what has none it could read (a tensor subclass such as
    a DTensor, a meta or sparse tensor) instead of handing it to native code."""
    for i, t in enumerate(tensors):
        if type(t) not in _PLAIN or t.layout != torch.strided or t.device.type != "cpu":
            what = type(t).__name__ if type(t) not in _PLAIN else f"{t.layout} tensor on {t.device}"
            raise TypeError(f"{name}[{i}]: the CPU kernel takes plain strided CPU tensors, got a {what}")


def _per_tensor(name: str, values: Any, n: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif not (type(values) is list and (not values or type(values[0]) is float)):  # lists of floats pass as is
        values = [float(x) for x in values]
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per tensor), got {len(values)}")
    return values


def fused_adamhd_cpu_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step_sizes: Sequence[float] | torch.Tensor,
    bc2_sqrts: Sequence[float] | torch.Tensor,
    deltas: Sequence[float] | torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str,
    grad_scale: float | None = None,
    abs_sums_out: torch.Tensor | None = None,
) -> int:
    """One fused AdamHD step over lists of contiguous CPU tensors, in place. Returns the non-finite count.

    ``params``, ``exp_avgs``, ``exp_avg_sqs`` (updated in place) and ``grads`` are lists of equal-sized
    contiguous CPU tensors of dtype float32 or bfloat16 (dtypes may differ between the four lists, and
    between tensors; ``exp_avg`` and ``exp_avg_sq`` of one tensor must share a dtype). Math is fp32;
    stores round to nearest even. Per tensor ``i``: ``step_sizes[i] = lr / bias_correction1``,
    ``bc2_sqrts[i] = sqrt(bias_correction2)``, ``deltas[i]`` = Huber threshold (``>= 0``, may be
    ``inf``; ``deltas`` may be ``None`` when ``weight_decay == 0``). Per element, ``tau = lr * weight_decay``::

        g  = grad / grad_scale                      (when grad_scale is given)
        m2 = lerp(m, g, 1 - beta1);  v2 = beta2 * v + (1 - beta2) * g * g
        x  = p
        clip: x -= tau * clamp(x, -delta, delta)
        x -= step_size * m2 / (sqrt(v2) / bc2_sqrt + eps)
        prox: x -= tau * clamp(x / (1 + tau), -delta, delta)
        g finite: p, m, v = x, m2, v2;  otherwise p, m, v are left unchanged and the element is counted.

    ``abs_sums_out``: optional contiguous float64 CPU tensor ``(len(params),)``; receives ``Σ|p|`` of each tensor's
    values as STORED by this update (masked elements: the old value; bf16 params: the rounded bf16 value), computed
    in the same pass with the summation order of :func:`layer_abs_sums_cpu` — bitwise equal to
    ``layer_abs_sums_cpu(params)`` called right after the update.
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("params, grads, exp_avgs and exp_avg_sqs must have the same length")
    if decay not in ("prox", "clip"):
        raise ValueError(f"decay must be 'prox' or 'clip', got {decay!r}")
    mode = _DECAY_MODES[decay] if weight_decay != 0 else 0
    if abs_sums_out is not None:
        if not (isinstance(abs_sums_out, torch.Tensor) and abs_sums_out.device.type == "cpu"
                and abs_sums_out.dtype == torch.float64 and abs_sums_out.shape == (n,)
                and abs_sums_out.is_contiguous()):
            raise ValueError(f"abs_sums_out must be a contiguous float64 CPU tensor of shape ({n},)")
    if n == 0:
        return 0
    for name, ts in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        _check_plain(name, ts)
    if mode != 0 and deltas is None:
        raise ValueError("deltas is required when weight_decay != 0")
    ss = _per_tensor("step_sizes", step_sizes, n)
    bc = _per_tensor("bc2_sqrts", bc2_sqrts, n)
    ds = _per_tensor("deltas", deltas, n) if mode != 0 else []
    scale = 1.0 if grad_scale is None else float(grad_scale)
    return int(
        load().adamhd_step(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), ss, bc, ds,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), mode, scale,
            abs_sums_out,
        )
    )


def layer_abs_sums_cpu(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ|x|`` of each tensor as a float64 CPU tensor ``(len(tensors),)``, in one (multi-threaded) kernel call.

    Tensors: contiguous CPU float32 / bfloat16 (separate allocations or views into one buffer); empty ones give 0.
    Each ``|x|`` is exact in float64 and the summation order is fixed by the tensor's numel alone: blocks of
    :data:`SUM_BLOCK` elements from the tensor's first element; within a block, element ``i`` goes to double lane
    ``i % SUM_LANES`` and the lanes are combined by a fixed tree; the block partials are added in block order. The
    result is therefore bitwise independent of the tensor's address / offset, of the thread count, and equal to
    :func:`fused_adamhd_cpu_`'s ``abs_sums_out`` for the same stored values.
    """
    ts = [t.detach() for t in tensors]
    if not ts:
        return torch.zeros(0, dtype=torch.float64)
    _check_plain("tensors", ts)
    return load().abs_sums(ts)
