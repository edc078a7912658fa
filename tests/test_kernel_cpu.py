"""Tests of the fused CPU AdamHD kernel (adamhd_dist.optim.kernels.cpu) against an independent float64 reference.

Every test here runs once per ISA build of the kernel (ADAMHD_CPU_ISA = generic, avx2, avx512); a build the CPU cannot
execute is skipped (a platform condition). Each build is compiled once per session (torch's extension cache)."""

from __future__ import annotations

import math

import pytest
import torch

from adamhd_dist.optim.kernels import cpu as kcpu

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not kcpu.available(), reason="CPU kernel cannot be built here (no compiler?)")

KERNEL_ISAS = ("generic", "avx2", "avx512")


def _isa_param(isa):
    missing = kcpu.missing_cpu_features(isa)
    reason = f"platform: this CPU cannot execute the {isa} build (it lacks {', '.join(missing)})"
    return pytest.param(isa, id=isa, marks=pytest.mark.skipif(bool(missing), reason=reason))


@pytest.fixture(autouse=True, scope="module", params=[_isa_param(i) for i in KERNEL_ISAS])
def kernel_isa(request):
    """Runs the module's tests against one ISA build: the kernel functions load the build ADAMHD_CPU_ISA names."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kcpu.ISA_ENV, request.param)
        yield request.param

INF = math.inf
SIZES = [1, 7, 33, 1000, 4099]
DELTAS = [0.05, INF, 0.0, 0.01, 1.0]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# Reference, float64, straight from the formulas (does not use the package).
# ----------------------------------------------------------------------------------------------------------------
def ref_step(p, g, m, v, *, step_size, bc2_sqrt, delta, lr, beta1, beta2, eps, weight_decay, decay, grad_scale):
    """One AdamHD step in float64. Returns (p, m, v, finite_mask, scales): scales bound the magnitudes that
    enter the fp32 computation of p, m, v (for a rounding-aware tolerance where a result cancels)."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    if grad_scale is not None:
        g = g / grad_scale
    w = 1.0 - beta1
    m2 = m + w * (g - m)
    v2 = beta2 * v + (1.0 - beta2) * g * g
    denom = torch.sqrt(v2) / bc2_sqrt + eps
    tau = lr * weight_decay
    x = p
    if weight_decay != 0 and decay == "clip":
        x = x - tau * torch.clamp(x, -delta, delta)
    x = x - step_size * (m2 / denom)
    if weight_decay != 0 and decay == "prox":
        x = x - tau * torch.clamp(x / (1.0 + tau), -delta, delta)
    fin = torch.isfinite(g)
    scale_p = p.abs() + step_size * (m.abs() + g.abs()) / denom
    scales = (torch.where(fin, scale_p, 0.0), torch.where(fin, m.abs() + g.abs(), 0.0),
              torch.where(fin, v.abs() + g * g, 0.0))
    return torch.where(fin, x, p), torch.where(fin, m2, m), torch.where(fin, v2, v), fin, scales


def check_close(actual, expected, scale, rel):
    """|actual - expected| <= rel * (|expected| + scale), elementwise (all finite)."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bound = rel * (e.abs() + scale)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())} elements off; worst: actual={a[bad][:5].tolist()} expected={e[bad][:5].tolist()}"
    )


def run_kernel(ps, gs, ms, vs, steps, *, deltas, weight_decay, decay, grad_scale=None, hp=HP, **kw):
    bc1 = 1 - hp["beta1"] ** steps
    bc2 = 1 - hp["beta2"] ** steps
    n = len(ps)
    return kcpu.fused_adamhd_cpu_(
        ps, gs, ms, vs, step_sizes=[hp["lr"] / bc1] * n, bc2_sqrts=[math.sqrt(bc2)] * n, deltas=deltas,
        weight_decay=weight_decay, decay=decay, grad_scale=grad_scale, **hp, **kw,
    )


def step_and_check(ps, gs, ms, vs, t, *, deltas, weight_decay, decay, grad_scale=None, rel=1e-6, hp=HP,
                   rel_bf16=2.0**-8):
    """Run one kernel step and compare every tensor to the float64 reference computed from the same inputs."""
    bc1 = 1 - hp["beta1"] ** t
    bc2 = 1 - hp["beta2"] ** t
    refs = []
    for i in range(len(ps)):
        d = deltas[i] if deltas is not None else 0.0
        refs.append(ref_step(ps[i], gs[i], ms[i], vs[i], step_size=hp["lr"] / bc1, bc2_sqrt=math.sqrt(bc2), delta=d,
                             weight_decay=weight_decay, decay=decay, grad_scale=grad_scale, **hp))
    bad = run_kernel(ps, gs, ms, vs, t, deltas=deltas, weight_decay=weight_decay, decay=decay,
                     grad_scale=grad_scale, hp=hp)
    assert bad == sum(int((~r[3]).sum()) for r in refs)
    for i, (rp, rm, rv, _fin, scales) in enumerate(refs):
        for actual, exp, scale in zip((ps[i], ms[i], vs[i]), (rp, rm, rv), scales):
            r = rel_bf16 if actual.dtype == torch.bfloat16 else rel
            check_close(actual, exp, scale, r)
    return bad


def make_tensors(sizes, gen, *, pdtype=torch.float32, sdtype=torch.float32, gdtype=torch.float32, gmul=1.0):
    ps = [(torch.randn(n, generator=gen) * 0.5).to(pdtype) for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 1e-2 * gmul).to(gdtype) for n in sizes]
    ms = [(torch.randn(n, generator=gen) * 1e-3).to(sdtype) for n in sizes]
    vs = [(torch.rand(n, generator=gen) * 1e-4).to(sdtype) for n in sizes]
    return ps, gs, ms, vs


# ----------------------------------------------------------------------------------------------------------------
def test_available_and_module(kernel_isa):
    assert kcpu.selected_isa() == kernel_isa
    assert kcpu.available() is True
    assert kcpu.available() is True  # cached
    mod = kcpu.load()
    assert hasattr(mod, "adamhd_step")
    assert kcpu.load() is mod and kcpu.load(kernel_isa) is mod
    # the fp32 update's code path is the one the ISA promises
    assert mod.SIMD_PATH == {"generic": "portable", "avx2": "avx2", "avx512": "avx512"}[kernel_isa]


@pytest.mark.parametrize("grad_scale", [None, 1024.0])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("decay", ["prox", "clip"])
def test_fp32_matches_reference_10_steps(decay, weight_decay, grad_scale):
    gen = torch.Generator().manual_seed(1234)
    gmul = grad_scale or 1.0
    ps, gs, ms, vs = make_tensors(SIZES, gen, gmul=gmul)
    deltas = None if weight_decay == 0 else DELTAS
    for t in range(1, 11):
        gs = [(torch.randn(g.numel(), generator=gen) * 1e-2 * gmul) for g in gs]
        step_and_check(ps, gs, ms, vs, t, deltas=deltas, weight_decay=weight_decay, decay=decay, grad_scale=grad_scale)


@pytest.mark.parametrize("beta1", [0.3, 0.0])
def test_fp32_matches_reference_with_small_beta1(beta1):
    """beta1 <= 0.5: the lerp's other form (g - (1-w)(g-m)), which every build computes without the SIMD path."""
    gen = torch.Generator().manual_seed(77)
    hp = dict(HP, beta1=beta1)
    ps, gs, ms, vs = make_tensors(SIZES, gen)
    for t in range(1, 4):
        gs = [torch.randn(g.numel(), generator=gen) * 1e-2 for g in gs]
        step_and_check(ps, gs, ms, vs, t, deltas=DELTAS, weight_decay=0.3, decay="prox", hp=hp)


def test_fp32_free_running_10_steps_vs_float64():
    """Ten steps without re-syncing the reference: fp32 kernel state stays within fp32 rounding drift."""
    gen = torch.Generator().manual_seed(7)
    ps, gs, ms, vs = make_tensors(SIZES, gen)
    rp, rm, rv = [p.double() for p in ps], [m.double() for m in ms], [v.double() for v in vs]
    for t in range(1, 11):
        gs = [torch.randn(g.numel(), generator=gen) * 1e-2 for g in gs]
        run_kernel(ps, gs, ms, vs, t, deltas=DELTAS, weight_decay=0.3, decay="prox")
        bc1, bc2 = 1 - HP["beta1"] ** t, 1 - HP["beta2"] ** t
        for i in range(len(ps)):
            rp[i], rm[i], rv[i], _, _ = ref_step(rp[i], gs[i], rm[i], rv[i], step_size=HP["lr"] / bc1,
                                                 bc2_sqrt=math.sqrt(bc2), delta=DELTAS[i], weight_decay=0.3,
                                                 decay="prox", grad_scale=None, **HP)
    for i in range(len(ps)):
        torch.testing.assert_close(ps[i].double(), rp[i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ms[i].double(), rm[i], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(vs[i].double(), rv[i], rtol=1e-5, atol=1e-12)


def test_delta_inf_and_zero_semantics():
    """delta=+inf is L2 decay (prox: x/(1+tau), clip: x(1-tau)); delta=0 is no decay. No NaNs from inf."""
    gen = torch.Generator().manual_seed(3)
    n = 1000
    p0 = torch.randn(n, generator=gen) * 100
    p0[:4] = torch.tensor([3e38, -3e38, 0.0, -0.0])
    for decay in ("prox", "clip"):
        outs = {}
        for delta in (INF, 0.0):
            p, g, m, v = p0.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n)
            kcpu.fused_adamhd_cpu_([p], [g], [m], [v], step_sizes=[0.0], bc2_sqrts=[1.0], deltas=[delta], lr=0.1,
                                   beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5, decay=decay)
            assert torch.isfinite(p).all()
            outs[delta] = p
        tau = 0.05
        expect = p0.double() / (1 + tau) if decay == "prox" else p0.double() * (1 - tau)
        torch.testing.assert_close(outs[INF].double(), expect, rtol=1e-6, atol=0)
        assert torch.equal(outs[0.0], p0)


def test_bf16_params_and_states():
    gen = torch.Generator().manual_seed(11)
    for sdtype in (torch.float32, torch.bfloat16):
        for gdtype in (torch.float32, torch.bfloat16):
            ps, gs, ms, vs = make_tensors(SIZES, gen, pdtype=torch.bfloat16, sdtype=sdtype, gdtype=gdtype)
            for decay in ("prox", "clip"):
                for t in range(1, 4):
                    gs = [(torch.randn(g.numel(), generator=gen) * 1e-2).to(gdtype) for g in gs]
                    step_and_check(ps, gs, ms, vs, t, deltas=DELTAS, weight_decay=0.3, decay=decay)
                assert all(p.dtype == torch.bfloat16 for p in ps)
                assert all(m.dtype == sdtype and v.dtype == sdtype for m, v in zip(ms, vs))


def test_bf16_store_is_round_to_nearest_even():
    """With beta1 = 0 the new exp_avg is exactly g (the lerp's `end - (end-start)*0`), so bf16 states must equal
    g.to(torch.bfloat16) bit for bit: ties to even, overflow to inf."""
    base = torch.tensor([1.0, 1.5, -2.25, 3.0e38, -3.3e38, 1e-30, 123.456], dtype=torch.float32)
    hi = base.view(torch.int32) & ~0xFFFF  # exactly representable in bf16
    variants = [hi, hi | 0x8000, (hi ^ 0x10000) | 0x8000,  # ties, with both parities of the kept last bit
                hi | 0x7FFF, hi | 0x8001, (hi ^ 0x10000) | 0x7FFF,  # just below / above a tie
                torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF], dtype=torch.int32)]  # overflow to inf or not
    g = torch.cat([x.view(torch.float32) for x in variants])
    g = torch.cat([g, -g])
    assert torch.isfinite(g).all()
    assert torch.isinf(g.to(torch.bfloat16)).any()
    n = g.numel()
    p = torch.zeros(n, dtype=torch.bfloat16)
    m = torch.zeros(n, dtype=torch.bfloat16)
    v = torch.zeros(n, dtype=torch.bfloat16)
    bad = kcpu.fused_adamhd_cpu_([p], [g], [m], [v], step_sizes=[1e-3], bc2_sqrts=[1.0], deltas=None, lr=1e-3,
                                 beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.0, decay="prox")
    assert bad == 0
    expected = g.to(torch.bfloat16)
    assert torch.equal(m.view(torch.int16), expected.view(torch.int16))


def test_flat_buffer_views():
    """Many layers as contiguous views into one flat buffer (ZeRO partition): every viewed element is updated,
    nothing outside the views is touched; chunks of the thread split cross view boundaries."""
    gen = torch.Generator().manual_seed(5)
    sizes = [50_000, 3, 70_001, 17, 1, 4099]
    gaps = [5, 0, 11, 1, 0, 3, 9]  # gap before each view, and a tail
    total = sum(sizes) + sum(gaps)
    flats = {k: torch.randn(total, generator=gen) for k in ("p", "g", "m", "v")}
    flats["g"] *= 1e-2
    flats["v"] = flats["v"].abs() * 1e-4
    flats["m"] *= 1e-3
    views = {k: [] for k in flats}
    in_view = torch.zeros(total, dtype=torch.bool)
    off = 0
    for n, gap in zip(sizes, gaps):
        off += gap
        for k in flats:
            views[k].append(flats[k].narrow(0, off, n))
        in_view[off:off + n] = True
        off += n
    before = {k: f.clone() for k, f in flats.items()}
    deltas = [0.1, INF, 0.0, 1.0, 0.2, 0.05]
    for t in (1, 2):
        step_and_check(views["p"], views["g"], views["m"], views["v"], t, deltas=deltas, weight_decay=0.2, decay="prox")
    for k in ("p", "m", "v"):
        assert torch.equal(flats[k][~in_view], before[k][~in_view]), k
        # (values are checked against the reference above; a handful may legitimately round back to the old
        # value: Adam step vs decay, or g*g vs v, cancelling below half an ulp)
        changed = flats[k][in_view] != before[k][in_view]
        assert changed.double().mean() > 0.999, k
    assert torch.equal(flats["g"], before["g"])


def test_nonfinite_grads_masked_and_counted():
    gen = torch.Generator().manual_seed(9)
    for pdtype, sdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.bfloat16)):
        for grad_scale in (None, 8.0):
            ps, gs, ms, vs = make_tensors([1, 7, 1000, 40_000], gen, pdtype=pdtype, sdtype=sdtype)
            poison = {0: [0], 1: [2, 6], 2: [0, 999, 500], 3: [1, 39_999, 20_000, 12345]}
            vals = [math.nan, INF, -INF]
            k = 0
            for i, idxs in poison.items():
                for j in idxs:
                    gs[i][j] = vals[k % 3]
                    k += 1
            olds = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(ps, ms, vs)]
            bad = step_and_check(ps, gs, ms, vs, 1, deltas=[0.1, INF, 0.0, 0.5], weight_decay=0.1, decay="clip",
                                 grad_scale=grad_scale)
            assert bad == k
            for i, idxs in poison.items():
                mask = torch.zeros(ps[i].numel(), dtype=torch.bool)
                mask[idxs] = True
                for new, old in zip((ps[i], ms[i], vs[i]), olds[i]):
                    iv = torch.int32 if new.dtype == torch.float32 else torch.int16
                    assert torch.equal(new.view(iv)[mask], old.view(iv)[mask])
                    assert torch.isfinite(new).all()


@pytest.mark.parametrize("grad_scale", [None, 0.5])
def test_nonfinite_at_every_range_position(grad_scale):
    """Non-finite gradients (and, with grad_scale < 1, finite ones whose quotient overflows) at the first and last
    element of a 256-element update range, in the first range of a tensor, in a range after a clean one, in the
    last whole range and in the short tail: each masked and counted, every other element updated."""
    n = 4 * 2048 + 300
    gen = torch.Generator().manual_seed(13)
    p, g, m, v = (x[0] for x in make_tensors([n], gen))
    big = 3.0e38  # finite; big / 0.5 overflows
    where = {0: math.nan, 255: math.inf, 256: -math.inf, 511: math.nan, 2048 + 700: -math.inf, 8191: math.nan,
             8192: math.inf, n - 1: math.nan}
    if grad_scale is not None:
        where.update({1000: big, 4095: -big, 4096: big, 8200: -big})
    for i, x in where.items():
        g[i] = x
    before = [t.clone() for t in (p, m, v)]
    # the reference, in float64, masks what the kernel must mask (fp32 overflow of big / 0.5 included)
    g_ref = g.clone()
    g_ref[torch.tensor(sorted(where))] = math.nan
    rp, rm, rv, _, scales = ref_step(p, g_ref, m, v, step_size=HP["lr"] / (1 - HP["beta1"]),
                                     bc2_sqrt=math.sqrt(1 - HP["beta2"]), delta=0.05,
                                     weight_decay=0.1, decay="prox", grad_scale=grad_scale, **HP)
    bad = run_kernel([p], [g], [m], [v], 1, deltas=[0.05], weight_decay=0.1, decay="prox", grad_scale=grad_scale)
    assert bad == len(where)
    for actual, exp, scale in zip((p, m, v), (rp, rm, rv), scales):
        check_close(actual, exp, scale, 1e-6)
    idx = torch.tensor(sorted(where))
    for new, old in zip((p, m, v), before):
        assert torch.equal(new[idx].view(torch.int32), old[idx].view(torch.int32))
        keep = torch.ones(n, dtype=torch.bool)
        keep[idx] = False
        assert (new[keep] != old[keep]).double().mean() > 0.999


def test_grad_scale_overflow_counts_as_nonfinite():
    p, m, v = torch.ones(3), torch.zeros(3), torch.zeros(3)
    g = torch.tensor([3e38, 1.0, -3e38])
    bad = kcpu.fused_adamhd_cpu_([p], [g], [m], [v], step_sizes=[1e-3], bc2_sqrts=[1.0], deltas=None, lr=1e-3,
                                 beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay="prox", grad_scale=0.5)
    assert bad == 2
    assert p[0] == 1 and p[2] == 1 and p[1] != 1


def test_mixed_dtypes_in_one_call_and_tensor_scalars():
    gen = torch.Generator().manual_seed(21)
    ps = [torch.randn(100, generator=gen), torch.randn(33, generator=gen).bfloat16(), torch.randn(5, generator=gen)]
    gs = [torch.randn(100, generator=gen) * 1e-2, torch.randn(33, generator=gen) * 1e-2,
          (torch.randn(5, generator=gen) * 1e-2).bfloat16()]
    ms = [torch.zeros(100), torch.zeros(33).bfloat16(), torch.zeros(5)]
    vs = [torch.zeros(100), torch.zeros(33).bfloat16(), torch.zeros(5)]
    ss = torch.tensor([1e-3, 2e-3, 3e-3], dtype=torch.float64)
    bc = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    ds = torch.tensor([0.5, INF, 0.0], dtype=torch.float64)
    refs = [ref_step(ps[i], gs[i], ms[i], vs[i], step_size=float(ss[i]), bc2_sqrt=float(bc[i]), delta=float(ds[i]),
                     lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay="prox", grad_scale=None)
            for i in range(3)]
    bad = kcpu.fused_adamhd_cpu_(ps, gs, ms, vs, step_sizes=ss, bc2_sqrts=bc, deltas=ds, lr=1e-2, beta1=0.9,
                                 beta2=0.99, eps=1e-8, weight_decay=0.1, decay="prox")
    assert bad == 0
    for i, (rp, rm, rv, _, scales) in enumerate(refs):
        for actual, exp, scale in zip((ps[i], ms[i], vs[i]), (rp, rm, rv), scales):
            check_close(actual, exp, scale, 2.0**-8 if actual.dtype == torch.bfloat16 else 1e-6)


def test_thread_count_does_not_change_results():
    gen = torch.Generator().manual_seed(2)
    ps, gs, ms, vs = make_tensors([100_003, 7, 65_537], gen)
    results = []
    nthreads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            state = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
            run_kernel(state[0], gs, state[1], state[2], 3, deltas=[0.1, INF, 0.0], weight_decay=0.2, decay="prox")
            results.append(state)
    finally:
        torch.set_num_threads(nthreads)
    for a, b in zip(results[0], results[1]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_result_independent_of_view_offsets(pdtype):
    """The same element gets bit-identical results whether it is in one big tensor or in views of odd sizes and
    offsets (vector body vs scalar remainder): partitions of different world sizes stay exactly consistent."""
    gen = torch.Generator().manual_seed(17)
    n = 3001
    p = (torch.randn(n, generator=gen)).to(pdtype)
    g = torch.randn(n, generator=gen) * 1e-2
    m = torch.randn(n, generator=gen) * 1e-3
    v = torch.rand(n, generator=gen) * 1e-4
    for decay in ("prox", "clip"):
        outs = []
        for cuts in ([], [1, 2, 3, 5, 8, 13, 50, 77, 1000, 1001, 2999]):
            bounds = [0, *cuts, n]
            state = [t.clone() for t in (p, m, v)]
            pieces = [[t[a:b] for a, b in zip(bounds[:-1], bounds[1:])] for t in (*state, g)]
            k = len(bounds) - 1
            kcpu.fused_adamhd_cpu_(pieces[0], pieces[3], pieces[1], pieces[2], step_sizes=[1e-2] * k,
                                   bc2_sqrts=[0.03] * k, deltas=[0.1] * k, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                   weight_decay=0.2, decay=decay, grad_scale=3.0)
            outs.append(state)
        for x, y in zip(*outs):
            assert torch.equal(x, y)


def test_parameters_in_place_and_version_bumped():
    p = torch.nn.Parameter(torch.randn(10))
    g, m, v = torch.randn(10) * 1e-2, torch.zeros(10), torch.zeros(10)
    before, ptr, ver = p.detach().clone(), p.data_ptr(), p._version
    kcpu.fused_adamhd_cpu_([p], [g], [m], [v], step_sizes=[1e-2], bc2_sqrts=[1.0], deltas=[0.1], lr=1e-2, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox")
    assert p.data_ptr() == ptr and p._version > ver and m._version > 0 and v._version > 0
    assert not torch.equal(p.detach(), before)


def test_argument_errors_and_empty():
    assert kcpu.fused_adamhd_cpu_([], [], [], [], step_sizes=[], bc2_sqrts=[], deltas=None, lr=1e-3, beta1=0.9,
                                  beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox") == 0
    p, g, m, v = torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4)
    kw = dict(step_sizes=[1e-3], bc2_sqrts=[1.0], deltas=[1.0], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.1)
    with pytest.raises(ValueError):
        kcpu.fused_adamhd_cpu_([p], [g], [m], [v], decay="l2", **kw)
    with pytest.raises(ValueError):
        kcpu.fused_adamhd_cpu_([p], [g], [m], [v], decay="prox", **{**kw, "deltas": None})
    with pytest.raises(ValueError):
        kcpu.fused_adamhd_cpu_([p], [g], [m], [v], decay="prox", **{**kw, "step_sizes": [1e-3, 1e-3]})
    with pytest.raises(RuntimeError):
        kcpu.fused_adamhd_cpu_([p], [torch.zeros(5)], [m], [v], decay="prox", **kw)
    with pytest.raises(RuntimeError):
        kcpu.fused_adamhd_cpu_([p.double()], [g], [m], [v], decay="prox", **kw)
    with pytest.raises(RuntimeError):
        kcpu.fused_adamhd_cpu_([torch.zeros(4, 2).t()], [g.view(4, 1).expand(4, 2).t()], [m], [v], decay="prox", **kw)
    # weight_decay == 0: deltas may be None
    kcpu.fused_adamhd_cpu_([p], [g], [m], [v], decay="clip", **{**kw, "deltas": None, "weight_decay": 0.0})


# ----------------------------------------------------------------------------------------------------------------
# Layer statistic Σ|x|: layer_abs_sums_cpu and the update's abs_sums_out.
# ----------------------------------------------------------------------------------------------------------------
SUM_SIZES = [1, 7, 2047, 2048, 2049, 10000]


def spread(n, gen, dtype=torch.float32):
    """Values over many binades (so the summation order shows in the last bits), both signs."""
    x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp2(torch.randint(-40, 41, (n,), generator=gen))
    return x.to(dtype)


def ordered_abs_sum(x):
    """The documented summation order, emulated with float64 torch ops: blocks of SUM_BLOCK from the tensor's start,
    sub-blocks of SUM_SUB; lane l = i % 32 of a sub-block sums its 8 values |x| * 2**-4 in float32 (each step
    fl32(s + y): the kernel's fma adds the exact y and rounds once; here s + y is formed in float64 and rounded to
    float32, which is the same correctly rounded result because 53 >= 2 * 24 + 2, so the double rounding is innocuous);
    then 16 * s is added into float64 lanes sub-block by sub-block, the lanes are combined by the fixed tree and the
    block partials added in order."""
    B, S, L = kcpu.SUM_BLOCK, kcpu.SUM_SUB, kcpu.SUM_LANES
    a = x.detach().reshape(-1).double().abs()
    n = a.numel()
    if n == 0:
        return 0.0
    nb = -(-n // B)
    a = torch.cat([a, a.new_zeros(nb * B - n)]).view(nb, B // S, S // L, L)  # zero padding changes no sum
    y = a * 2.0**-4  # exact (no test value is below 2**-122)
    s = torch.zeros(nb, B // S, L, dtype=torch.float64)
    for r in range(S // L):
        s = (s + y[:, :, r, :]).float().double()  # fl32(s + y)
    lanes = torch.zeros(nb, L, dtype=torch.float64)
    for k in range(B // S):
        lanes = lanes + 16.0 * s[:, k, :]
    t = (lanes[:, 0:8] + lanes[:, 8:16]) + (lanes[:, 16:24] + lanes[:, 24:32])
    parts = ((t[:, 0] + t[:, 4]) + (t[:, 2] + t[:, 6])) + ((t[:, 1] + t[:, 5]) + (t[:, 3] + t[:, 7]))
    total = 0.0
    for part in parts.tolist():
        total += part
    return total


def bits(t):
    return t.view(torch.int64)


def test_sum_constants_match_the_kernel():
    mod = kcpu.load()
    assert (mod.SUM_BLOCK, mod.SUM_SUB, mod.SUM_LANES) == (kcpu.SUM_BLOCK, kcpu.SUM_SUB, kcpu.SUM_LANES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_abs_sums_matches_float64_reference(dtype):
    gen = torch.Generator().manual_seed(31)
    sizes = [0, *SUM_SIZES, 31, 32, 33, 100_003]
    ts = [spread(n, gen, dtype) for n in sizes]
    out = kcpu.layer_abs_sums_cpu(ts)
    assert out.dtype == torch.float64 and out.shape == (len(ts),) and out.device.type == "cpu"
    for t, s in zip(ts, out.tolist()):
        ref = math.fsum(t.double().abs().tolist())  # exact sum, correctly rounded
        assert abs(s - ref) <= kcpu.SUM_REL_ERROR * ref, (t.numel(), s, ref)  # the documented bound
        assert s == ordered_abs_sum(t)  # bit for bit the documented order
    assert out[0].item() == 0.0
    assert kcpu.layer_abs_sums_cpu([]).shape == (0,)
    # integers: every order is exact
    ints = [torch.arange(-n // 2, n - n // 2, dtype=torch.float32).to(dtype) for n in (5, 3000)]
    assert kcpu.layer_abs_sums_cpu(ints).tolist() == [t.double().abs().sum().item() for t in ints]


def test_layer_abs_sums_error_bound_is_attained_not_exceeded():
    """The worst case of the float32 lane sums: each lane starts at 2**27 / 16 = 2**23 (fp32 ulp 1) and its 7 other
    values add 0.5 - 2**-25 each, every addition rounding back down: relative error 7 * 2**-24 / (1 + ...) — close to
    the documented bound, and within it. And sums of values near FLT_MAX stay finite (the factor 2**-4)."""
    n = 64 * 2048
    x = torch.full((n,), 8.0 - 2.0**-21, dtype=torch.float32)
    x.view(-1, kcpu.SUM_SUB)[:, :kcpu.SUM_LANES] = 2.0**27
    ref = math.fsum(x.double().tolist())
    s = kcpu.layer_abs_sums_cpu([x]).item()
    assert s == n // 8 * 2.0**27  # every small value lost
    assert 4.1e-7 * ref < ref - s <= kcpu.SUM_REL_ERROR * ref
    huge = torch.full((5000,), 3.0e38, dtype=torch.float32)
    big = kcpu.layer_abs_sums_cpu([huge, huge.bfloat16()])
    assert math.isfinite(big[0].item()) and big[0].item() == pytest.approx(5000 * 3.0e38, rel=1e-6)
    assert math.isfinite(big[1].item())


def test_layer_abs_sums_nonfinite_and_errors():
    x = torch.ones(5000)
    y = x.clone()
    y[4000] = -math.inf
    z = x.clone()
    z[3] = math.nan
    out = kcpu.layer_abs_sums_cpu([x, y, z, y.bfloat16()])
    assert out[0] == 5000 and out[1] == math.inf and math.isnan(out[2]) and out[3] == math.inf
    with pytest.raises(RuntimeError):
        kcpu.layer_abs_sums_cpu([torch.zeros(4, dtype=torch.float64)])
    with pytest.raises(RuntimeError):
        kcpu.layer_abs_sums_cpu([torch.zeros(4, 2).t()])


def make_views(sizes, offsets, gen, *, pdtype, poison=True):
    """p, g, m, v as views into flat buffers, view i starting `offsets[i]` elements after the end of view i - 1;
    some gradients non-finite."""
    total = sum(sizes) + sum(offsets) + 3
    flat_p = spread(total, gen, pdtype)
    flat_g = torch.randn(total, generator=gen) * 1e-2
    flat_m = torch.randn(total, generator=gen) * 1e-3
    flat_v = torch.rand(total, generator=gen) * 1e-4
    views = [[], [], [], []]
    off = 0
    for n, gap in zip(sizes, offsets):
        off += gap
        for lst, f in zip(views, (flat_p, flat_g, flat_m, flat_v)):
            lst.append(f.narrow(0, off, n))
        off += n
    if poison:
        for i, g in enumerate(views[1]):
            idx = torch.randint(0, g.numel(), (max(1, g.numel() // 500),), generator=gen)
            g[idx] = torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(idx.numel()) % 3]
    return views


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", ["prox", "clip"])
def test_abs_sums_out_bitwise_equals_layer_abs_sums_after_update(pdtype, decay):
    gen = torch.Generator().manual_seed(41)
    sizes = SUM_SIZES + [70_001]
    p, g, m, v = make_views(sizes, [1, 3, 5, 0, 7, 2, 1], gen, pdtype=pdtype)
    k = len(sizes)
    out = torch.full((k,), -1.0, dtype=torch.float64)
    for t in (1, 2, 3):
        olds = [x.clone() for x in p]
        bad = run_kernel(p, g, m, v, t, deltas=[0.1, INF, 0.0, 1.0, 0.01, 0.5, 0.2][:k], weight_decay=0.3,
                         decay=decay, grad_scale=2.0, abs_sums_out=out)
        assert bad > 0
        assert torch.equal(bits(out), bits(kcpu.layer_abs_sums_cpu(p)))
        for i in range(k):
            assert out[i].item() == ordered_abs_sum(p[i])
            fin = torch.isfinite(g[i])
            assert torch.equal(p[i][~fin], olds[i][~fin])  # the masked elements kept (and were summed) as stored


def test_abs_sums_out_does_not_change_the_update_and_handles_empty():
    gen = torch.Generator().manual_seed(43)
    sizes = [2049, 0, 10000, 7]
    results = []
    for want in (False, True):
        gen.manual_seed(43)
        ps, gs, ms, vs = make_tensors(sizes, gen, pdtype=torch.bfloat16)
        out = torch.full((len(sizes),), -1.0, dtype=torch.float64) if want else None
        run_kernel(ps, gs, ms, vs, 1, deltas=[0.1] * 4, weight_decay=0.1, decay="prox", abs_sums_out=out)
        results.append((ps, ms, vs, out))
    for a, b in zip(results[0][:3], results[1][:3]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    out = results[1][3]
    assert out[1].item() == 0.0
    assert torch.equal(bits(out), bits(kcpu.layer_abs_sums_cpu(results[1][0])))


def test_abs_sums_out_argument_errors():
    ps, gs, ms, vs = ([torch.zeros(4), torch.zeros(3)] for _ in range(4))
    kw = dict(step_sizes=[1e-3] * 2, bc2_sqrts=[1.0] * 2, deltas=[1.0] * 2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.1, decay="prox")
    f64 = torch.float64
    for bad in (torch.zeros(2), torch.zeros(3, dtype=f64), torch.zeros(4, dtype=f64)[::2], torch.zeros(1, 2, dtype=f64),
                [0.0, 0.0]):
        with pytest.raises(ValueError):
            kcpu.fused_adamhd_cpu_(ps, gs, ms, vs, abs_sums_out=bad, **kw)
    out = torch.zeros(2, dtype=f64)
    kcpu.fused_adamhd_cpu_(ps, gs, ms, vs, abs_sums_out=out, **kw)
    assert out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_abs_sums_independent_of_address(dtype):
    """The same values at different offsets in a buffer (different alignment, vector peeling) or in their own
    allocation give bit-identical sums, from layer_abs_sums_cpu and from the update's abs_sums_out."""
    gen = torch.Generator().manual_seed(47)
    sizes = SUM_SIZES + [100_003]
    vals = [spread(n, gen, dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen) * 1e-2 for n in sizes]
    sums, outs = [], []
    for start in (0, 1, 3, 5, None):
        if start is None:  # separate allocations
            ts = [x.clone() for x in vals]
        else:
            buf = torch.zeros(start + sum(sizes) + 8, dtype=dtype)
            ts = list(buf.narrow(0, start, sum(sizes)).split(sizes))
            for t, x in zip(ts, vals):
                t.copy_(x)
        sums.append(kcpu.layer_abs_sums_cpu(ts))
        ms = [torch.zeros(n) for n in sizes]
        vs = [torch.zeros(n) for n in sizes]
        out = torch.empty(len(sizes), dtype=torch.float64)
        run_kernel(ts, grads, ms, vs, 1, deltas=[0.1] * len(sizes), weight_decay=0.1, decay="clip", abs_sums_out=out)
        outs.append(out)
    for s in sums[1:]:
        assert torch.equal(bits(s), bits(sums[0]))
    for o in outs[1:]:
        assert torch.equal(bits(o), bits(outs[0]))
    if dtype == torch.float32:  # the data are order-sensitive (the test has teeth): the reversed tensor sums otherwise
        # (bf16 values, 8 significant bits, mostly sum exactly in double: any order gives the same bits)
        assert kcpu.layer_abs_sums_cpu([vals[-1].flip(0)]).item() != sums[0][-1].item()


def test_abs_sums_independent_of_thread_count():
    gen = torch.Generator().manual_seed(53)
    sizes = [300_001, 7, 2049, 1, 150_000]
    vals = {dt: [spread(n, gen, dt) for n in sizes] for dt in (torch.float32, torch.bfloat16)}
    grads = [torch.randn(n, generator=gen) * 1e-2 for n in sizes]
    grads[0][[5, 200_000]] = math.nan
    results = []
    nthreads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            r = []
            for dt, ts in vals.items():
                r.append(kcpu.layer_abs_sums_cpu(ts))
                ps = [t.clone() for t in ts]
                out = torch.empty(len(sizes), dtype=torch.float64)
                run_kernel(ps, grads, [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes], 1,
                           deltas=[0.05] * len(sizes), weight_decay=0.2, decay="prox", abs_sums_out=out)
                r.append(out)
                r.append(kcpu.layer_abs_sums_cpu(ps))
            results.append(r)
    finally:
        torch.set_num_threads(nthreads)
    assert torch.get_num_threads() == nthreads
    for a, b in zip(*results):
        assert torch.equal(bits(a), bits(b))
    for r in results:  # abs_sums_out == layer_abs_sums_cpu after the update, per dtype
        assert torch.equal(bits(r[1]), bits(r[2])) and torch.equal(bits(r[4]), bits(r[5]))


# ----------------------------------------------------------------------------------------------------------------
# Property: the prox step moves x_tilde (the post-Adam value) by at most tau*delta and never flips its sign.
# ----------------------------------------------------------------------------------------------------------------
finite_f32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(finite_f32, min_size=1, max_size=40),
    gseed=st.integers(0, 2**31 - 1),
    lr=st.floats(1e-5, 1.0),
    wd=st.floats(1e-4, 10.0),
    delta=st.one_of(st.just(0.0), st.just(INF), st.floats(1e-6, 1e6)),
    step_size=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)),
)
def test_prox_property(xs, gseed, lr, wd, delta, step_size):
    n = len(xs)
    gen = torch.Generator().manual_seed(gseed)
    p0 = torch.tensor(xs, dtype=torch.float32)
    g = torch.randn(n, generator=gen)
    m0 = torch.randn(n, generator=gen) * 0.1
    v0 = torch.rand(n, generator=gen) * 0.1
    common = dict(step_sizes=[step_size], bc2_sqrts=[0.5], deltas=[delta], lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  decay="prox")
    x_tilde = p0.clone()
    kcpu.fused_adamhd_cpu_([x_tilde], [g], [m0.clone()], [v0.clone()], weight_decay=0.0, **common)
    x_new = p0.clone()
    kcpu.fused_adamhd_cpu_([x_new], [g], [m0.clone()], [v0.clone()], weight_decay=wd, **common)
    tau = lr * wd
    xt, xn = x_tilde.double(), x_new.double()
    assert torch.isfinite(xn).all()
    moved = (xn - xt).abs()
    bound = torch.minimum(tau * torch.full_like(xt, delta), tau / (1 + tau) * xt.abs())
    assert (moved <= bound * (1 + 1e-5) + 4 * 2.0**-24 * xt.abs() + 4 * 2.0**-149).all()  # + fp32 rounding
    assert ((xn * xt) >= 0).all()  # no sign flip
    if delta == 0.0:
        assert torch.equal(x_new, x_tilde)
