"""The Triton kernels (adamhd_dist.optim.kernels.triton_adamhd), run on CPU tensors by the Triton interpreter.

Checked against an independent float64 reference written here from the update formulas.

The interpreter is chosen when a kernel is decorated (``TRITON_INTERPRET`` read by ``triton.jit``). So that this
module does not turn the package's own kernels into interpreted ones for the rest of a test session (on a GPU
machine other tests want the compiled ones), it runs a private copy of the kernel module, loaded with the variable
set, and sets the variable only while its own tests run.
"""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere by this module

import importlib.util  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _restore_env():
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


try:
    import triton  # noqa: F401  (the test extra pins it: a missing triton is an install error, not a skip)
except ImportError as e:
    raise ImportError("triton is not installed: install the project's test extra (make install)") from e
finally:
    _restore_env()

# The interpreter evaluates inf/NaN lanes with numpy, which warns; the kernels handle those lanes.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _load_interpreted_copy():
    origin = importlib.util.find_spec("adamhd_dist.optim.kernels.triton_adamhd").origin  # imports the package normally
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_adamhd_triton_interpreted", origin)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        _restore_env()
    return mod


_MOD = _load_interpreted_copy()


@pytest.fixture(scope="module", autouse=True)
def _interpret_env():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_env()


@pytest.fixture
def K():
    """The (private, interpreted) kernel module."""
    assert _MOD.available()
    assert type(_MOD._adamhd_kernel).__name__ == "InterpretedFunction"
    return _MOD


SIZES = [1, 7, 33, 1000, 4099]
DELTAS = [float("inf"), 0.0, 0.5, 0.01, 2.0]
LR, B1, B2, EPS = 1e-2, 0.9, 0.99, 1e-8


# ------------------------------------------------------------------------------------------------------------------
# Reference (float64, straight from the formulas)
# ------------------------------------------------------------------------------------------------------------------
def ref_step(p, g, m, v, *, step_size, bc2_sqrt, delta, lr, beta1, beta2, eps, weight_decay, decay, scale=None):
    p, g, m, v = (t.double() for t in (p, g, m, v))
    if scale is not None:
        g = g / scale
    tau = lr * weight_decay
    m2 = m + (1 - beta1) * (g - m)
    v2 = beta2 * v + (1 - beta2) * g * g
    denom = v2.sqrt() / bc2_sqrt + eps
    x = p.clone()
    if weight_decay != 0 and decay == "clip":
        x = x - tau * x.clamp(-delta, delta)
    x = x - step_size * (m2 / denom)
    if weight_decay != 0 and decay == "prox":
        x = x - tau * (x / (1 + tau)).clamp(-delta, delta)
    ok = torch.isfinite(g)
    # magnitudes of the terms summed (fp32 rounding error is relative to these, not to a cancelled result)
    mag_m = m.abs() + (1 - beta1) * (g - m).abs()
    mag_p = p.abs() + step_size * (m2 / denom).abs()
    mags = (torch.where(ok, mag_p, 0), torch.where(ok, mag_m, 0))
    return torch.where(ok, x, p), torch.where(ok, m2, m), torch.where(ok, v2, v), int((~ok).sum()), mags


def make(sizes, pdt=torch.float32, gdt=None, sdt=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gdt = gdt or pdt
    ps = [torch.randn(n, generator=gen).to(pdt) for n in sizes]
    gs = [torch.randn(n, generator=gen).to(gdt) for n in sizes]
    ms = [(0.1 * torch.randn(n, generator=gen)).to(sdt) for n in sizes]
    vs = [(0.01 * torch.rand(n, generator=gen)).to(sdt) for n in sizes]
    return ps, gs, ms, vs


def scalars(step, n, lr=LR):
    step_sizes = torch.tensor([lr / (1 - B1 ** (step + i)) for i in range(n)], dtype=torch.float32)
    bc2 = torch.tensor([math.sqrt(1 - B2 ** (step + i)) for i in range(n)], dtype=torch.float32)
    return step_sizes, bc2


def check_close(got, want, dtype, what, mag=None):
    """fp32: ~1e-6 relative (to the result, or to the magnitude of the summed terms where they cancel);
    bf16/fp16: within one ulp of the storage dtype, and nearly always exact."""
    want_r = want.to(dtype)
    mag = torch.zeros_like(want) if mag is None else mag.nan_to_num(0.0)
    err = (got.double() - want).abs()
    if dtype == torch.float32:
        tol = 1e-6 * (want.abs() + mag) + 1e-30
    else:
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        err = (got.double() - want_r.double()).abs()
        tol = ulp * want.abs() + 1e-6 * mag + 1e-30
        assert (got == want_r).double().mean().item() >= 0.98, what
    finite = torch.isfinite(want)
    assert torch.equal(got.double()[~finite], want[~finite]) or not (~finite).any(), what
    worst = (err - tol)[finite].max().item() if finite.any() else 0.0
    assert worst <= 0, f"{what}: max excess error {worst:.3g}"


def run_and_check(K, ps, gs, ms, vs, *, step, decay, wd, deltas, scale=None, lr=LR, nonfinite=None):
    """One kernel step, checked against the reference run from the same state (errors do not compound over the
    steps of a test, and low-precision storage is compared one rounding at a time). Returns the non-finite count."""
    n = len(ps)
    ss, bc = scalars(step, n, lr)
    dl = torch.tensor(deltas, dtype=torch.float32) if deltas is not None else None
    before = [(p.clone(), g.clone(), m.clone(), v.clone()) for p, g, m, v in zip(ps, gs, ms, vs)]
    K.fused_adamhd_triton_(
        ps, gs, ms, vs, step_sizes=ss, bc2_sqrts=bc, deltas=dl, lr=lr, beta1=B1, beta2=B2, eps=EPS,
        weight_decay=wd, decay=decay, grad_scale=None if scale is None else torch.tensor(scale, dtype=torch.float32),
        nonfinite=nonfinite,
    )
    bad = 0
    for i, (p0, g0, m0, v0) in enumerate(before):
        # the reference sees exactly the fp32 scalars the kernel got
        rp, rm, rv, nb, (mag_p, mag_m) = ref_step(
            p0, g0, m0, v0, step_size=ss[i].item(), bc2_sqrt=bc[i].item(),
            delta=dl[i].item() if dl is not None else 0.0, lr=lr, beta1=B1, beta2=B2, eps=EPS,
            weight_decay=wd, decay=decay, scale=scale,
        )
        bad += nb
        check_close(ps[i], rp, ps[i].dtype, f"p[{i}] size {p0.numel()}", mag_p)
        check_close(ms[i], rm, ms[i].dtype, f"m[{i}]", mag_m)
        check_close(vs[i], rv, vs[i].dtype, f"v[{i}]")
        torch.testing.assert_close(gs[i], g0, rtol=0, atol=0, equal_nan=True, msg="grads must not be modified")
    return bad


class CountLaunches:
    """Wraps a jitted kernel: records the grid and the keyword arguments of every ``kernel[grid](...)`` launch."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.kwargs = kernel, [], []

    def __getitem__(self, grid):
        self.grids.append(grid)
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.kwargs.append(kwargs)
            return launch(*args, **kwargs)

        return run


def n_chunks(K, sizes):
    return sum((n + K.CHUNK - 1) // K.CHUNK for n in sizes)


# ------------------------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", ["prox", "clip"])
@pytest.mark.parametrize("wd", [0.0, 0.3])
@pytest.mark.parametrize("scale", [None, 64.0])
def test_update_matches_reference(K, decay, wd, scale):
    ps, gs, ms, vs = make(SIZES, seed=1)
    if scale is not None:
        gs = [g * scale for g in gs]
    for step in range(1, 4):
        deltas = DELTAS if wd else None
        run_and_check(K, ps, gs, ms, vs, step=step, decay=decay, wd=wd, deltas=deltas, scale=scale)
        gs = [torch.randn_like(g) * (scale or 1.0) for g in gs]


def test_decay_effect_and_delta_extremes(K):
    """Zero grads and states: only the decay moves p. δ=inf: L2 (no NaN); δ=0: nothing; otherwise bounded by τδ."""
    sizes = [33, 33, 33]
    ps = [torch.randn(n) * 3 for n in sizes]
    p0 = [p.clone() for p in ps]
    gs = [torch.zeros(n) for n in sizes]
    ms = [torch.zeros(n) for n in sizes]
    vs = [torch.zeros(n) for n in sizes]
    lr, wd = 0.1, 0.5
    tau = lr * wd
    for decay in ("prox", "clip"):
        for p, q in zip(ps, p0):
            p.copy_(q)
        run_and_check(K, ps, gs, ms, vs, step=1, decay=decay, wd=wd, deltas=[float("inf"), 0.0, 0.2], lr=lr)
        assert torch.isfinite(ps[0]).all()
        want_l2 = p0[0] / (1 + tau) if decay == "prox" else p0[0] * (1 - tau)
        torch.testing.assert_close(ps[0], want_l2, rtol=1e-6, atol=1e-7)
        assert torch.equal(ps[1], p0[1])
        assert ((ps[2] - p0[2]).abs() <= tau * 0.2 + 1e-6 * p0[2].abs()).all()


@pytest.mark.parametrize(
    "pdt,gdt,sdt",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float16, torch.float16, torch.float32),
        (torch.float32, torch.float32, torch.bfloat16),
    ],
)
def test_low_precision_dtypes(K, pdt, gdt, sdt):
    ps, gs, ms, vs = make(SIZES, pdt=pdt, gdt=gdt, sdt=sdt, seed=2)
    for step in range(1, 3):
        run_and_check(K, ps, gs, ms, vs, step=step, decay="prox", wd=0.3, deltas=DELTAS, lr=0.05)
        gs = [torch.randn(g.shape).to(gdt) for g in gs]


def test_bf16_store_rounds_to_nearest_even(K):
    """p ← p·(1−τ) in fp32 (clip decay, δ=inf, zero moments), stored as bf16: bit-exact with torch's rounding."""
    n = 4099
    p = (torch.randn(n) * 10).to(torch.bfloat16)
    p0 = p.clone()
    g, m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n), torch.zeros(n)
    lr, wd = 0.1, 0.123
    tau32 = torch.tensor(lr * wd, dtype=torch.float32)
    K.fused_adamhd_triton_(
        [p], [g], [m], [v], step_sizes=torch.tensor([lr]), bc2_sqrts=torch.tensor([1.0]),
        deltas=torch.tensor([float("inf")]), lr=lr, beta1=B1, beta2=B2, eps=EPS, weight_decay=wd, decay="clip",
    )
    x = p0.float()
    want = (x - tau32 * x).to(torch.bfloat16)
    assert torch.equal(p, want)
    assert not torch.equal(p, (x - tau32 * x).view(torch.int32).bitwise_and(-65536).view(torch.float32)
                           .to(torch.bfloat16))  # i.e. not truncation


def test_bf16_store_ties_to_even(K):
    """β1=0.5, m=0: m ← g/2 exactly in fp32; g is built so that g/2 is halfway between two bf16 values."""
    n = 1000
    bits = (torch.randn(n) * 4).view(torch.int32)
    g = ((bits & -65536) | 0x8000).view(torch.float32)  # low 16 bits = 0x8000: an exact bf16 tie (×2 keeps it)
    p = torch.randn(n).to(torch.bfloat16)
    m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    K.fused_adamhd_triton_(
        [p], [g], [m], [v], step_sizes=torch.tensor([1e-3]), bc2_sqrts=torch.tensor([1.0]), deltas=None,
        lr=1e-3, beta1=0.5, beta2=B2, eps=EPS, weight_decay=0.0, decay="prox",
    )
    want = (0.5 * g).to(torch.bfloat16)
    assert torch.equal(m, want)
    assert not torch.equal(m, ((0.5 * g).view(torch.int32) + 0x8000).bitwise_and(-65536).view(torch.float32)
                           .to(torch.bfloat16))  # i.e. not round-half-away


def test_flat_buffer_views_one_launch(K, monkeypatch):
    """Views into ONE flat buffer (with gaps between them): one launch, all chunks, gaps untouched."""
    sizes = [7, 1000, 1, 4099, 33, 2 * 4096 + 5]
    gaps = [3, 1, 8, 2, 0, 9]  # the 7 and 4099 views start 16-byte aligned, the others do not
    total = sum(sizes) + sum(gaps) + 4
    gen = torch.Generator().manual_seed(3)
    flat_p, flat_g = torch.randn(total, generator=gen), torch.randn(total, generator=gen)
    flat_m, flat_v = 0.1 * torch.randn(total, generator=gen), 0.01 * torch.rand(total, generator=gen)
    orig = [t.clone() for t in (flat_p, flat_g, flat_m, flat_v)]
    views = [[], [], [], []]
    inside = torch.zeros(total, dtype=torch.bool)
    off = 4
    for n, gap in zip(sizes, gaps):
        for lst, flat in zip(views, (flat_p, flat_g, flat_m, flat_v)):
            lst.append(flat.narrow(0, off, n))
        inside[off:off + n] = True
        off += n + gap
    counter = CountLaunches(K._adamhd_kernel)
    monkeypatch.setattr(K, "_adamhd_kernel", counter)
    deltas = [float("inf"), 0.0, 0.5, 0.01, 2.0, 0.3]
    run_and_check(K, *views, step=1, decay="clip", wd=0.2, deltas=deltas)
    assert counter.grids == [(n_chunks(K, sizes),)]
    assert counter.kwargs[0]["ALIGN"] == 2  # mixed: per-tensor alignment flags
    for flat, o in zip((flat_p, flat_g, flat_m, flat_v), orig):
        assert torch.equal(flat[~inside], o[~inside])
    assert not torch.equal(flat_p[inside], orig[0][inside])


def test_separate_tensors_one_launch_and_grad_pointer_change(K, monkeypatch):
    counter = CountLaunches(K._adamhd_kernel)
    monkeypatch.setattr(K, "_adamhd_kernel", counter)
    ps, gs, ms, vs = make(SIZES, seed=4)
    run_and_check(K, ps, gs, ms, vs, step=1, decay="prox", wd=0.1, deltas=DELTAS)
    # new grad allocations (pointer tables are cached: the new pointers must be used), same params/states
    gs = [torch.randn(n) for n in SIZES]
    run_and_check(K, ps, gs, ms, vs, step=2, decay="prox", wd=0.1, deltas=DELTAS)
    assert counter.grids == [(n_chunks(K, SIZES),)] * 2
    assert [kw["ALIGN"] for kw in counter.kwargs] == [1, 1]  # separate allocations: all aligned


def test_all_misaligned_views(K, monkeypatch):
    counter = CountLaunches(K._adamhd_kernel)
    monkeypatch.setattr(K, "_adamhd_kernel", counter)
    sizes = [4097, 33, 4096]
    flats = make([sum(sizes) + 4], seed=10)
    views = [[], [], [], []]
    for lst, (flat,) in zip(views, flats):
        off = 1
        for n in sizes:
            lst.append(flat.narrow(0, off, n))
            off += n + (1 if off % 4 == 3 else 0)  # keep every start off a 16-byte boundary
    assert all(v.data_ptr() % 16 for v in views[0])
    run_and_check(K, *views, step=1, decay="prox", wd=0.2, deltas=[0.5, float("inf"), 0.01])
    assert counter.kwargs[0]["ALIGN"] == 0


def test_mixed_dtypes_one_launch_per_group(K, monkeypatch):
    counter = CountLaunches(K._adamhd_kernel)
    monkeypatch.setattr(K, "_adamhd_kernel", counter)
    a = make([7, 1000], seed=5)
    b = make([33, 4099], pdt=torch.bfloat16, seed=6)
    ps, gs, ms, vs = ([a[k][0], b[k][0], a[k][1], b[k][1]] for k in range(4))
    run_and_check(K, ps, gs, ms, vs, step=1, decay="clip", wd=0.1, deltas=[0.5, 0.01, float("inf"), 0.0])
    assert sorted(counter.grids) == sorted([(n_chunks(K, [7, 1000]),), (n_chunks(K, [33, 4099]),)])


@pytest.mark.parametrize("count_dtype", [torch.int32, torch.int64])
def test_nonfinite_grads_untouched_and_counted(K, count_dtype):
    ps, gs, ms, vs = make(SIZES, seed=7)
    gs[4][[0, 17, 4098]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    gs[2][5] = float("nan")
    gs[0][0] = float("inf")
    bad_mask = [~torch.isfinite(g) for g in gs]
    nf = torch.full((1,), 5, dtype=count_dtype)  # added to, not overwritten
    p0, m0, v0 = ([t.clone() for t in lst] for lst in (ps, ms, vs))
    bad = run_and_check(K, ps, gs, ms, vs, step=1, decay="prox", wd=0.1, deltas=DELTAS, scale=2.0, nonfinite=nf)
    assert bad == 5
    assert nf.item() == 5 + 5
    for i, bm in enumerate(bad_mask):
        assert torch.equal(ps[i][bm], p0[i][bm]) and torch.equal(ms[i][bm], m0[i][bm])
        assert torch.equal(vs[i][bm], v0[i][bm])
        assert (ps[i][~bm] != p0[i][~bm]).all()


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16])
def test_update_emits_next_statistic(K, pdt):
    """abs_sums: Σ|θ| of the STORED updated tensors from the same pass, equal to a separate read of them (the
    same per-chunk fp32 order as layer_abs_sums_triton: bitwise under the interpreter, which adds in order), also
    with non-finite grads (those elements keep their old θ) and with full, masked and empty chunks."""
    sizes = [1, 7, 4096, 4099, 0, 2 * 4096 + 5]
    ps, gs, ms, vs = make(sizes, pdt=pdt, seed=12)
    gs[3][[0, 4098]] = torch.tensor([float("nan"), float("inf")]).to(gs[3].dtype)
    ss, bc = scalars(3, len(sizes))
    sums = torch.full((len(sizes),), 123.0)  # overwritten, not added to
    K.fused_adamhd_triton_(ps, gs, ms, vs, step_sizes=ss, bc2_sqrts=bc, deltas=torch.full((len(sizes),), 0.05),
                           lr=LR, beta1=B1, beta2=B2, eps=EPS, weight_decay=0.2, decay="prox", abs_sums=sums)
    assert torch.equal(sums, K.layer_abs_sums_triton(ps))
    want = torch.stack([p.double().abs().sum() for p in ps])
    torch.testing.assert_close(sums.double(), want, rtol=1e-6, atol=0)
    assert sums[4].item() == 0.0


def test_update_statistic_mixed_dtypes(K):
    a = make([7, 4099], seed=13)
    b = make([33, 1000], pdt=torch.bfloat16, seed=14)
    ps, gs, ms, vs = ([a[k][0], b[k][0], a[k][1], b[k][1]] for k in range(4))
    ss, bc = scalars(1, 4)
    sums = torch.empty(4)
    K.fused_adamhd_triton_(ps, gs, ms, vs, step_sizes=ss, bc2_sqrts=bc, deltas=torch.full((4,), 0.5), lr=LR,
                           beta1=B1, beta2=B2, eps=EPS, weight_decay=0.1, decay="clip", abs_sums=sums)
    assert torch.equal(sums, K.layer_abs_sums_triton(ps))
    with pytest.raises(ValueError, match="abs_sums"):
        K.fused_adamhd_triton_(ps, gs, ms, vs, step_sizes=ss, bc2_sqrts=bc, deltas=torch.full((4,), 0.5), lr=LR,
                               beta1=B1, beta2=B2, eps=EPS, weight_decay=0.1, decay="clip",
                               abs_sums=torch.empty(3))


def test_validation(K):
    ps, gs, ms, vs = make([7, 33])
    kw = dict(step_sizes=torch.ones(2), bc2_sqrts=torch.ones(2), deltas=None, lr=LR, beta1=B1, beta2=B2, eps=EPS,
              weight_decay=0.1, decay="prox")
    with pytest.raises(ValueError):  # deltas required with weight decay
        K.fused_adamhd_triton_(ps, gs, ms, vs, **kw)
    kw["weight_decay"] = 0.0
    with pytest.raises(ValueError):
        K.fused_adamhd_triton_(ps, [gs[1], gs[0]], ms, vs, **kw)
    with pytest.raises(ValueError):
        K.fused_adamhd_triton_([torch.randn(7, 2).t()], [torch.randn(2, 7)], [torch.randn(2, 7)],
                               [torch.randn(2, 7)], **{**kw, "step_sizes": torch.ones(1), "bc2_sqrts": torch.ones(1)})
    with pytest.raises(ValueError):
        K.fused_adamhd_triton_(ps, gs, ms, vs, **{**kw, "decay": "l2"})
    K.fused_adamhd_triton_([], [], [], [], **kw)  # empty list: no-op


# ------------------------------------------------------------------------------------------------------------------
# Per-layer statistic
# ------------------------------------------------------------------------------------------------------------------
def test_layer_abs_sums(K, monkeypatch):
    counter = CountLaunches(K._abs_sum_kernel)
    monkeypatch.setattr(K, "_abs_sum_kernel", counter)
    sizes = [1, 7, 33, 1000, 4099, 3 * 4096]
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(n, generator=gen) * (i + 1) for i, n in enumerate(sizes)]
    got = K.layer_abs_sums_triton(xs)
    assert got.dtype == torch.float32 and got.shape == (len(sizes),)
    want = torch.stack([x.double().abs().sum() for x in xs])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert counter.grids == [(n_chunks(K, sizes),)]


def test_layer_abs_sums_views_and_dtypes(K):
    gen = torch.Generator().manual_seed(9)
    flat = torch.randn(10000, generator=gen)
    # misaligned and aligned views, each with a full chunk (ALIGN == 2 path), and an empty one
    xs = [flat.narrow(0, 1, 7), flat.narrow(0, 10, 4099), flat.narrow(0, 4200, 0), flat.narrow(0, 4300, 1000),
          flat.narrow(0, 5400, 4100)]
    got = K.layer_abs_sums_triton(xs)
    want = torch.stack([x.double().abs().sum() for x in xs])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    mixed = [torch.randn(33, generator=gen).to(torch.bfloat16), torch.randn(1000, generator=gen),
             torch.randn(4099, generator=gen).to(torch.float16)]
    got = K.layer_abs_sums_triton(mixed)
    want = torch.stack([x.double().abs().sum() for x in mixed])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert K.layer_abs_sums_triton([]).shape == (0,)
