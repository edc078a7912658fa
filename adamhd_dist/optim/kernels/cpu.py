"""Fused multi-tensor AdamHD step on the CPU: a C++ extension JIT-built on first use.

The source, ``cpu_adamhd.cpp``, ships next to this file and is compiled by
:func:`torch.utils.cpp_extension.load` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``) the first time :func:`load` is called; later processes reuse
the cached build. The kernel is parallelised over torch's intra-op thread pool (``torch.set_num_threads``).

Instruction set: the environment variable ``ADAMHD_CPU_ISA`` chooses what the kernel is built for —

- ``avx512``: ``-march=x86-64-v4`` (AVX-512 F/BW/CD/DQ/VL), the fp32 update in 512-bit intrinsics;
- ``avx2``: ``-march=x86-64-v3`` (AVX2, FMA, ...), the fp32 update in 256-bit intrinsics;
- ``native``: ``-march=native`` on x86 (the build machine's own ISA and tuning; ``-mcpu=native`` on ARM and POWER);
- ``generic``: no target flags and no intrinsics, portable C++ that the compiler vectorises for the baseline of the
  architecture (SSE2 on x86-64, NEON on AArch64);
- unset: on x86, ``avx512`` where the CPU has it, else ``avx2`` where it has that, else ``generic``; on other
  machines ``generic``.

Every build computes the same bits (see ``cpu_adamhd.cpp``); the ISA only changes the speed. The ISA is part of the
extension's name (the build cache key), so builds for different ISAs coexist and can be loaded in one process
(``load(isa)``). An ISA this CPU cannot execute is refused with a message rather than built (it would die with
SIGILL); :func:`runnable_isas` lists what the machine can run.

One call updates a whole list of tensors (separate allocations, or contiguous views into one flat
buffer); see :func:`fused_adamhd_cpu_` for the math. :func:`layer_abs_sums_cpu` computes the per-layer statistic
``Σ|x|`` in one call, and the update can emit the same statistic for the values it stores (``abs_sums_out``), bit
for bit equal, in the same pass over the data.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import threading
from collections.abc import Sequence, Set
from typing import Any

import torch

from ... import buildlock

__all__ = ["load", "available", "fused_adamhd_cpu_", "layer_abs_sums_cpu", "SUM_BLOCK", "SUM_SUB", "SUM_LANES",
           "SUM_REL_ERROR", "ISA_ENV", "ISAS", "selected_isa", "default_isa", "isa_flags", "cpu_flags",
           "missing_cpu_features", "runnable_isas"]

# Summation order of the layer statistic Σ|x| (layer_abs_sums_cpu and fused_adamhd_cpu_'s abs_sums_out); fixed in
# cpu_adamhd.cpp (kSumBlock, kSumSub, kSumLanes), listed here for documentation and tests only.
SUM_BLOCK = 2048
SUM_SUB = 256
SUM_LANES = 32
# Relative error bound of that sum against the exact Σ|x| (below 2^34 elements, plus numel * 2^-146 absolute; see
# layer_abs_sums_cpu).
SUM_REL_ERROR = 4.2e-7

ISA_ENV = "ADAMHD_CPU_ISA"
ISAS = ("generic", "avx2", "avx512", "native")

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_adamhd.cpp")
# -ffp-contract=off: no FMA the source does not write, so every element rounds the same way whether it lands in a
# vector body, a scalar remainder or the intrinsics path (results independent of the thread split / view offsets:
# ZeRO partitions stay exact; and of the ISA). No -ffast-math: inf / NaN must follow IEEE. -fno-math-errno only lets
# sqrt and fma vectorise.
_CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp-simd", "-fno-math-errno", "-DNDEBUG"]
_DECAY_MODES = {"none": 0, "prox": 1, "clip": 2}
_X86 = ("x86_64", "amd64", "i386", "i686")
# /proc/cpuinfo flags each x86 level needs (the x86-64 psABI levels x86-64-v3 and x86-64-v4; lzcnt shows as abm).
_X86_FEATURES = {
    "avx2": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "avx512": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
               "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}

_lock = threading.Lock()
_modules: dict[str, Any] = {}
_errors: dict[str, str] = {}


def _machine(machine: str | None = None) -> str:
    return (machine if machine is not None else platform.machine()).lower()


@functools.lru_cache(maxsize=1)
def _read_cpu_flags() -> frozenset[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86: ``flags``, ARM: ``Features``), read once; None where
    unreadable."""
    return _read_cpu_flags()


def missing_cpu_features(isa: str, flags: Set[str] | None = None, machine: str | None = None) -> list[str]:
    """The features ``isa`` needs that this CPU (or the given ``flags``) lacks: empty when it can run the build.
    ``generic`` and ``native`` need nothing beyond the machine itself; unknown flags (no /proc/cpuinfo) count as
    present, and the compiler or the first run is left to tell."""
    if isa not in _X86_FEATURES:
        return []
    if _machine(machine) not in _X86:
        return [f"an x86 CPU (this is {_machine(machine)})"]
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return []
    return [f for f in _X86_FEATURES[isa] if f not in flags]


def default_isa(machine: str | None = None, flags: Set[str] | None = None) -> str:
    """The ISA used when ``ADAMHD_CPU_ISA`` is unset: on x86 the widest of avx512 / avx2 this CPU runs (``native``
    where the CPU flags cannot be read), else ``generic``; ``generic`` on other machines."""
    if _machine(machine) not in _X86:
        return "generic"
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "native"
    for isa in ("avx512", "avx2"):
        if not missing_cpu_features(isa, flags, machine):
            return isa
    return "generic"


def _check_isa(isa: str) -> str:
    if isa not in ISAS:
        raise ValueError(f"{ISA_ENV}={isa!r}: expected one of {', '.join(ISAS)} (or unset: {default_isa()} here)")
    return isa


@functools.lru_cache(maxsize=1)
def _default_isa_here() -> str:
    return default_isa()


def selected_isa() -> str:
    """The ISA chosen by ``ADAMHD_CPU_ISA`` (validated), or :func:`default_isa` when it is unset or empty."""
    value = os.environ.get(ISA_ENV, "").strip().lower()
    return _check_isa(value) if value else _default_isa_here()


def isa_flags(isa: str, machine: str | None = None) -> list[str]:
    """Compiler flags selecting ``isa`` on ``machine`` (default: this one). ValueError for an unknown ISA, or an x86
    ISA on another architecture."""
    _check_isa(isa)
    m = _machine(machine)
    if isa == "generic":
        return ["-DADAMHD_PORTABLE"]
    if m in _X86:
        return {"avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4"], "native": ["-march=native"]}[isa]
    if isa == "native":
        if m in ("aarch64", "arm64") or m.startswith(("ppc", "powerpc")):
            return ["-mcpu=native"]
        return ["-march=native"]
    raise ValueError(f"{ISA_ENV}={isa}: an x86 instruction set, and this machine is {m}; use generic or native")


def runnable_isas(machine: str | None = None, flags: Set[str] | None = None) -> list[str]:
    """The ISAs this machine can build for and execute, ``generic`` first."""
    m = _machine(machine)
    out = ["generic"]
    if m in _X86:
        out += [i for i in ("avx2", "avx512") if not missing_cpu_features(i, flags, machine)]
    return out + ["native"]


def _ext_name(isa: str) -> str:
    """The extension's name (its build cache key): the ISA, and for ``native`` a hash of the CPU model and flags, so a
    cache shared between machines does not hand one machine another's instructions."""
    if isa != "native":
        return f"adamhd_cpu_{isa}_{_machine().replace('-', '_')}"
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
    return f"adamhd_cpu_native_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def load(isa: str | None = None):
    """Build (first time) and import the extension for ``isa`` (default: :func:`selected_isa`); return the module.

    Raises ``ValueError`` for an unknown ISA or one this CPU cannot execute (naming what it lacks), ``RuntimeError``
    with the reason when it cannot be built (no C++ compiler, ...). The outcome is cached per ISA: a failed build is
    not retried within the process. A build lock left by a killed build is removed, one that cannot be judged raises
    :class:`adamhd_dist.buildlock.BuildLockError` naming it and how to clear it (not cached).
    """
    isa = selected_isa() if isa is None else _check_isa(isa)
    mod = _modules.get(isa)
    if mod is not None:
        return mod
    flags = isa_flags(isa)
    missing = missing_cpu_features(isa)
    if missing:
        raise ValueError(f"{ISA_ENV}={isa}: this CPU cannot execute it (it lacks {', '.join(missing)}); "
                         f"choose one of {', '.join(runnable_isas())}")
    with _lock:
        if isa in _modules:
            return _modules[isa]
        if isa in _errors:
            raise RuntimeError(_errors[isa])
        try:
            from torch.utils import cpp_extension

            name = _ext_name(isa)
            build_dir = cpp_extension._get_build_directory(name, verbose=False)
            if not any(f.endswith(".so") for f in os.listdir(build_dir)):
                print(f"adamhd_dist: building the fused CPU kernel for {isa} (first use only, about a minute) "
                      f"in {build_dir}", file=sys.stderr, flush=True)
            # OpenMP: Apple's clang has no -fopenmp; there torch's parallel_for runs the kernel on one thread.
            omp = [] if sys.platform == "darwin" else ["-fopenmp"]
            # Build with the ninja installed beside this interpreter (the pinned one) whatever PATH says: two
            # ninja versions each take the other's build log as stale and would rebuild on every alternation.
            path = os.environ.get("PATH", "")
            os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), path])
            try:
                # torch takes its lock file on every load, also when nothing is rebuilt; building() records this
                # process as its owner, so a lock left by a killed load is told from a live one
                with buildlock.building(build_dir):
                    _modules[isa] = cpp_extension.load(
                        name=name,
                        sources=[_SOURCE],
                        extra_cflags=_CFLAGS + omp + flags,
                        extra_ldflags=omp,
                        verbose=bool(os.environ.get("ADAMHD_VERBOSE_BUILD")),
                    )
            finally:
                os.environ["PATH"] = path
        except buildlock.BuildLockError:
            raise  # a lock to clear, not a missing kernel: not cached, a later call retries
        except Exception as exc:  # compiler missing, build error, import error, ...
            _errors[isa] = f"adamhd CPU kernel ({isa}) could not be built: {type(exc).__name__}: {exc}"
            raise RuntimeError(_errors[isa]) from exc
        return _modules[isa]


def available(isa: str | None = None) -> bool:
    """True when :func:`load` succeeds (the result is cached). A bad ``ADAMHD_CPU_ISA`` (unknown, or not executable
    on this CPU) is a setting to fix, not a missing kernel: its ValueError propagates."""
    try:
        load(isa)
    except ValueError:
        raise
    except Exception:
        return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_TYPES = frozenset(_PLAIN)


def _check_plain(name: str, tensors: Sequence[torch.Tensor]) -> None:
    """The kernel reads raw storage: refuse, with a message, a tensor subclass (a DTensor, a fake or functional
    tensor), whose storage is not its data, instead of handing it to native code (which checks device, layout,
    dtype and sizes itself)."""
    if set(map(type, tensors)) <= _PLAIN_TYPES:  # on every step's path: type identity only, in C
        return
    i, t = next((i, t) for i, t in enumerate(tensors) if type(t) not in _PLAIN)
    raise TypeError(f"{name}[{i}]: the CPU kernel takes plain CPU tensors, got a {type(t).__name__}")


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
    max_exp_avg_sqs: Sequence[torch.Tensor] | None = None,
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

    ``max_exp_avg_sqs`` (amsgrad, as torch's AdamW): one tensor per param, of the size and dtype of its
    ``exp_avg_sq``, updated in place to ``vm2 = max(vm, v2)``, which replaces ``v2`` in the denominator. These calls
    take the portable code (no intrinsics); the bits are those of the same formulas.

    Evaluated in fp32 with fused multiply-adds and with the per-tensor constants folded (``step_size * bc2_sqrt``,
    ``eps * bc2_sqrt``, ``tau / (1 + tau)``, ``(1 + tau) * delta``, each rounded once from double), so that an
    element costs one division and one square root; every result is within a few fp32 ulps of the formulas above
    (the exact sequence of operations is at the top of ``cpu_adamhd.cpp``). The same bits on every ISA build, for any
    thread count and any view offset.

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
    vms = [] if max_exp_avg_sqs is None else list(max_exp_avg_sqs)
    if vms and len(vms) != n:
        raise ValueError("max_exp_avg_sqs must have one tensor per param")
    for name, ts in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                     ("max_exp_avg_sqs", vms)):
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
            abs_sums_out, vms,
        )
    )


def layer_abs_sums_cpu(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ|x|`` of each tensor as a float64 CPU tensor ``(len(tensors),)``, in one (multi-threaded) kernel call.

    Tensors: contiguous CPU float32 / bfloat16 (separate allocations or views into one buffer); empty ones give 0.
    The summation order is fixed by the tensor's numel alone: blocks of :data:`SUM_BLOCK` elements from the tensor's
    first element, sub-blocks of :data:`SUM_SUB`; element ``i`` of a sub-block goes to lane ``i % SUM_LANES``, where
    the sub-block's values ``|x| * 2**-4`` are summed in float32 (8 per lane, with fused multiply-adds, so each
    addition rounds once), then multiplied back by 16 and added into the block's float64 lanes; the lanes are combined
    by a fixed tree and the block partials added in block order (float64). The result is therefore bitwise independent
    of the tensor's address / offset, of the thread count and of the ISA build, and equal to
    :func:`fused_adamhd_cpu_`'s ``abs_sums_out`` for the same stored values.

    Accuracy: ``|result - Σ|x|| <= SUM_REL_ERROR * Σ|x| + numel * 2**-146`` for tensors below 2**34 elements
    (:data:`SUM_REL_ERROR` = 4.2e-7: a float32 sum of 8 non-negative terms errs by at most 7 * 2**-24 / (1 - 7 * 2**-24)
    = 4.172e-7 relative; the float64 steps add less than 1e-9; the absolute term only concerns values below 2**-122,
    whose scaling by 2**-4 rounds). The layer threshold δ = c * Σ|x| / numel is therefore within 4.2e-7 relative of
    its exact value, well inside the 1e-5 relative agreement asked of every δ under sharding. (Accumulating every ``|x|`` exactly in float64 costs two
    conversions and two double additions per 8 elements inside the update loop, which made the fused step measurably
    slower than DeepSpeedCPUAdam; this costs one fused multiply-add.)
    """
    ts = [t.detach() for t in tensors]
    if not ts:
        return torch.zeros(0, dtype=torch.float64)
    _check_plain("tensors", ts)
    return load().abs_sums(ts)
