"""Triton kernels for AdamHD: the fused update and the per-layer statistic, over a LIST of tensors in ONE launch.

Multi-tensor launch (the "chunk table")
---------------------------------------
Every tensor of a list is cut into chunks of ``CHUNK = BLOCK * K`` elements; one Triton program handles one chunk.
A launch gets, as small device tensors:

- per tensor: int64 address tables (``data_ptr()`` of p / g / m / v), cast inside the kernel to typed pointers;
- per chunk: ``chunk_tensor`` (int32 index of the tensor the chunk belongs to), ``chunk_start`` (int64 element
  offset of the chunk inside that tensor) and ``chunk_len`` (int32 valid elements, ``CHUNK`` except in a tensor's
  last chunk).

The grid is ``(number of chunks,)``. The chunk arrays depend only on the numels, the address tables of params and
states only on their pointers: both are built with vectorised torch ops and cached (keyed by those tuples). Grad
pointers may change every step; their table is cached by its own pointer tuple (grads often live in persistent
buckets), with a small LRU bound. A tensor may be a separate allocation or a contiguous view into a flat buffer
(``flat.narrow(0, start, n)``, the ZeRO layout); it must be contiguous.

All tensors of one launch share dtypes (specialised as constexpr); a list that mixes dtypes is split into one
launch per dtype combination. Scalars (lr, betas, eps, weight decay) are runtime arguments, so changing them does
not recompile.

This module imports without triton (``available()`` is then False) and without CUDA; with
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (what the tests do).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

try:  # pragma: no cover - exercised by whichever environment runs it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # ImportError, or a broken triton install
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["available", "fused_adamhd_triton_", "layer_abs_sums_triton", "BLOCK", "K", "CHUNK"]

BLOCK = 1024  # elements per vector step of a program
K = 4  # vector steps per program
CHUNK = BLOCK * K  # elements per program (one chunk of one tensor)
NUM_WARPS = 4

SUPPORTED_DTYPES = _SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_SIZE = 32


def available() -> bool:
    """True when triton imports (the kernels can be compiled, or interpreted with ``TRITON_INTERPRET=1``)."""
    return _HAS_TRITON


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
if _HAS_TRITON:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _to_storage(x, DTYPE: tl.constexpr):
        """fp32 -> storage dtype, round to nearest even (bit-exact with torch's ``.to(dtype)``).

        bf16 is rounded by hand: the Triton interpreter truncates on fp32->bf16 casts, the GPU rounds; doing it
        with integer ops gives the same bits everywhere (NaN -> 0x7FC0 as in c10::BFloat16)."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            lsb = (bits >> 16) & 1
            r = (bits + lsb + 0x7FFF) >> 16
            r = tl.where(x != x, 0x7FC0, r)
            return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def _adamhd_block(
        p_ptr, g_ptr, m_ptr, v_ptr, vm_ptr, offs, mask,
        step_size, bc2_sqrt, delta, scale,
        one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,
        P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
        DECAY: tl.constexpr, HAS_SCALE: tl.constexpr, AMSGRAD: tl.constexpr,
    ):
        """One BLOCK of the update; returns (number of non-finite grads in it (int32), |θ| of the STORED new
        values as an fp32 vector of BLOCK lanes, 0 in masked lanes). AMSGRAD: ``vm`` (the running maximum of v,
        stored like v) becomes max(vm, v2) and replaces v2 in the denominator."""
        p_raw = tl.load(p_ptr + offs, mask=mask)
        m_raw = tl.load(m_ptr + offs, mask=mask)
        v_raw = tl.load(v_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        m = m_raw.to(tl.float32)
        v = v_raw.to(tl.float32)
        x = p_raw.to(tl.float32)

        m2 = m + one_minus_beta1 * (g - m)  # torch.lerp(m, g, 1-beta1), the weight < 0.5 form
        v2 = beta2 * v + one_minus_beta2 * (g * g)
        if AMSGRAD:
            vm_raw = tl.load(vm_ptr + offs, mask=mask)
            vm2 = tl.maximum(vm_raw.to(tl.float32), v2)
            denom = tl.div_rn(tl.sqrt_rn(vm2), bc2_sqrt) + eps
        else:
            denom = tl.div_rn(tl.sqrt_rn(v2), bc2_sqrt) + eps
        if DECAY == 2:  # clip: gradient step on tau*Huber before the Adam step
            x = x - tau * tl.minimum(tl.maximum(x, -delta), delta)
        x = x - step_size * tl.div_rn(m2, denom)
        if DECAY == 1:  # prox: closed-form proximal step of tau*Huber after the Adam step
            x = x - tau * tl.minimum(tl.maximum(tl.div_rn(x, one_plus_tau), -delta), delta)

        ok = tl.abs(g) < float("inf")  # False for +-inf and NaN
        # Non-finite grad: write the old bits back (a plain store keeps vectorised stores possible on the GPU).
        p_new = tl.where(ok, _to_storage(x, P_DTYPE), p_raw)
        tl.store(p_ptr + offs, p_new, mask=mask)
        tl.store(m_ptr + offs, tl.where(ok, _to_storage(m2, M_DTYPE), m_raw), mask=mask)
        tl.store(v_ptr + offs, tl.where(ok, _to_storage(v2, V_DTYPE), v_raw), mask=mask)
        if AMSGRAD:
            tl.store(vm_ptr + offs, tl.where(ok, _to_storage(vm2, V_DTYPE), vm_raw), mask=mask)
        p_abs = tl.abs(p_new.to(tl.float32))  # next step's statistic, from the registers (no second pass)
        if mask is None:
            bad = tl.sum((ok == 0).to(tl.int32), axis=0)
        else:
            bad = tl.sum(((ok == 0) & mask).to(tl.int32), axis=0)
            p_abs = tl.where(mask, p_abs, 0.0)
        return bad, p_abs

    @triton.jit
    def _base(table, t, start, DTYPE: tl.constexpr, HINT: tl.constexpr):
        """Typed pointer to element ``start`` of tensor ``t`` (address read from an int64 table).

        HINT: the address is 16-byte aligned. The hint is attached to a pointer computed here (not shared with an
        unhinted path), so it never leaks to the code that handles unaligned tensors."""
        ptr = tl.load(table + t).to(tl.pointer_type(DTYPE)) + start
        if HINT:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _adamhd_chunk(
        p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs, t, start, n,
        step_size, bc2_sqrt, delta, scale,
        one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
        DECAY: tl.constexpr, HAS_SCALE: tl.constexpr, AMSGRAD: tl.constexpr, FULL: tl.constexpr,
        HINT: tl.constexpr, BLOCK: tl.constexpr, K: tl.constexpr,
    ):
        """One chunk (K blocks); FULL: all BLOCK*K elements valid, no bounds mask. Returns (the non-finite count,
        the chunk's fp32 Σ|θ_new|, summed in the same order as :func:`_abs_chunk`)."""
        p_ptr = _base(p_ptrs, t, start, P_DTYPE, HINT)
        g_ptr = _base(g_ptrs, t, start, G_DTYPE, HINT)
        m_ptr = _base(m_ptrs, t, start, M_DTYPE, HINT)
        v_ptr = _base(v_ptrs, t, start, V_DTYPE, HINT)
        if AMSGRAD:
            vm_ptr = _base(vm_ptrs, t, start, V_DTYPE, HINT)
        else:
            vm_ptr = v_ptr  # never read
        bad = tl.zeros((), dtype=tl.int32)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            offs = k * BLOCK + tl.arange(0, BLOCK)
            if FULL:
                mask = None
            else:
                mask = offs < n
            b, a = _adamhd_block(
                p_ptr, g_ptr, m_ptr, v_ptr, vm_ptr, offs, mask,
                step_size, bc2_sqrt, delta, scale,
                one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,
                P_DTYPE, M_DTYPE, V_DTYPE, DECAY, HAS_SCALE, AMSGRAD,
            )
            bad += b
            acc += a
        return bad, tl.sum(acc, axis=0)

    @triton.jit
    def _adamhd_kernel(
        p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs,  # int64 address tables, one entry per tensor (vm: AMSGRAD)
        chunk_tensor, chunk_start, chunk_len,  # one entry per chunk (= per program)
        aligned,  # int8 per tensor: 1 if its p, g, m, v addresses are 16-byte aligned (read when ALIGN == 2)
        step_sizes, bc2_sqrts, deltas,  # fp32, one entry per tensor
        grad_scale_ptr, nonfinite_ptr,
        sums_ptr,  # fp32 per tensor: Σ|θ| of the updated tensor is atomically added (read when HAS_SUMS)
        one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,  # runtime fp32 scalars
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
        DECAY: tl.constexpr,  # 0: none, 1: prox, 2: clip
        HAS_SCALE: tl.constexpr, HAS_NONFINITE: tl.constexpr, HAS_SUMS: tl.constexpr, AMSGRAD: tl.constexpr,
        ALIGN: tl.constexpr,  # 0: no tensor 16-byte aligned, 1: all, 2: mixed (read the per-tensor flag)
        BLOCK: tl.constexpr, K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid)
        start = tl.load(chunk_start + pid)  # a multiple of BLOCK*K: an aligned base stays aligned
        n = tl.load(chunk_len + pid)

        step_size = tl.load(step_sizes + t)
        bc2_sqrt = tl.load(bc2_sqrts + t)
        if DECAY != 0:
            delta = tl.load(deltas + t)
        else:
            delta = 0.0
        if HAS_SCALE:
            scale = tl.load(grad_scale_ptr)
        else:
            scale = 1.0

        # Full chunks run without a bounds mask and, where the addresses allow it, with an alignment hint: both are
        # needed for 16-byte vector loads/stores. A tensor's last chunk runs masked.
        if n == BLOCK * K:
            if ALIGN == 2:
                if tl.load(aligned + t) != 0:
                    bad, s = _adamhd_chunk(
                        p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs, t, start, n, step_size, bc2_sqrt, delta, scale,
                        one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,
                        P_DTYPE, G_DTYPE, M_DTYPE, V_DTYPE, DECAY, HAS_SCALE, AMSGRAD, True, True, BLOCK, K,
                    )
                else:
                    bad, s = _adamhd_chunk(
                        p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs, t, start, n, step_size, bc2_sqrt, delta, scale,
                        one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,
                        P_DTYPE, G_DTYPE, M_DTYPE, V_DTYPE, DECAY, HAS_SCALE, AMSGRAD, True, False, BLOCK, K,
                    )
            else:
                bad, s = _adamhd_chunk(
                    p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs, t, start, n, step_size, bc2_sqrt, delta, scale,
                    one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,
                    P_DTYPE, G_DTYPE, M_DTYPE, V_DTYPE, DECAY, HAS_SCALE, AMSGRAD, True, ALIGN == 1, BLOCK, K,
                )
        else:
            bad, s = _adamhd_chunk(
                p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs, t, start, n, step_size, bc2_sqrt, delta, scale,
                one_minus_beta1, beta2, one_minus_beta2, eps, tau, one_plus_tau,
                P_DTYPE, G_DTYPE, M_DTYPE, V_DTYPE, DECAY, HAS_SCALE, AMSGRAD, False, ALIGN == 1, BLOCK, K,
            )
        if HAS_NONFINITE:
            if bad > 0:
                tl.atomic_add(nonfinite_ptr, bad.to(nonfinite_ptr.dtype.element_ty))
        if HAS_SUMS:
            tl.atomic_add(sums_ptr + t, s)

    @triton.jit
    def _abs_chunk(x_ptrs, t, start, n, X_DTYPE: tl.constexpr, FULL: tl.constexpr, HINT: tl.constexpr,
                   BLOCK: tl.constexpr, K: tl.constexpr):
        x_ptr = _base(x_ptrs, t, start, X_DTYPE, HINT)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            offs = k * BLOCK + tl.arange(0, BLOCK)
            if FULL:
                acc += tl.abs(tl.load(x_ptr + offs).to(tl.float32))
            else:
                acc += tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
        return tl.sum(acc, axis=0)

    @triton.jit
    def _abs_sum_kernel(
        x_ptrs, chunk_tensor, chunk_start, chunk_len, aligned, out,
        X_DTYPE: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr, K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid)
        start = tl.load(chunk_start + pid)
        n = tl.load(chunk_len + pid)
        if n == BLOCK * K:
            if ALIGN == 2:
                if tl.load(aligned + t) != 0:
                    s = _abs_chunk(x_ptrs, t, start, n, X_DTYPE, True, True, BLOCK, K)
                else:
                    s = _abs_chunk(x_ptrs, t, start, n, X_DTYPE, True, False, BLOCK, K)
            else:
                s = _abs_chunk(x_ptrs, t, start, n, X_DTYPE, True, ALIGN == 1, BLOCK, K)
        else:
            s = _abs_chunk(x_ptrs, t, start, n, X_DTYPE, False, ALIGN == 1, BLOCK, K)
        # Per-chunk fp32 partial sum, combined per tensor with an atomic add: the order of the additions (and so the
        # last bits of the result) may vary from run to run on a GPU.
        tl.atomic_add(out + t, s)


# ----------------------------------------------------------------------------------------------------------------
# Tables (host side)
# ----------------------------------------------------------------------------------------------------------------
_chunk_cache: "OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]]" = OrderedDict()
_addr_cache: "OrderedDict[tuple, Tensor]" = OrderedDict()
_index_cache: "OrderedDict[tuple, Tensor]" = OrderedDict()


def _lru_get(cache: OrderedDict, key, build):
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = build()
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """A small host table on ``device``. To a GPU it goes from pinned memory without blocking: a copy from pageable
    memory would wait for the GPU to finish its queued work (new gradient addresses would then cost a stall)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _build_chunks(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """chunk -> (tensor index int32, start offset int64, valid length int32), vectorised (no loop over chunks)."""
    n = torch.tensor(numels, dtype=torch.int64)
    counts = (n + (CHUNK - 1)) // CHUNK  # chunks per tensor (0 for an empty tensor)
    total = int(counts.sum())
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts  # index of each tensor's first chunk
    local = torch.arange(total, dtype=torch.int64) - first[tensor_idx]  # chunk number inside its tensor
    start = local * CHUNK
    length = torch.clamp(n[tensor_idx] - start, max=CHUNK)
    return (
        _upload(tensor_idx.to(torch.int32), device),
        _upload(start, device),
        _upload(length.to(torch.int32), device),
    )


def _chunks(numels: tuple[int, ...], device: torch.device):
    return _lru_get(_chunk_cache, (device, numels), lambda: _build_chunks(numels, device))


def _addresses(ptrs: tuple[int, ...], device: torch.device) -> Tensor:
    """int64 device tensor of addresses, cached by the address tuple."""
    return _lru_get(_addr_cache, (device, ptrs), lambda: _upload(torch.tensor(ptrs, dtype=torch.int64), device))


def _index(idx: tuple[int, ...], device: torch.device) -> Tensor:
    return _lru_get(_index_cache, (device, idx), lambda: _upload(torch.tensor(idx, dtype=torch.int64), device))


def _check(name: str, t: Tensor, device: torch.device, numel: int | None = None) -> None:
    """Full check of one tensor, with a precise message (run only when the fast checks found something)."""
    if t.device != device:
        raise ValueError(f"{name}: all tensors must be on {device}, got {t.device}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name}: dtype {t.dtype} not supported (float32, bfloat16, float16)")
    if not t.is_contiguous():
        raise ValueError(f"{name}: tensors must be contiguous")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: numel {t.numel()} does not match the parameter's {numel}")


def _device_index(t: Tensor) -> int:
    return t.get_device()  # cheap (an int); -1 for CPU tensors


def _alignment(flags: tuple[bool, ...], device: torch.device) -> tuple[int, Tensor | None]:
    """(ALIGN mode, per-tensor int8 flag table or None): 1 all tensors 16-byte aligned, 0 none, 2 mixed."""
    if all(flags):
        return 1, None
    if not any(flags):
        return 0, None
    table = _lru_get(_addr_cache, (device, "aligned", flags),
                     lambda: _upload(torch.tensor(flags, dtype=torch.int8), device))
    return 2, table


def _groups(keys: list[tuple]) -> list[tuple[tuple, list[int]]]:
    """Indices grouped by key, in order of first appearance."""
    out: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.items())


def _require_triton() -> None:
    if not _HAS_TRITON:
        raise RuntimeError("triton is not available: install the 'gpu' extra (triton) to use the fused kernels")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def fused_adamhd_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step_sizes: Tensor,
    bc2_sqrts: Tensor,
    deltas: Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str,
    grad_scale: Tensor | None = None,
    nonfinite: Tensor | None = None,
    abs_sums: Tensor | None = None,
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
) -> None:
    """AdamHD update of every tensor in place, one kernel launch per dtype combination (normally one).

    ``step_sizes``, ``bc2_sqrts``, ``deltas``: fp32 device tensors, one entry per tensor (``deltas`` may be None
    when ``weight_decay == 0``). ``grad_scale``: optional 0-d fp32 device tensor, grads are divided by it.
    ``nonfinite``: optional 1-element int32/int64 device tensor; the number of non-finite grad elements is
    atomically added to it. Elements with a non-finite grad keep their p, m and v.
    ``abs_sums``: optional fp32 device tensor, one entry per tensor; it receives ``Σ|θ|`` of each tensor AFTER the
    update (of the stored values), computed from the registers as θ is written: the next step's layer statistic
    without a second pass over memory. Per chunk an fp32 sum in the same order of blocks as
    :func:`layer_abs_sums_triton` (bitwise the same under the interpreter; on a GPU the reduction tree inside a
    block is the compiler's, so the last bits may differ), chunks combined with atomic adds, so the last bits may
    also vary from run to run on a GPU.
    ``max_exp_avg_sqs`` (amsgrad, as torch's AdamW): one tensor per param, of the size and dtype of its
    ``exp_avg_sq``, updated in place to ``max(vm, v_new)``, which replaces ``v_new`` in the denominator.
    """
    _require_triton()
    n_t = len(params)
    vms = None if max_exp_avg_sqs is None else list(max_exp_avg_sqs)
    if vms is not None and len(vms) != n_t:
        raise ValueError("max_exp_avg_sqs must have one tensor per param")
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n_t):
        raise ValueError("params, grads, exp_avgs and exp_avg_sqs must have the same length")
    if decay not in ("prox", "clip"):
        raise ValueError(f"decay must be 'prox' or 'clip', got {decay!r}")
    if n_t == 0:
        return
    device = params[0].device
    has_decay = weight_decay != 0.0
    if has_decay and deltas is None:
        raise ValueError("deltas is required when weight_decay != 0")
    for name, t in (("step_sizes", step_sizes), ("bc2_sqrts", bc2_sqrts), ("deltas", deltas)):
        if t is None:
            continue
        if t.device != device or t.dtype != torch.float32 or t.dim() != 1 or t.numel() != n_t:
            raise ValueError(f"{name} must be a 1-D float32 tensor of length {n_t} on {device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if grad_scale is not None and (grad_scale.device != device or grad_scale.dtype != torch.float32
                                   or grad_scale.numel() != 1):
        raise ValueError(f"grad_scale must be a 1-element float32 tensor on {device}")
    if nonfinite is not None and (nonfinite.device != device or nonfinite.dtype not in (torch.int32, torch.int64)
                                  or nonfinite.numel() != 1):
        raise ValueError(f"nonfinite must be a 1-element int32/int64 tensor on {device}")
    if abs_sums is not None:
        if (abs_sums.device != device or abs_sums.dtype != torch.float32 or abs_sums.dim() != 1
                or abs_sums.numel() != n_t or not abs_sums.is_contiguous()):
            raise ValueError(f"abs_sums must be a contiguous 1-D float32 tensor of length {n_t} on {device}")
        abs_sums.zero_()

    # One pass over the tensors (the host cost of a step): cheap checks, full ones only on a mismatch.
    dev = _device_index(params[0])
    numels, pmv_ptrs, g_ptrs, vm_ptrs, keys = [], [], [], [], []
    for i in range(n_t):
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        n = p.numel()
        if not (
            g.numel() == n and m.numel() == n and v.numel() == n
            and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
            and p.get_device() == dev and g.get_device() == dev and m.get_device() == dev and v.get_device() == dev
        ):
            _check("params", p, device)
            _check("grads", g, device, n)
            _check("exp_avgs", m, device, n)
            _check("exp_avg_sqs", v, device, n)
        if vms is not None:
            vm = vms[i]
            if not (vm.numel() == n and vm.is_contiguous() and vm.get_device() == dev):
                _check("max_exp_avg_sqs", vm, device, n)
            if vm.dtype != v.dtype:
                raise TypeError(f"max_exp_avg_sqs[{i}]: dtype {vm.dtype} differs from its exp_avg_sq's {v.dtype}")
            vm_ptrs.append(vm.data_ptr())
        numels.append(n)
        pmv_ptrs.append((p.data_ptr(), m.data_ptr(), v.data_ptr()))
        g_ptrs.append(g.data_ptr())
        keys.append((p.dtype, g.dtype, m.dtype, v.dtype))

    for key in set(keys):
        for name, dt in zip(("params", "grads", "exp_avgs", "exp_avg_sqs"), key):
            if dt not in _SUPPORTED:
                raise TypeError(f"{name}: dtype {dt} not supported (float32, bfloat16, float16)")

    tau = float(lr) * float(weight_decay)
    scalars = (1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), tau, 1.0 + tau)
    decay_code = 0 if not has_decay else (1 if decay == "prox" else 2)

    groups = _groups(keys)
    for (pd, gd, md, vd), idx in groups:
        if len(groups) == 1:
            sub_numels, sub_pmv, sub_g, sub_vm = tuple(numels), tuple(pmv_ptrs), tuple(g_ptrs), tuple(vm_ptrs)
            ss, bc, dl = step_sizes, bc2_sqrts, deltas
        else:
            sub_numels = tuple(numels[i] for i in idx)
            sub_pmv = tuple(pmv_ptrs[i] for i in idx)
            sub_g = tuple(g_ptrs[i] for i in idx)
            sub_vm = tuple(vm_ptrs[i] for i in idx) if vms is not None else ()
            sel = _index(tuple(idx), device)
            ss, bc = step_sizes.index_select(0, sel), bc2_sqrts.index_select(0, sel)
            dl = deltas.index_select(0, sel) if deltas is not None else None
        sums = abs_sums if (abs_sums is None or len(groups) == 1) else torch.zeros(len(idx), dtype=torch.float32,
                                                                                  device=device)
        chunk_tensor, chunk_start, chunk_len = _chunks(sub_numels, device)
        n_chunks = chunk_tensor.numel()
        if n_chunks == 0:
            continue
        # rows: p, m, v addresses (transposed from per-tensor triples); cached by the triples
        pmv = _lru_get(_addr_cache, (device, "pmv", sub_pmv),
                       lambda: _upload(torch.tensor(sub_pmv, dtype=torch.int64).t().contiguous(), device))
        gt = _addresses(sub_g, device)
        flags = tuple((a | b | c | d) % 16 == 0 for (a, b, c), d in zip(sub_pmv, sub_g))
        vmt = None
        if vms is not None:
            vmt = _addresses(sub_vm, device)
            flags = tuple(f and w % 16 == 0 for f, w in zip(flags, sub_vm))
        align_mode, align_table = _alignment(flags, device)
        _adamhd_kernel[(n_chunks,)](
            pmv[0], gt, pmv[1], pmv[2], vmt if vmt is not None else pmv[2],
            chunk_tensor, chunk_start, chunk_len,
            align_table if align_table is not None else chunk_len,
            ss, bc, dl if dl is not None else ss,
            grad_scale if grad_scale is not None else ss,
            nonfinite if nonfinite is not None else chunk_len,
            sums if sums is not None else ss,
            *scalars,
            P_DTYPE=_TL_DTYPE[pd], G_DTYPE=_TL_DTYPE[gd], M_DTYPE=_TL_DTYPE[md], V_DTYPE=_TL_DTYPE[vd],
            DECAY=decay_code, HAS_SCALE=grad_scale is not None, HAS_NONFINITE=nonfinite is not None,
            HAS_SUMS=sums is not None, AMSGRAD=vms is not None, ALIGN=align_mode, BLOCK=BLOCK, K=K, num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # no FMA contraction: the IEEE ops as written (bit-equal to the interpreter)
        )
        if sums is not None and sums is not abs_sums:
            abs_sums.index_copy_(0, _index(tuple(idx), device), sums)


def layer_abs_sums_triton(tensors: Sequence[Tensor]) -> Tensor:
    """``sum(|x|)`` of each tensor as a float32 tensor of shape ``(len(tensors),)``, one launch (per dtype).

    Accumulated in fp32 per chunk, chunks combined with atomic adds (not bitwise deterministic on a GPU)."""
    _require_triton()
    if len(tensors) == 0:
        return torch.zeros(0, dtype=torch.float32)
    device = tensors[0].device
    out = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    dev = _device_index(tensors[0])
    numels, ptrs, keys = [], [], []
    for x in tensors:
        if not (x.is_contiguous() and x.get_device() == dev and x.dtype in _SUPPORTED):
            _check("tensors", x, device)
        numels.append(x.numel())
        ptrs.append(x.data_ptr())
        keys.append(x.dtype)
    groups = _groups(keys)
    for dtype, idx in groups:
        if len(groups) == 1:
            sub_numels, sub_ptrs, target = tuple(numels), tuple(ptrs), out
        else:
            sub_numels = tuple(numels[i] for i in idx)
            sub_ptrs = tuple(ptrs[i] for i in idx)
            target = torch.zeros(len(idx), dtype=torch.float32, device=device)
        chunk_tensor, chunk_start, chunk_len = _chunks(sub_numels, device)
        if chunk_tensor.numel() > 0:
            align_mode, align_table = _alignment(tuple(a % 16 == 0 for a in sub_ptrs), device)
            _abs_sum_kernel[(chunk_tensor.numel(),)](
                _addresses(sub_ptrs, device), chunk_tensor, chunk_start, chunk_len,
                align_table if align_table is not None else chunk_len, target,
                X_DTYPE=_TL_DTYPE[dtype], ALIGN=align_mode, BLOCK=BLOCK, K=K, num_warps=NUM_WARPS,
            )
        if len(groups) > 1:
            out.index_copy_(0, _index(tuple(idx), device), target)
    return out
