"""Every path of AdamHD against the independent float64 reference (tests/reference.py), per SPEC section 1."""

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
def test_params_without_grad_are_untouched(path):
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    before = b.detach().clone()
    opt = AdamHD([a, b], weight_decay=0.1, **PATHS[path])
    a.grad = torch.randn(4, 4)
    opt.step()
    assert torch.equal(b, before) and len(opt.state[b]) == 0
    assert float(opt.state[a]["step"]) == 1.0
