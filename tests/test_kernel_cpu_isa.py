"""The CPU kernel's instruction-set option (ADAMHD_CPU_ISA): which flags each choice compiles with on x86 and on other
machines, the default, the refusals; and that every build this CPU can execute computes the same bits."""

from __future__ import annotations

import math

import pytest
import torch

from adamhd_dist.optim.kernels import cpu as kcpu

# /proc/cpuinfo flags of the machines the option is for: a Zen 2 EPYC (AVX2, FMA, no AVX-512) and an Ice Lake Xeon
ZEN2 = set("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 abm movbe xsave popcnt aes".split())
ICELAKE = ZEN2 | set("avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni".split())
OLD_X86 = set("fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx".split())


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_flags(machine):
    assert kcpu.isa_flags("avx2", machine) == ["-march=x86-64-v3"]
    assert kcpu.isa_flags("avx512", machine) == ["-march=x86-64-v4"]
    assert kcpu.isa_flags("native", machine) == ["-march=native"]
    assert kcpu.isa_flags("generic", machine) == ["-DADAMHD_PORTABLE"]


@pytest.mark.parametrize("machine,native", [("aarch64", "-mcpu=native"), ("arm64", "-mcpu=native"),
                                            ("ppc64le", "-mcpu=native"), ("riscv64", "-march=native")])
def test_other_machines_build_portable_code(machine, native):
    assert kcpu.default_isa(machine) == "generic"
    assert kcpu.isa_flags("generic", machine) == ["-DADAMHD_PORTABLE"]  # no intrinsics, no target flags
    assert kcpu.isa_flags("native", machine) == [native]
    for isa in ("avx2", "avx512"):
        with pytest.raises(ValueError, match=f"ADAMHD_CPU_ISA={isa}: an x86 instruction set, and this machine is"):
            kcpu.isa_flags(isa, machine)
        assert kcpu.missing_cpu_features(isa, set(), machine) == [f"an x86 CPU (this is {machine})"]
    assert kcpu.runnable_isas(machine) == ["generic", "native"]


def test_default_is_the_widest_level_the_cpu_runs(monkeypatch):
    assert kcpu.default_isa("x86_64", ICELAKE) == "avx512"
    assert kcpu.default_isa("x86_64", ZEN2) == "avx2"
    assert kcpu.default_isa("x86_64", OLD_X86) == "generic"
    monkeypatch.setattr(kcpu, "cpu_flags", lambda: None)  # flags unreadable: let the compiler pick
    assert kcpu.default_isa("x86_64") == "native"


def test_missing_features_and_runnable_isas():
    assert kcpu.missing_cpu_features("avx2", ZEN2, "x86_64") == []
    assert kcpu.missing_cpu_features("avx512", ZEN2, "x86_64") == ["avx512f", "avx512bw", "avx512cd", "avx512dq",
                                                                    "avx512vl"]
    assert kcpu.missing_cpu_features("avx2", ZEN2 - {"fma"}, "x86_64") == ["fma"]
    assert kcpu.missing_cpu_features("generic", set(), "x86_64") == []
    assert kcpu.runnable_isas("x86_64", ZEN2) == ["generic", "avx2", "native"]
    assert kcpu.runnable_isas("x86_64", ICELAKE) == ["generic", "avx2", "avx512", "native"]


def test_the_variable_is_validated(monkeypatch):
    monkeypatch.delenv(kcpu.ISA_ENV, raising=False)
    assert kcpu.selected_isa() == kcpu.default_isa()
    monkeypatch.setenv(kcpu.ISA_ENV, " AVX2 ")
    assert kcpu.selected_isa() == "avx2"
    monkeypatch.setenv(kcpu.ISA_ENV, "sse4")
    msg = "ADAMHD_CPU_ISA='sse4': expected one of generic, avx2, avx512, native"
    with pytest.raises(ValueError, match=msg):
        kcpu.selected_isa()
    with pytest.raises(ValueError, match=msg):  # a setting to fix, not a kernel that silently goes missing
        kcpu.available()
    with pytest.raises(ValueError, match=msg):
        kcpu.load()


def test_an_isa_the_cpu_cannot_execute_is_refused_before_building(monkeypatch):
    from torch.utils import cpp_extension

    def no_build(**kw):
        raise AssertionError("nothing may be compiled for an ISA the CPU cannot run")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(kcpu, "cpu_flags", lambda: set(ZEN2))
    monkeypatch.setattr(kcpu, "_modules", {})
    monkeypatch.setattr(kcpu, "_machine", lambda machine=None: "x86_64")
    with pytest.raises(ValueError, match=r"ADAMHD_CPU_ISA=avx512: this CPU cannot execute it \(it lacks avx512f, "
                                         r"avx512bw, avx512cd, avx512dq, avx512vl\); choose one of generic, avx2, "
                                         r"native"):
        kcpu.load("avx512")
    monkeypatch.setenv(kcpu.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match="this CPU cannot execute it"):
        kcpu.available()


# ----------------------------------------------------------------------------------------------------------------
# Every build the machine runs: the same bits.
# ----------------------------------------------------------------------------------------------------------------
BUILDS = [i for i in ("generic", "avx2", "avx512") if not kcpu.missing_cpu_features(i)]


def _case(gen, pdtype, sdtype, gdtype):
    sizes = [1, 255, 256, 257, 2048, 5000, 33_000]
    ps = [(torch.randn(n, generator=gen) * torch.exp2(torch.randint(-8, 9, (n,), generator=gen))).to(pdtype)
          for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 1e-2).to(gdtype) for n in sizes]
    gs[4][[0, 300]] = math.nan
    gs[6][[5000, 31_999]] = torch.tensor([math.inf, -math.inf]).to(gdtype)
    gs[5][4000] = 3.0e38  # overflows when divided by grad_scale 0.5
    ms = [(torch.randn(n, generator=gen) * 1e-3).to(sdtype) for n in sizes]
    vs = [(torch.rand(n, generator=gen) * 1e-4).to(sdtype) for n in sizes]
    return ps, gs, ms, vs


@pytest.mark.skipif(len(BUILDS) < 2, reason="platform: this CPU executes only the generic build")
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16p", "bf16"])
def test_every_build_computes_the_same_bits(dtypes, monkeypatch):
    outs = {}
    for isa in BUILDS:
        monkeypatch.setenv(kcpu.ISA_ENV, isa)
        ps, gs, ms, vs = _case(torch.Generator().manual_seed(3), *dtypes)
        n = len(ps)
        sums = torch.empty(n, dtype=torch.float64)
        vms = [v * 2.0 for v in vs]  # amsgrad's running maxima, some above and some below the next v
        for vm in vms[::2]:
            vm.mul_(0.25)
        res = []
        for decay, wd, scale, beta1, ams in (("prox", 0.1, None, 0.9, False), ("clip", 0.1, 0.5, 0.9, False),
                                             ("prox", 0.0, None, 0.3, False), ("prox", 0.1, 0.5, 0.9, True)):
            bad = kcpu.fused_adamhd_cpu_(ps, gs, ms, vs, step_sizes=[1e-2] * n, bc2_sqrts=[0.3] * n,
                                         deltas=[0.05, 0.0, math.inf, 0.01, 0.2, 1.0, 0.5], lr=1e-2, beta1=beta1,
                                         beta2=0.999, eps=1e-8, weight_decay=wd, decay=decay, grad_scale=scale,
                                         abs_sums_out=sums, max_exp_avg_sqs=vms if ams else None)
            res.append((bad, sums.clone(), [t.clone() for t in (*ps, *ms, *vs, *vms)]))
        res.append(kcpu.layer_abs_sums_cpu(gs))
        outs[isa] = (kcpu.load().__name__, res)
    names = {name for name, _ in outs.values()}
    assert len(names) == len(BUILDS)  # one extension per ISA, all loaded in this process
    ref = outs["generic"][1]
    for isa in BUILDS[1:]:
        res = outs[isa][1]
        for (bad_a, sums_a, ts_a), (bad_b, sums_b, ts_b) in zip(ref[:-1], res[:-1]):
            assert bad_a == bad_b > 0
            assert torch.equal(sums_a.view(torch.int64), sums_b.view(torch.int64)), isa
            for a, b in zip(ts_a, ts_b):
                iv = torch.int32 if a.dtype == torch.float32 else torch.int16
                assert torch.equal(a.view(iv), b.view(iv)), isa
        nan = torch.isnan(ref[-1])
        assert torch.equal(nan, torch.isnan(res[-1]))
        assert torch.equal(ref[-1][~nan].view(torch.int64), res[-1][~nan].view(torch.int64)), isa


def test_tensor_subclasses_never_reach_native_code():
    """The kernel reads raw storage: a tensor subclass (a DTensor, a fake or functional tensor has no storage of its
    data) is refused with a message, not handed to native code."""
    import torch

    class Wrapped(torch.Tensor):
        pass

    plain = [torch.zeros(8) for _ in range(4)]
    sub = torch.zeros(8).as_subclass(Wrapped)
    with pytest.raises(TypeError, match=r"params\[0\].*Wrapped"):
        kcpu.fused_adamhd_cpu_([sub], *([t] for t in plain[1:]), step_sizes=[1e-3], bc2_sqrts=[1.0], deltas=None,
                               lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decay="prox")
    with pytest.raises(TypeError, match=r"tensors\[1\].*Wrapped"):
        kcpu.layer_abs_sums_cpu([plain[0], sub])
