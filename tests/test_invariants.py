"""Invariants of the update rule: the clip form with δ=inf is AdamW, λ=0 is Adam, and the prox step's properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adamhd_dist import AdamHD, huber_prox_, huber_penalty
from adamhd_dist.optim.functional import adamhd
from conftest import PATHS


def _twin_run(make_a, make_b, steps=20, shapes=((13, 7), (5, 13), (33,), (1,))):
    torch.manual_seed(3)
    pa = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    oa, ob = make_a(pa), make_b(pb)
    for _ in range(steps):
        for x, y in zip(pa, pb):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return pa, pb


@pytest.mark.parametrize("path", list(PATHS))
def test_clip_with_infinite_delta_is_adamw(path):
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    pa, pb = _twin_run(lambda ps: AdamHD(ps, **hp, decay="clip", delta_mode="constant", delta=math.inf, **PATHS[path]),
                       lambda ps: torch.optim.AdamW(ps, **hp))
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("decay", ["prox", "clip"])
def test_zero_weight_decay_is_adam(path, decay):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    pa, pb = _twin_run(lambda ps: AdamHD(ps, **hp, weight_decay=0.0, decay=decay, **PATHS[path]),
                       lambda ps: torch.optim.Adam(ps, **hp))
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _one_step(delta, decay="prox", lr=0.1, wd=0.5, v_scale=1.0, grad=None, path="loop"):
    """A single functional step from fixed θ, m, v; returns (θ_new, θ̃ = θ after the Adam step alone)."""
    torch.manual_seed(4)
    theta = torch.randn(1000) * 2
    g = torch.randn(1000) if grad is None else grad
    m, v = torch.randn(1000) * 0.1, torch.rand(1000) * v_scale
    tilde = theta.clone()
    adamhd([tilde], [g.clone()], [m.clone()], [v.clone()], [3], None, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8,
           weight_decay=0.0, decay=decay, bias_correction=True, **PATHS[path])
    new = theta.clone()
    adamhd([new], [g.clone()], [m.clone()], [v.clone()], [3], torch.tensor([delta]), lr=lr, beta1=0.9, beta2=0.99,
           eps=1e-8, weight_decay=wd, decay=decay, bias_correction=True, **PATHS[path])
    return new, tilde


@pytest.mark.parametrize("path", list(PATHS))
def test_prox_limits(path):
    tau = 0.1 * 0.5
    new, tilde = _one_step(math.inf, path=path)
    torch.testing.assert_close(new, tilde / (1 + tau), rtol=1e-6, atol=1e-7)
    new, tilde = _one_step(0.0, path=path)
    assert torch.equal(new, tilde)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("delta", [0.0, 0.3, 1.0, 5.0, math.inf])
def test_bounded_force_and_no_sign_flip(path, delta):
    tau = 0.1 * 0.5
    new, tilde = _one_step(delta, path=path)
    bound = tau * delta if math.isfinite(delta) else math.inf
    # fp32 rounding of θ̃ − τ·δ costs up to an ulp of |θ̃|
    assert ((new - tilde).abs() <= bound + 2.4e-7 * tilde.abs() + 1e-12).all()
    assert ((torch.sign(new) == torch.sign(tilde)) | (new == 0)).all()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("decay", ["prox", "clip"])
def test_decay_does_not_depend_on_second_moment(path, decay):
    """With g = 0 and m = 0 the Adam direction vanishes, so the step is the decay alone; rescaling v by 1e6
    must not change it (the Huber decay is decoupled from the preconditioner)."""
    theta = torch.randn(500) * 2
    outs = []
    for v_scale in (1e-6, 1.0, 1e6):
        p, v = theta.clone(), torch.rand(500) * v_scale
        adamhd([p], [torch.zeros(500)], [torch.zeros(500)], [v], [7], torch.tensor([0.8]), lr=0.2, beta1=0.9,
               beta2=0.99, eps=1e-8, weight_decay=0.5, decay=decay, bias_correction=True, **PATHS[path])
        outs.append(p)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    tau = 0.1
    expect = theta - tau * torch.clamp(theta / (1 + tau) if decay == "prox" else theta, -0.8, 0.8)
    torch.testing.assert_close(outs[0], expect)


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(x=st.lists(finite, min_size=1, max_size=64), tau=st.floats(0.0, 10.0), delta=st.floats(0.0, 1e3))
def test_prox_properties(x, tau, delta):
    """prox of τ·H_δ: bounded move, no sign flip, and it minimises ½(z−x)² + τ·H_δ(z) (checked against
    neighbouring points, in float64)."""
    t = torch.tensor(x, dtype=torch.float64)
    z = huber_prox_(t.clone(), tau, delta)
    assert ((z - t).abs() <= tau * delta * (1 + 1e-12) + 1e-12).all()
    assert ((torch.sign(z) == torch.sign(t)) | (z == 0)).all()
    obj = lambda w: 0.5 * (w - t) ** 2 + tau * huber_penalty(w, delta)  # noqa: E731
    for h in (1e-3, -1e-3):
        assert (obj(z) <= obj(z + h * (1 + z.abs())) + 1e-9 * (1 + obj(z).abs())).all()


@settings(max_examples=200, deadline=None)
@given(x=st.lists(finite, min_size=1, max_size=32), tau=st.floats(1e-4, 2.0), delta=st.floats(1e-3, 100.0))
def test_prox_closed_form_matches_piecewise_definition(x, tau, delta):
    t = torch.tensor(x, dtype=torch.float64)
    z = huber_prox_(t.clone(), tau, delta)
    expect = torch.where(t.abs() <= (1 + tau) * delta, t / (1 + tau), t - tau * delta * torch.sign(t))
    torch.testing.assert_close(z, expect, rtol=1e-12, atol=1e-12)
