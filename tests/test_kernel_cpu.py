"""Tests of the fused CPU AdamHD kernel (adamhd_dist.kernels.cpu) against an independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from adamhd_dist.kernels import cpu as kcpu

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not kcpu.available(), reason="CPU kernel cannot be built here (no compiler?)")

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
def test_available_and_module():
    assert kcpu.available() is True
    assert kcpu.available() is True  # cached
    mod = kcpu.load()
    assert hasattr(mod, "adamhd_step")
    assert kcpu.load() is mod


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
