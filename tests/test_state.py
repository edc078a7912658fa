"""State: checkpoints, switching from AdamW, added groups, bf16, schedulers, compiled models, non-finite grads."""

import copy
import math
import io

import numpy as np
import pytest
import torch

import adamhd_dist
from adamhd_dist import AdamHD, param_groups
from conftest import PATHS
from reference import RefAdamHD


def _model():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.LayerNorm(13), torch.nn.Linear(13, 5))


def _train(model, opt, n, seed, sched=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 7, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("path", list(PATHS))
def test_state_dict_round_trip_is_exact(path):
    """save -> load -> continue equals the uninterrupted run bitwise, μ included (through torch.save bytes)."""
    a = _model()
    oa = AdamHD(param_groups(a, 0.1), lr=1e-2, **PATHS[path])
    _train(a, oa, 4, seed=0)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    deltas_at_save = adamhd_dist.layer_deltas(oa)
    keys = set(oa.state_dict()["state"][0])
    assert keys == {"step", "exp_avg", "exp_avg_sq", "delta_ema"}
    _train(a, oa, 5, seed=1)

    buf.seek(0)
    ck = torch.load(buf)
    b = _model()
    b.load_state_dict(ck["model"])
    ob = AdamHD(param_groups(b, 0.1), lr=1e-2, **PATHS[path])
    ob.load_state_dict(ck["opt"])
    assert adamhd_dist.layer_deltas(ob) == deltas_at_save  # δ known from μ right after loading
    _train(b, ob, 5, seed=1)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
    for (ka, sa), (kb, sb) in zip(oa.state_dict()["state"].items(), ob.state_dict()["state"].items()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert adamhd_dist.layer_deltas(oa) == adamhd_dist.layer_deltas(ob)


def test_delta_ema_stays_fp32_with_bf16_params():
    m = _model().to(torch.bfloat16)
    o = AdamHD(param_groups(m, 0.1), lr=1e-2)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    o.step()
    sd = copy.deepcopy(o.state_dict())
    o2 = AdamHD(param_groups(m, 0.1), lr=1e-2)
    o2.load_state_dict(sd)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    mus = [s["delta_ema"] for s in o2.state.values() if "delta_ema" in s]
    assert mus and all(mu.dtype == torch.float32 for mu in mus)
    assert all(torch.equal(a["delta_ema"], b["delta_ema"]) for a, b in zip(o.state.values(), o2.state.values())
               if "delta_ema" in a)


@pytest.mark.parametrize("path", list(PATHS))
def test_adamw_checkpoint_continues_as_adamhd(path):
    """Switching optimizer mid-run: AdamW's step and moments carry over; μ starts from the next statistic.
    The continuation equals the float64 reference started from the same moments."""
    m = _model()
    ow = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    _train(m, ow, 3, seed=0)
    sd = ow.state_dict()
    oh = AdamHD(m.parameters(), lr=1e-2, weight_decay=0.1, **PATHS[path])
    oh.load_state_dict(sd)
    params = list(m.parameters())
    assert float(oh.state[params[0]]["step"]) == 3.0 and "delta_ema" not in oh.state[params[0]]
    ref = RefAdamHD([p.detach().double().numpy() for p in params], lr=1e-2, weight_decay=0.1)
    ref.t = [3] * len(params)
    ref.m = [ow.state[p]["exp_avg"].double().numpy().copy() for p in params]
    ref.v = [ow.state[p]["exp_avg_sq"].double().numpy().copy() for p in params]
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        oh.zero_grad()
        m(torch.randn(8, 7, generator=g)).square().mean().backward()
        ref.step([p.grad.double().numpy() for p in params])
        oh.step()
    for p, r in zip(params, ref.params):
        np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=1e-5, atol=1e-6)
    assert float(oh.state[params[0]]["step"]) == 6.0 and "delta_ema" in oh.state[params[0]]


@pytest.mark.parametrize("path", list(PATHS))
def test_adamw_amsgrad_state_continues_as_adamw(path):
    """An AdamW amsgrad state (max_exp_avg_sq) loads and, with the clip form and δ = inf, continues as AdamW."""
    m, m2 = _model(), _model()
    ow = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    _train(m, ow, 3, seed=0)
    m2.load_state_dict(m.state_dict())
    oh = AdamHD(m2.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, decay="clip", delta_mode="constant",
                delta=math.inf, **PATHS[path])
    oh.load_state_dict(copy.deepcopy(ow.state_dict()))  # torch's load keeps the given tensors: no sharing
    for q in m2.parameters():
        assert torch.equal(oh.state[q]["max_exp_avg_sq"], ow.state[dict(zip(m2.parameters(), m.parameters()))[q]]
                           ["max_exp_avg_sq"])
    _train(m, ow, 3, seed=1)
    _train(m2, oh, 3, seed=1)
    for a, b in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert set(oh.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


@pytest.mark.parametrize("path", list(PATHS))
def test_add_param_group_later(path):
    a = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(torch.randn(4, 4))
    opt = AdamHD([a], lr=1e-2, weight_decay=0.2, **PATHS[path])
    ra = RefAdamHD([a.detach().double().numpy()], lr=1e-2, weight_decay=0.2)
    ga = torch.randn(6, 5)
    a.grad = ga
    opt.step()
    ra.step([ga.double().numpy()])
    opt.add_param_group({"params": [b], "weight_decay": 0.5, "delta_mode": "mean_abs"})
    rb = RefAdamHD([b.detach().double().numpy()], lr=1e-2, weight_decay=0.5, delta_mode="mean_abs")
    for _ in range(3):
        ga, gb = torch.randn(6, 5), torch.randn(4, 4)
        a.grad, b.grad = ga, gb
        opt.step()
        ra.step([ga.double().numpy()])
        rb.step([gb.double().numpy()])
    np.testing.assert_allclose(a.detach().double().numpy(), ra.params[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.detach().double().numpy(), rb.params[0], rtol=1e-5, atol=1e-6)
    assert float(opt.state[b]["step"]) == 3.0


@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_params_use_fp32_math(path):
    """bf16 storage, fp32 arithmetic: the result equals the fp32 computation from the same bf16 inputs, rounded
    once to bf16 (not a chain of bf16 roundings)."""
    torch.manual_seed(6)
    p16 = torch.nn.Parameter(torch.randn(37, 11).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    o16 = AdamHD([p16], lr=1e-2, weight_decay=0.3, delta_mode="constant", delta=0.5, **PATHS[path])
    o32 = AdamHD([p32], lr=1e-2, weight_decay=0.3, delta_mode="constant", delta=0.5, foreach=False)
    g = torch.randn(37, 11).bfloat16()
    p16.grad, p32.grad = g, g.float()
    o16.step()
    o32.step()
    assert p16.dtype == torch.bfloat16 and o16.state[p16]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(p16.detach(), p32.detach().bfloat16())
    assert torch.equal(o16.state[p16]["exp_avg_sq"], o32.state[p32]["exp_avg_sq"].bfloat16())


@pytest.mark.parametrize("path", list(PATHS))
def test_lr_scheduler_drives_lr(path):
    m = _model()
    groups = param_groups(m, 0.1)
    opt = AdamHD(groups, lr=1e-2, **PATHS[path])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    params = [p for g in groups for p in g["params"]]
    wds = [g["weight_decay"] for g in groups for _ in g["params"]]
    refs = [RefAdamHD([p.detach().double().numpy()], lr=1e-2, weight_decay=w) for p, w in zip(params, wds)]
    g = torch.Generator().manual_seed(3)
    for s in range(5):
        opt.zero_grad()
        m(torch.randn(8, 7, generator=g)).square().mean().backward()
        for p, r in zip(params, refs):
            r.step([p.grad.double().numpy()], lr=1e-2 / (1 + s))
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 6)
    for p, r in zip(params, refs):
        np.testing.assert_allclose(p.detach().double().numpy(), r.params[0], rtol=1e-5, atol=1e-6)


def test_compiled_model_trains_like_eager():
    eager, comp = _model(), _model()
    compiled = torch.compile(comp)
    oe = AdamHD(param_groups(eager, 0.1), lr=1e-2, foreach=True)
    oc = AdamHD(param_groups(comp, 0.1), lr=1e-2, foreach=True)
    _train(eager, oe, 3, seed=2)
    _train(compiled, oc, 3, seed=2)
    for a, b in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert set(adamhd_dist.layer_deltas(oc)) == {"0.weight", "3.weight"}


@pytest.mark.parametrize("path", list(PATHS))
def test_nonfinite_grads_do_not_poison_state(path):
    torch.manual_seed(7)
    p = torch.nn.Parameter(torch.randn(10, 10))
    opt = AdamHD([p], lr=1e-2, weight_decay=0.1, **PATHS[path])
    p.grad = torch.randn(10, 10)
    opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
    g = torch.randn(10, 10)
    g[3, 4], g[7, 1] = float("nan"), float("inf")
    p.grad = g
    with pytest.warns(RuntimeWarning, match="2 gradient element"):
        opt.step()
    for now, old in zip((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]), before):
        assert torch.isfinite(now).all()
        assert now[3, 4] == old[3, 4] and now[7, 1] == old[7, 1]
        assert (now != old).sum() >= 90
    assert torch.isfinite(opt.state[p]["delta_ema"])


def test_grad_scaler_skip_leaves_every_state_untouched():
    m = _model()
    opt = AdamHD(param_groups(m, 0.1), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(8, 7)
    scaler.scale(m(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    snap = copy.deepcopy(opt.state_dict()["state"]), [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    scaler.scale(m(x).square().mean()).backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    after = opt.state_dict()["state"]
    for k, st in snap[0].items():
        for key, val in st.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(after[k][key])), key
    assert all(torch.equal(a, b) for a, b in zip(snap[1], m.parameters()))


def test_grad_scaler_scale_is_divided_out():
    """With GradScaler the optimizer divides by the scale itself: the result equals an unscaled run."""
    a, b = _model(), _model()
    oa, ob = AdamHD(param_groups(a, 0.1), lr=1e-2), AdamHD(param_groups(b, 0.1), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 7)
    scaler.scale(a(x).square().mean()).backward()
    scaler.step(oa)
    b(x).square().mean().backward()
    ob.step()
    for x1, x2 in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x1, x2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", list(PATHS))
def test_statistic_follows_parameters_changed_between_steps(path):
    """The optimizer reuses Σ|θ| produced by its own update; a parameter changed in place between steps (here
    scaled by 3, as a weight-averaging or re-init hook would) must be re-read, so δ matches the reference."""
    torch.manual_seed(8)
    p = torch.nn.Parameter(torch.randn(40, 9))
    opt = AdamHD([p], lr=1e-2, weight_decay=0.2, delta_mode="mean_abs", **PATHS[path])
    ref = RefAdamHD([p.detach().double().numpy()], lr=1e-2, weight_decay=0.2, delta_mode="mean_abs")
    for k in range(4):
        g = torch.randn(40, 9)
        p.grad = g
        opt.step()
        ref.step([g.double().numpy()])
        assert adamhd_dist.layer_deltas(opt)[0] == pytest.approx(ref.deltas[0], rel=1e-6)
        if k == 1:
            with torch.no_grad():
                p.mul_(3.0)
            ref.params[0] = ref.params[0] * 3.0
        if k == 2:
            p.data.copy_(p.data * 0.5)  # behind autograd's back: the version counter does not move
            opt.invalidate_layer_stats()
            ref.params[0] = ref.params[0] * 0.5
    np.testing.assert_allclose(p.detach().double().numpy(), ref.params[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_like_the_original(how, tmp_path):
    """copy.deepcopy((model, opt)) and torch.save/torch.load of the pair keep which tensors AdamHD was given: the
    copy steps exactly as the original does (as a copied torch.optim.AdamW would)."""
    import copy

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
    opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(model, weight_decay=0.1), lr=1e-2)
    x = torch.randn(7, 6)
    model(x).square().mean().backward()
    opt.step()
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        torch.save((model, opt), tmp_path / "pair.pt")
        model2, opt2 = torch.load(tmp_path / "pair.pt", weights_only=False)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert adamhd_dist.layer_deltas(opt2) == adamhd_dist.layer_deltas(opt)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_layer_holding_nan_gets_no_decay_on_every_path(path):
    """A NaN in θ makes the layer's mean |θ| NaN: its δ is 0 (no decay) on every path, the other elements step as
    Adam, and nothing raises or spreads NaN through the decay."""
    w = torch.randn(4, 4)
    w[0, 0] = float("nan")
    p, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = adamhd_dist.AdamHD([p], lr=0.1, weight_decay=0.5, **PATHS[path])
    adam = adamhd_dist.AdamHD([ref], lr=0.1, weight_decay=0.0, foreach=False, fused=False)
    g = torch.randn(4, 4)
    p.grad, ref.grad = g.clone(), g.clone()
    opt.step()
    adam.step()
    assert adamhd_dist.layer_deltas(opt)[0] == 0.0
    finite = torch.isfinite(w)
    torch.testing.assert_close(p.detach()[finite], ref.detach()[finite], rtol=1e-6, atol=1e-7)
