"""Every path of AdamHD against the independent float64 reference (tests/reference.py)."""

import itertools
import math

import numpy as np
import pytest
import torch

import adamhd_dist
from adamhd_dist import AdamHD
from conftest import PATHS
from reference import RefAdamHD

SHAPES = [(13, 7), (5, 13), (33,), (1,), (4, 3, 5)]


def _run(path, steps=10, **hp):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s) * (0.5 + i)) for i, s in enumerate(SHAPES)]
    ref = RefAdamHD([p.detach().double().numpy() for p in params], **hp)
    opt = AdamHD(params, **hp, **PATHS[path])
    for _ in range(steps):
        grads = [torch.randn(s) * 0.3 for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([g.double().numpy() for g in grads])
    return params, opt, ref


CASES = list(itertools.product(["ema", "mean_abs", "constant"], ["prox", "clip"], [True, False]))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode,decay,bc", CASES)
def test_paths_match_float64_reference(path, mode, decay, bc):
    hp = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5, delta_mode=mode, decay=decay,
              bias_correction=bc, delta=0.4 if mode == "constant" else None)
    params, opt, ref = _run(path, **hp)
    for p, r in zip(params, ref.params):
        np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=1e-5, atol=1e-6)
    got = adamhd_dist.layer_deltas(opt)
    assert sorted(got) == list(range(len(SHAPES)))
    for i, d in enumerate(ref.deltas):
        assert got[i] == pytest.approx(d, rel=1e-5)


@pytest.mark.parametrize("path", list(PATHS))
def test_decay_is_actually_applied(path):
    """Guard against a reference and an implementation that both ignore the decay: strong decay must differ from
    none, and the Huber (prox) result must differ from plain L2 decay when weights exceed δ."""
    base = dict(lr=3e-2, weight_decay=0.5, delta_mode="constant", decay="prox")
    a, _, _ = _run(path, delta=0.2, **base)
    b, _, _ = _run(path, delta=math.inf, **base)
    c, _, _ = _run(path, **{**base, "weight_decay": 0.0, "delta_mode": "ema"})
    assert all(not torch.allclose(x, y) for x, y in zip(a, b) if x.numel() > 1)
    assert all(not torch.allclose(x, y) for x, y in zip(a, c) if x.numel() > 1)


@pytest.mark.parametrize("path", list(PATHS))
def test_per_group_hyperparameters(path):
    """Every hyperparameter can differ per group; each group follows its own rule."""
    torch.manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(9, 4)), torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3, 3))]
    hps = [dict(lr=1e-2, weight_decay=0.3, delta_mode="ema", delta_scale=2.0, delta_beta=0.5, decay="prox"),
           dict(lr=5e-3, weight_decay=0.0, betas=(0.8, 0.9)),
           dict(lr=2e-2, weight_decay=0.7, delta_mode="constant", delta=0.1, decay="clip", eps=1e-6,
                bias_correction=False)]
    opt = AdamHD([{"params": [p], **hp} for p, hp in zip(ps, hps)], **PATHS[path])
    refs = [RefAdamHD([p.detach().double().numpy()], **hp) for p, hp in zip(ps, hps)]
    for _ in range(6):
        for p, r in zip(ps, refs):
            g = torch.randn_like(p)
            p.grad = g
            r.step([g.double().numpy()])
        opt.step()
    for p, r in zip(ps, refs):
        np.testing.assert_allclose(p.detach().double().numpy(), r.params[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", list(PATHS))
def test_several_delta_settings_in_one_step(path):
    """Groups with different δ rules (and a group without decay between them, and a param without a gradient)
    share one statistic call; each param still gets its own group's δ."""
    torch.manual_seed(3)
    shapes = [[(5, 3), (7,)], [(4, 4)], [(6,), (2, 9)], [(3,), (8,)]]
    hps = [dict(lr=1e-2, weight_decay=0.4, delta_mode="ema", delta_scale=2.0, delta_beta=0.5),
           dict(lr=1e-2, weight_decay=0.0),
           dict(lr=2e-2, weight_decay=0.6, delta_mode="mean_abs", delta_scale=0.7, decay="clip"),
           dict(lr=1e-2, weight_decay=0.3, delta_mode="ema", delta_scale=1.1, delta_beta=0.9)]
    groups = [[torch.nn.Parameter(torch.randn(s)) for s in ss] for ss in shapes]
    idle = torch.nn.Parameter(torch.randn(4))  # never gets a gradient
    groups[2].insert(1, idle)
    idle_before = idle.detach().clone()
    opt = AdamHD([{"params": ps, **hp} for ps, hp in zip(groups, hps)], **PATHS[path])
    refs = [RefAdamHD([p.detach().double().numpy() for p in ps if p is not idle], **hp) for ps, hp in zip(groups, hps)]
    for _ in range(5):
        for ps, r in zip(groups, refs):
            gs = []
            for p in ps:
                if p is idle:
                    continue
                p.grad = torch.randn_like(p)
                gs.append(p.grad.double().numpy())
            r.step(gs)
        opt.step()
    last = opt.last_deltas()
    for ps, r, hp in zip(groups, refs, hps):
        live = [p for p in ps if p is not idle]
        for p, want, d in zip(live, r.params, r.deltas):
            np.testing.assert_allclose(p.detach().double().numpy(), want, rtol=1e-5, atol=1e-6)
            if hp["weight_decay"]:
                assert last[p] == pytest.approx(d, rel=1e-5)
            else:
                assert p not in last
    assert torch.equal(idle.detach(), idle_before) and idle not in last


@pytest.mark.parametrize("path", list(PATHS))
def test_params_without_grad_are_untouched(path):
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    before = b.detach().clone()
    opt = AdamHD([a, b], weight_decay=0.1, **PATHS[path])
    a.grad = torch.randn(4, 4)
    opt.step()
    assert torch.equal(b, before) and len(opt.state[b]) == 0
    assert float(opt.state[a]["step"]) == 1.0


@pytest.mark.parametrize("path", list(PATHS))
def test_functional_accepts_tensor_steps_and_strided_deltas(path, monkeypatch):
    """adamhd(): step numbers as a tensor or a list give the same update; δ may be any 1-D float tensor (here an
    expanded, non-contiguous one)."""
    import adamhd_dist.optim.functional as F

    torch.manual_seed(5)
    shapes = [(33,), (4, 5), (4099,)]
    base = [(torch.randn(s), torch.randn(s), 0.1 * torch.randn(s), 0.01 * torch.rand(s)) for s in shapes]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.2, decay="prox", bias_correction=True)
    outs = []
    for steps, deltas in (([3.0, 3.0, 5.0], torch.tensor([0.05, 0.05, 0.05])),
                          (torch.tensor([3.0, 3.0, 5.0]), torch.tensor(0.05).expand(3))):
        ts = [[t.clone() for t in group] for group in base]
        F.adamhd([t[0] for t in ts], [t[1] for t in ts], [t[2] for t in ts], [t[3] for t in ts], steps, deltas,
                 **PATHS[path], **kw)
        outs.append(ts)
    for a, b in zip(*outs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode,decay", [("ema", "prox"), ("mean_abs", "clip")])
def test_float64_parameters_are_updated_in_float64(path, mode, decay):
    """A drop-in for torch.optim.AdamW takes fp64 parameters and computes in fp64: 20 steps follow the float64
    reference within 1e-9, a hundred times below what an fp32 update reaches (~1e-7). (μ and δ are fp32 scalars by
    design, so coordinates in the Huber's linear region carry δ's fp32 rounding, τ·δ·6e-8 per step.)"""
    from reference import RefAdamHD

    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randn(11, generator=gen, dtype=torch.float64)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, delta_mode=mode, decay=decay)
    opt = adamhd_dist.AdamHD(params, **hp, **PATHS[path])
    ref = RefAdamHD([t.numpy() for t in init], **hp)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([g.numpy() for g in grads])
    for p, r in zip(params, ref.params):
        assert p.dtype == torch.float64 and opt.state[p]["exp_avg"].dtype == torch.float64
        assert float((p.detach() - torch.from_numpy(r)).abs().max()) <= 1e-9


@pytest.mark.parametrize("path", list(PATHS))
def test_float16_parameters_step_like_float32_rounded(path):
    """fp16 parameters and states: the fp32 computation, stored as fp16 (one step from the same values)."""
    gen = torch.Generator().manual_seed(6)
    p32 = torch.nn.Parameter(torch.randn(64, 5, generator=gen))
    p16 = torch.nn.Parameter(p32.detach().to(torch.float16).float())  # fp16-representable start, held in fp32
    h16 = torch.nn.Parameter(p32.detach().to(torch.float16))
    g = torch.randn(64, 5, generator=gen).to(torch.float16)
    hp = dict(lr=1e-2, weight_decay=0.1)
    ref = adamhd_dist.AdamHD([p16], **hp, foreach=False, fused=False)
    opt = adamhd_dist.AdamHD([h16], **hp, **PATHS[path])
    p16.grad, h16.grad = g.float(), g.clone()
    ref.step()
    opt.step()
    assert h16.dtype == torch.float16 and opt.state[h16]["exp_avg"].dtype == torch.float16
    assert torch.equal(h16.detach(), p16.detach().to(torch.float16))
    assert adamhd_dist.layer_deltas(opt)[0] == pytest.approx(adamhd_dist.layer_deltas(ref)[0], rel=1e-6)
