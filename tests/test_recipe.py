"""GPT-3 schedule: batch plan, batch-size ramp, warmup + cosine LR, and the LambdaLR built from them."""

import math

import pytest
import torch

from adamhd_train.recipe import (GPT3_DECAY_TOKENS, GPT3_WARMUP_TOKENS, BatchRamp, batch_plan, lr_factor,
                                lr_scheduler)


def test_batch_plan_gpt3_small_on_eight_ranks():
    plan = batch_plan(524_288, seq_len=2048, micro_batch=8, world_size=8)
    assert plan.global_batch_sequences == 256
    assert plan.grad_accum_steps == 4
    assert plan.tokens_per_micro_step == 8 * 8 * 2048
    assert plan.tokens_per_step == plan.grad_accum_steps * plan.tokens_per_micro_step == 524_288
    line = plan.describe()
    assert "524,288" in line and "256 sequences" in line and "4 gradient accumulation" in line


def test_batch_plan_without_accumulation():
    plan = batch_plan(4096, seq_len=256, micro_batch=16, world_size=1)
    assert plan.grad_accum_steps == 1 and plan.tokens_per_rank_micro_batch == 4096


@pytest.mark.parametrize("args,field,hint", [
    ((524_288, 2000, 8, 8), "global_batch_tokens", "multiple of seq_len (2000); nearest: 524,000"),
    ((524_288, 2048, 8, 3), "world_size", "256 sequences"),
    ((524_288, 2048, 3, 8), "micro_batch", "[1, 2, 4, 8, 16, 32]"),
    ((524_288, 2048, 64, 8), "micro_batch", "32 sequences per rank"),
    ((0, 2048, 8, 8), "global_batch_tokens", "positive integer"),
    ((524_288, 2048, 0, 8), "micro_batch", "positive integer"),
    ((524_288, 2048.0, 8, 8), "seq_len", "positive integer"),
    ((524_288, 2048, 8, -1), "world_size", "positive integer"),
])
def test_batch_plan_names_the_field_that_does_not_divide(args, field, hint):
    with pytest.raises(ValueError) as err:
        batch_plan(*args)
    assert str(err.value).startswith(field) and hint in str(err.value)


def simulate(ramp, total_tokens):
    """Walk a training loop the plain way: each step's size from the tokens consumed before it."""
    consumed, sizes = 0, []
    while consumed < total_tokens:
        target = ramp.start_tokens + (ramp.plan.global_batch_tokens - ramp.start_tokens) * min(
            1.0, consumed / ramp.ramp_tokens)
        accum = min(ramp.plan.grad_accum_steps, max(1, math.floor(target / ramp.plan.tokens_per_micro_step)))
        sizes.append(accum * ramp.plan.tokens_per_micro_step)
        consumed += sizes[-1]
    return sizes


def test_ramp_grows_linearly_in_whole_micro_steps():
    plan = batch_plan(1_048_576, seq_len=2048, micro_batch=2, world_size=2)  # 8,192 tokens per micro-step
    ramp = BatchRamp(plan, start_tokens=32_768, ramp_tokens=50_000_000)
    assert ramp.accum_steps_at(0) == 4 and ramp.effective_start_tokens == 32_768
    assert ramp.accum_steps_at(25_000_000) == (32_768 + (1_048_576 - 32_768) // 2) // 8192
    assert ramp.accum_steps_at(50_000_000) == ramp.accum_steps_at(10**12) == 128
    sizes = simulate(ramp, 80_000_000)
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1] == 1_048_576 and sizes[0] == 32_768
    cum = [0]
    for s in sizes:
        cum.append(cum[-1] + s)
    assert [ramp.tokens_at_step(k) for k in range(len(cum))] == cum
    for k in (0, 1, 17, len(cum) - 1):
        assert ramp.step_at_tokens(cum[k]) == k
        if k:
            assert ramp.step_at_tokens(cum[k] - 1) == k
    assert ramp.tokens_at_step(len(cum) + 9) == cum[-1] + 10 * 1_048_576


def test_ramp_cannot_start_below_one_micro_step():
    plan = batch_plan(524_288, seq_len=2048, micro_batch=8, world_size=8)
    ramp = BatchRamp(plan, start_tokens=32_768, ramp_tokens=4_000_000_000)
    assert ramp.effective_start_tokens == 131_072 and ramp.accum_steps_at(0) == 1


def test_no_ramp_means_full_batches():
    plan = batch_plan(8192, seq_len=256, micro_batch=4, world_size=2)
    ramp = BatchRamp(plan, start_tokens=2048, ramp_tokens=0)
    assert ramp.accum_steps_at(0) == plan.grad_accum_steps == 4
    assert ramp.tokens_at_step(5) == 5 * 8192 and ramp.step_at_tokens(8193) == 2


@pytest.mark.parametrize("kwargs,field", [
    (dict(start_tokens=2_000_000, ramp_tokens=10), "start_tokens"),
    (dict(start_tokens=0, ramp_tokens=10), "start_tokens"),
    (dict(start_tokens=32_768, ramp_tokens=-1), "ramp_tokens"),
])
def test_bad_ramp_is_named(kwargs, field):
    plan = batch_plan(1_048_576, seq_len=2048, micro_batch=2, world_size=2)
    with pytest.raises(ValueError, match=field):
        BatchRamp(plan, **kwargs)
    with pytest.raises(ValueError, match="plan"):
        BatchRamp("plan", start_tokens=1, ramp_tokens=1)


def test_lr_warmup_then_cosine_to_ten_percent():
    w, e = GPT3_WARMUP_TOKENS, GPT3_DECAY_TOKENS
    f = lambda t: lr_factor(t, warmup=w, decay_end=e)  # noqa: E731
    assert f(0) == 0.0
    assert f(w / 2) == pytest.approx(0.5)
    assert f(w) == pytest.approx(1.0)
    assert f(w + (e - w) / 4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))
    assert f(w + (e - w) / 2) == pytest.approx(0.55)
    assert f(e) == pytest.approx(0.1) and f(10 * e) == pytest.approx(0.1)
    pts = [w + i * (e - w) / 50 for i in range(51)]
    assert all(f(a) > f(b) for a, b in zip(pts, pts[1:]))
    assert lr_factor(w, warmup=w, decay_end=e) == pytest.approx(1.0)
    assert lr_factor(0, warmup=0, decay_end=100) == 1.0


@pytest.mark.parametrize("kwargs,field", [
    (dict(warmup=10, decay_end=5), "decay_end"),
    (dict(warmup=-1, decay_end=5), "warmup"),
    (dict(warmup=1, decay_end=5, min_ratio=1.5), "min_ratio"),
    (dict(warmup=1, decay_end=float("inf")), "decay_end"),
])
def test_bad_schedule_is_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        lr_factor(3, **kwargs)
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=field):
        lr_scheduler(torch.optim.SGD([p], lr=1.0), **kwargs)


def run_lrs(sched, opt, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_scheduler_uses_the_position_after_each_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=6e-4)
    lrs = run_lrs(lr_scheduler(opt, warmup=10, decay_end=100), opt, 120)
    assert lrs[0] == pytest.approx(6e-5)  # step 0 runs at 1/10 of the warmup, not at zero
    assert lrs[9] == pytest.approx(6e-4)
    assert lrs[54] == pytest.approx(6e-4 * 0.55)
    assert lrs[99] == pytest.approx(6e-5) and lrs[119] == pytest.approx(6e-5)


def test_token_scheduler_follows_the_ramp_and_resumes():
    plan = batch_plan(65_536, seq_len=256, micro_batch=4, world_size=2)
    ramp = BatchRamp(plan, start_tokens=4096, ramp_tokens=500_000)
    kw = dict(warmup=200_000, decay_end=3_000_000, tokens_at_step=ramp.tokens_at_step)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = lr_scheduler(opt, **kw)
    lrs = run_lrs(sched, opt, 30)
    for k, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-3 * lr_factor(ramp.tokens_at_step(k + 1), warmup=2e5, decay_end=3e6))
    assert lrs[0] == pytest.approx(1e-3 * 4096 / 200_000)
    saved = sched.state_dict()
    tail = run_lrs(sched, opt, 10)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = lr_scheduler(opt2, **kw)
    sched2.load_state_dict(saved)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert run_lrs(sched2, opt2, 10) == pytest.approx(tail)
