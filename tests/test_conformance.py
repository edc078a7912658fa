"""AdamHD against torch.optim's own conventions, through torch's shipped optimizer test data.

AdamHD is registered like torch's AdamW entry in ``torch.testing._internal.common_optimizers`` (same inputs: amsgrad,
maximize, weight decay, tensor lr; each with foreach, fused and differentiable), and the generic properties torch's
optimizer tests check are asserted here: with the clip form and δ = inf every input steps exactly as AdamW; state
dict, deepcopy and pickle round trips are deterministic; hooks, param groups, schedulers, tensor lr, zero and None
gradients, complex parameters and the shared error checks behave as torch.optim's; a step that raises changes nothing.
"""

import copy
import math
import pickle

import pytest
import torch
from torch.optim import AdamW
from torch.optim.lr_scheduler import ExponentialLR, StepLR
from torch.testing._internal.common_optimizers import (OptimizerErrorEnum, OptimizerInfo,
                                                        _get_optim_inputs_including_global_cliquey_kwargs,
                                                        optim_error_inputs_func_adamw, optim_inputs_func_adamw)

from adamhd_dist import AdamHD

# AdamHD's settings under which it is AdamW: the explicit decay step, no threshold
AS_ADAMW = dict(decay="clip", delta_mode="constant", delta=math.inf)

ADAMHD_INFO = OptimizerInfo(
    AdamHD,
    optim_inputs_func=optim_inputs_func_adamw,
    optim_error_inputs_func=optim_error_inputs_func_adamw,
    supported_impls=("foreach", "differentiable", "fused"),
    supports_fused_on=("cpu",),
    has_capturable_arg=True,
)
INPUTS = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, ADAMHD_INFO)
IDS = [i.desc for i in INPUTS]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 4, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype))]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _run(cls, kwargs, steps=20, dtype=torch.float32, sched=False):
    params = _params(dtype)
    opt = cls(params, **copy.deepcopy(kwargs))
    s = StepLR(opt, step_size=5, gamma=0.5) if sched else None
    for t in range(steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()
        if s is not None:
            s.step()
    return params, opt


def _outcome(cls, kwargs, **kw):
    try:
        return _run(cls, kwargs, **kw), None
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return None, exc


@pytest.mark.parametrize("optim_input", INPUTS, ids=IDS)
def test_every_adamw_input_steps_as_adamw(optim_input):
    """torch's AdamW inputs (each also with foreach, fused and differentiable): 20 steps equal AdamW's, or both
    raise the same error (differentiable on leaf parameters)."""
    kw = optim_input.kwargs
    ref, ref_err = _outcome(AdamW, kw)
    got, got_err = _outcome(AdamHD, {**kw, **AS_ADAMW})
    if ref_err is not None:
        assert type(got_err) is type(ref_err) and str(got_err) == str(ref_err)
        return
    assert got_err is None, got_err
    for a, b in zip(ref[0], got[0]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for p, q in zip(ref[0], got[0]):
        for key, value in ref[1].state[p].items():
            torch.testing.assert_close(got[1].state[q][key], value, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("path", ["loop", "foreach"])
def test_complex_params_step_as_adamw(path, amsgrad):
    kw = dict(foreach=path == "foreach", weight_decay=0.1, amsgrad=amsgrad, maximize=amsgrad)
    ref, _ = _run(AdamW, kw, dtype=torch.complex64)
    got, opt = _run(AdamHD, {**kw, **AS_ADAMW}, dtype=torch.complex64)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_complex_statistic_is_the_real_views():
    """δ of a complex layer is c·mean over its real view (|Re| and |Im| as separate coordinates)."""
    z = torch.nn.Parameter(torch.randn(6, 3, dtype=torch.complex64))
    expected = 1.5 * torch.view_as_real(z.detach()).abs().double().mean().item()
    opt = AdamHD([z], weight_decay=0.1, delta_mode="mean_abs", delta_scale=1.5)
    z.grad = torch.randn_like(z)
    opt.step()
    assert opt.last_deltas()[z] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(), dict(amsgrad=True), dict(foreach=True), dict(fused=True)],
                         ids=["default", "amsgrad", "foreach", "fused"])
def test_state_dict_round_trips_are_deterministic(kwargs):
    """load_state_dict, deepcopy and pickle give back the same state_dict (no key added), and the copies step as
    the original."""
    params, opt = _run(AdamHD, dict(weight_decay=0.1, **kwargs), steps=3)
    sd = opt.state_dict()
    fresh = AdamHD(_params(), weight_decay=0.1, **kwargs)
    fresh.load_state_dict(copy.deepcopy(sd))
    for other in (fresh, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        osd = other.state_dict()
        assert osd["param_groups"] == sd["param_groups"]
        assert osd["state"].keys() == sd["state"].keys()
        for k in sd["state"]:
            assert osd["state"][k].keys() == sd["state"][k].keys()
            for key in sd["state"][k]:
                assert torch.equal(osd["state"][k][key], sd["state"][k][key])


def test_hooks_run_as_torchs():
    params = _params()
    opt = AdamHD(params)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sd["extra"] == 1
    sd.pop("extra")
    opt.load_state_dict(sd)
    assert seen == ["pre", "post", "sd_pre", "load_pre", "load_post"]


def test_param_groups_and_schedulers_as_adamw():
    """Two groups (one decayed), an added group, and a scheduler moving lr: as AdamW."""
    def run(cls, extra):
        a, b, c = _params() + [torch.nn.Parameter(torch.randn(2, 2, generator=torch.Generator().manual_seed(3)))]
        opt = cls([{"params": [a], "weight_decay": 0.3}, {"params": [b], "weight_decay": 0.0, "lr": 3e-3}],
                  lr=1e-2, **extra)
        sched = ExponentialLR(opt, gamma=0.9)
        for t in range(10):
            if t == 4:
                opt.add_param_group({"params": [c], "lr": 5e-3})
            ps = [a, b] + ([c] if t >= 4 else [])
            for p, g in zip(ps, _grads(ps, t)):
                p.grad = g
            opt.step()
            sched.step()
        return [a, b, c], [g["lr"] for g in opt.param_groups]
    ref, ref_lr = run(AdamW, {})
    got, got_lr = run(AdamHD, AS_ADAMW)
    assert got_lr == ref_lr
    for x, y in zip(ref, got):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["loop", "fused"])
def test_tensor_lr_with_scheduler_as_float_lr(path):
    kw = dict(foreach=False, fused=path == "fused")
    ref, _ = _run(AdamHD, dict(lr=0.01, **kw), sched=True)
    got, opt = _run(AdamHD, dict(lr=torch.tensor(0.01), **kw), sched=True)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_none_grads_are_skipped_and_zero_grads_step():
    a, b = _params()
    opt = AdamHD([a, b], weight_decay=0.1)
    before = b.detach().clone()
    a.grad = torch.zeros_like(a)
    opt.step()
    assert b not in opt.state and torch.equal(b, before)
    assert float(opt.state[a]["step"]) == 1.0
    opt.zero_grad()
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("error_input", optim_error_inputs_func_adamw("cpu", torch.float32),
                         ids=lambda e: e.optimizer_error_input.desc)
def test_torchs_error_inputs_raise_torchs_errors(error_input):
    inp = error_input.optimizer_error_input
    params = inp.params if inp.params is not None else _params()
    expect = pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises
    with expect(error_input.error_type, match=error_input.error_regex):
        opt = AdamHD(params, **inp.kwargs)
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _unchanged(opt, params, snap):
    ps, sd = snap
    assert all(torch.equal(p, q) for p, q in zip(params, ps))
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"] and now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        assert now["state"][k].keys() == st.keys()
        assert all(torch.equal(now["state"][k][key], v) for key, v in st.items())


def test_fused_step_on_meta_params_raises_and_changes_nothing():
    params = [torch.nn.Parameter(torch.empty(3, 4, device="meta"))]
    opt = AdamHD(params, fused=True)
    params[0].grad = torch.empty(3, 4, device="meta")
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("case", ["capturable_cpu", "differentiable_foreach", "kernel_raises"])
def test_a_step_that_raises_changes_nothing(case, monkeypatch):
    """Errors found before or during the update leave parameters, moments, step counters and μ as they were."""
    params = _params()
    kw = {"capturable_cpu": dict(capturable=True, foreach=False),
          "differentiable_foreach": dict(differentiable=True, foreach=True),
          "kernel_raises": dict(foreach=True)}[case]
    opt = AdamHD(params, weight_decay=0.1, **({} if case != "kernel_raises" else kw))
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()  # state and μ exist
    for group in opt.param_groups:
        group.update(kw)
    snap = _snapshot(opt, params)
    if case == "kernel_raises":
        import adamhd_dist.optim.functional as F

        def boom(*a, **k):
            raise RuntimeError("kernel failed")
        monkeypatch.setattr(F, "_multi_tensor_adamhd", boom)
    with pytest.raises((AssertionError, RuntimeError)):
        opt.step()
    _unchanged(opt, params, snap)


def test_a_moment_of_another_shape_is_refused_by_load_before_anything_changes():
    """torch.optim loads such a state and its next step fails part way through the update; AdamHD refuses it at
    load time, naming the tensor."""
    params = _params()
    opt = AdamHD(params, weight_decay=0.1)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][1]["exp_avg_sq"] = torch.zeros(7)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"parameter 1 \(key 1\) has exp_avg_sq of shape \(7,\), the parameter "
                                         r"has shape \(3,\)"):
        opt.load_state_dict(bad)
    _unchanged(opt, params, snap)


def test_a_missing_fused_kernel_is_found_before_an_earlier_group_steps(monkeypatch):
    """fp64 tensors take the foreach math inside fused=True and need no kernel: without the check up front the
    first group would step before the second group found the kernel missing."""
    from adamhd_dist.optim.kernels import cpu

    wide = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    narrow = _params()
    opt = AdamHD([{"params": wide}, {"params": narrow}], fused=True, weight_decay=0.1)
    for t in range(2):
        for p, g in zip(wide + narrow, _grads(wide + narrow, t)):
            p.grad = g
        if t == 0:
            opt.step()  # the real kernel: state and μ exist
    snap = _snapshot(opt, wide + narrow)

    def no_kernel(isa=None):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(cpu, "load", no_kernel)
    with pytest.raises(RuntimeError, match=r"fused=True: the CPU kernel is unavailable \(no C\+\+ compiler\)"):
        opt.step()
    _unchanged(opt, wide + narrow, snap)


def test_the_cpu_kernel_checks_every_tensor_before_it_writes_one():
    """What makes a fused step all or nothing within its call: a tensor the kernel refuses (here not contiguous)
    leaves the tensors before it in the list unwritten."""
    from adamhd_dist.optim.kernels import cpu

    p = [torch.randn(64), torch.randn(8, 8).t()]
    g = [torch.randn(64), torch.randn(8, 8).t()]
    m = [torch.zeros(64), torch.zeros(8, 8).t()]
    v = [torch.zeros(64), torch.zeros(8, 8).t()]
    before = [t.clone() for t in p + m + v]
    with pytest.raises(RuntimeError, match="tensor 1 is not contiguous"):
        cpu.fused_adamhd_cpu_(p, g, m, v, step_sizes=[1e-3] * 2, bc2_sqrts=[0.1] * 2, deltas=[1.0] * 2, lr=1e-3,
                              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox")
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, before))


def _kernel_calls(monkeypatch, backend):
    """Records, per call of the fused kernel (C++, or Triton run by its interpreter on CPU tensors), whether it
    was given the running maxima (amsgrad)."""
    import adamhd_dist.optim.functional as F
    from adamhd_dist.optim.kernels import cpu, triton_adamhd

    monkeypatch.setattr(F, "FUSED_CPU_BACKEND", backend)
    module, name = (cpu, "fused_adamhd_cpu_") if backend == "cpp" else (triton_adamhd, "fused_adamhd_triton_")
    calls, kernel = [], getattr(module, name)

    def spy(*a, **k):
        calls.append(k.get("max_exp_avg_sqs") is not None)
        return kernel(*a, **k)
    monkeypatch.setattr(module, name, spy)
    return calls


def _amsgrad_run(cls, kw, steps=10, bad_step=None):
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(37, 300, generator=g)), torch.nn.Parameter(torch.randn(5000, generator=g)),
              torch.nn.Parameter(torch.randn(3, generator=g))]
    opt = cls(params, lr=1e-2, amsgrad=True, **kw)
    for t in range(steps):
        for p in params:  # large then small gradients: v falls below its running maximum
            p.grad = torch.randn(p.shape, generator=g) * (3.0 if t % 4 == 0 else 0.1)
            if t == bad_step:
                p.grad.view(-1)[::97] = float("nan")
        opt.step()
    return params, opt


@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(weight_decay=0.0, maximize=True),
                                dict(weight_decay=0.1, maximize=True, capturable=True)],
                         ids=["decay", "maximize", "maximize_capturable"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_amsgrad_runs_in_the_kernel_as_adamw(kw, backend, monkeypatch):
    calls = _kernel_calls(monkeypatch, backend)
    ref, ropt = _amsgrad_run(AdamW, dict(kw, fused=True))
    calls.clear()  # AdamW's own fused step is torch's
    got, gopt = _amsgrad_run(AdamHD, dict(kw, fused=True, **AS_ADAMW))
    assert calls and all(calls)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        sa, sb = ropt.state[a], gopt.state[b]
        torch.testing.assert_close(sb["max_exp_avg_sq"], sa["max_exp_avg_sq"], rtol=1e-6, atol=0)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-6, atol=0)
    assert bool((gopt.state[got[0]]["max_exp_avg_sq"] > gopt.state[got[0]]["exp_avg_sq"]).any())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_amsgrad_prox_with_the_statistic_equals_the_loop_and_masks_nonfinite_grads(backend, monkeypatch):
    calls = _kernel_calls(monkeypatch, backend)
    kw = dict(weight_decay=0.1, delta_mode="ema", decay="prox", delta_scale=0.5)
    with pytest.warns(RuntimeWarning, match="not finite"):
        ref, ropt = _amsgrad_run(AdamHD, dict(kw, foreach=False, fused=False), bad_step=5)
    with pytest.warns(RuntimeWarning, match="not finite"):
        got, gopt = _amsgrad_run(AdamHD, dict(kw, fused=True), bad_step=5)
    assert calls and all(calls)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "delta_ema"):  # m crosses 0: an absolute floor
            torch.testing.assert_close(gopt.state[b][key], ropt.state[a][key], rtol=1e-6,
                                       atol=1e-7 if key == "exp_avg" else 1e-12)


FUSED_INPUTS = [i for i in INPUTS if i.kwargs.get("fused")]


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("optim_input", FUSED_INPUTS, ids=[i.desc for i in FUSED_INPUTS])
def test_fused_adamw_inputs_step_as_adamw_through_the_triton_kernel(optim_input, capturable, monkeypatch):
    """torch's fused AdamW inputs (maximize and amsgrad among them), plain and capturable, through the Triton
    kernel (its interpreter, on CPU tensors)."""
    calls = _kernel_calls(monkeypatch, "triton")
    kw = dict(optim_input.kwargs, capturable=capturable)
    ref, ropt = _run(AdamW, kw)
    got, gopt = _run(AdamHD, {**kw, **AS_ADAMW})
    assert len(calls) == 20
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        for key, value in ropt.state[a].items():
            torch.testing.assert_close(gopt.state[b][key], value, rtol=1e-5, atol=1e-9)


def test_capturable_fused_cpu_as_adamw_and_step_on_the_device():
    ref, ropt = _run(AdamW, dict(capturable=True, fused=True, weight_decay=0.1), steps=5)
    got, gopt = _run(AdamHD, dict(capturable=True, fused=True, weight_decay=0.1, **AS_ADAMW), steps=5)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert float(gopt.state[got[0]]["step"]) == 5.0


def test_capturable_bias_corrections_on_device_tensors_match_the_host_ones():
    """The capturable form of the loop and foreach math (0-d step tensors, no host read), run directly."""
    import adamhd_dist.optim.functional as F

    outs = []
    for capturable in (False, True):
        for impl in (F._single_tensor_adamhd, F._multi_tensor_adamhd):
            ps = [p.detach().clone() for p in _params()]
            ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
            for t in range(1, 6):
                steps = [torch.tensor(float(t))] * len(ps) if capturable else [float(t)] * len(ps)
                impl(ps, _grads(ps, t), ms, vs, steps, [0.5] * len(ps), lr=1e-2, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.1, decay="prox", bias_correction=True, grad_scale=None,
                     capturable=capturable)
            outs.append(ps)
    for ps in outs[1:]:  # the device form computes the corrections in fp32, the host form in fp64
        for a, b in zip(outs[0], ps):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_differentiable_step_gradients_equal_adamws():
    """differentiable=True: autograd through the step, the gradient w.r.t. the initial parameter as AdamW's."""
    def grad_through(cls, extra):
        torch.manual_seed(0)
        leaf = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        p = leaf.clone()
        p.grad = torch.randn(4, 3, dtype=torch.float64)
        opt = cls([p], lr=0.1, weight_decay=0.1, differentiable=True, **extra)
        opt.step()
        return torch.autograd.grad(p.square().sum(), leaf)[0]
    # AdamW's differentiable form computes its bias corrections from the fp32 step counter (1 - 0.999 in fp32 is
    # 1e-5 off relative); AdamHD in fp64
    torch.testing.assert_close(grad_through(AdamHD, AS_ADAMW), grad_through(AdamW, {}), rtol=2e-5, atol=1e-9)


def test_help_documents_every_argument():
    import inspect

    doc = AdamHD.__doc__
    for name in inspect.signature(AdamHD.__init__).parameters:
        if name != "self":
            assert f"{name}:" in doc or f"{name}," in doc, name


def test_complex_statistic_of_a_sharded_layer():
    """A complex DTensor layer (2 ranks, Shard(0)) gets the δ of the whole layer's real view, and its rows step as
    the unsharded parameter's."""
    from dist_utils import run_ranks

    for out in run_ranks("dist_workers_fsdp:complex_dtensor_delta", 2, timeout=240):
        assert out["whole"] == pytest.approx(out["expected"], rel=1e-6)
        assert out["sharded"] == pytest.approx(out["expected"], rel=1e-6)
        torch.testing.assert_close(out["rows"], out["whole_rows"], rtol=1e-6, atol=1e-7)
