"""AdamHD over flat buffers with a FlatLayout (what ZeRO hands the optimizer), on one process.

Two layers cut into two flat "partitions" with padding must step exactly like AdamHD over the separate layers,
with the statistic summed over both partitions (the layout's ``reduce`` stands in for the all-reduce)."""

from __future__ import annotations

import pytest
import torch

from conftest import PATHS

import adamhd_dist
from adamhd_dist.distributed.layout import FlatLayerStats, FlatLayout, Fragment
from adamhd_dist.optim.layer_stats import UnplacedTensorError

SHAPES = {"a": (7, 5), "b": (11,), "c": (3, 4)}
HP = dict(lr=3e-2, betas=(0.9, 0.95), weight_decay=0.2, delta_scale=1.0, delta_beta=0.8)


def reference_params():
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def split_into_partitions(full, pad=4):
    """Concatenate a, b, c (+ `pad` padding zeros) and cut into two equal partitions, as ZeRO-1/2 does."""
    flat = torch.cat([full[n].reshape(-1) for n in SHAPES] + [torch.zeros(pad)])
    half = flat.numel() // 2
    assert flat.numel() % 2 == 0
    return flat[:half].clone(), flat[half:].clone(), half


def fragments(half):
    """Fragments of each layer in each half: layer a straddles the boundary."""
    out = ([], [])
    at = 0
    for i, n in enumerate(SHAPES):
        numel = torch.Size(SHAPES[n]).numel()
        for part in (0, 1):
            lo, hi = part * half, (part + 1) * half
            a, b = max(at, lo), min(at + numel, hi)
            if a < b:
                out[part].append(Fragment(i, a - lo, b - a, a - at))
        at += numel
    return out


def make_flat_optimizer(full, **kw):
    p0, p1, half = split_into_partitions(full)
    p0, p1 = torch.nn.Parameter(p0), torch.nn.Parameter(p1)
    opt = adamhd_dist.AdamHD([p0, p1], **HP, **kw)
    f0, f1 = fragments(half)
    numels = [torch.Size(s).numel() for s in SHAPES.values()]
    lay = FlatLayout(list(SHAPES), numels, [0, 0, 0], {p0: f0, p1: f1}, None, list(SHAPES.values()))
    opt.set_layer_stats(FlatLayerStats(lay))
    return opt, (p0, p1), half


def set_flat_grads(parts, g):
    a, b, _ = split_into_partitions(g)
    parts[0].grad, parts[1].grad = a, b


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", ["ema", "mean_abs", "constant", "ema-amsgrad"])
def test_flat_layout_equals_separate_layers(path, mode):
    amsgrad = mode.endswith("-amsgrad")
    mode = mode.removesuffix("-amsgrad")
    extra = {"delta_mode": mode, "amsgrad": amsgrad, **({"delta": 0.3} if mode == "constant" else {})}
    full = reference_params()
    ref_params = {n: torch.nn.Parameter(t.clone()) for n, t in full.items()}
    ref = adamhd_dist.AdamHD([{"params": list(ref_params.values()), "param_names": list(SHAPES)}], **HP, **extra,
                             **PATHS[path])
    opt, parts, half = make_flat_optimizer(full, **extra, **PATHS[path])
    for step in range(6):
        g = grads(step)
        for n, p in ref_params.items():
            p.grad = g[n].clone()
        set_flat_grads(parts, g)
        ref.step()
        opt.begin_step()
        opt.step()
        lay = opt.layer_stats.layout
        state = lay.split_layers(lay.scatter_local(lambda f: f))
        for n in SHAPES:
            torch.testing.assert_close(state[n], ref_params[n].detach(), rtol=0, atol=2e-7)
        assert adamhd_dist.layer_deltas(opt) == pytest.approx(adamhd_dist.layer_deltas(ref), rel=1e-6)
    # padding is no layer's element: it is never touched
    assert torch.equal(parts[1].detach()[-4:], torch.zeros(4))


def test_statistic_comes_from_the_update_while_partitions_are_unchanged_and_rereads_after_a_write():
    full = reference_params()
    opt, parts, _ = make_flat_optimizer(full, fused=True)
    calls = {"n": 0}
    import adamhd_dist.optim.stats as stats

    original = stats.layer_abs_sums

    def counting(ts):
        calls["n"] += 1
        return original(ts)

    stats.layer_abs_sums = counting
    try:
        for step in range(3):
            set_flat_grads(parts, grads(step))
            opt.begin_step()
            opt.step()
        assert calls["n"] == 1  # the first step only: then the update's own Σ|θ| is reused
        with torch.no_grad():
            parts[0].mul_(2.0)  # an in-place write moves the version counter: the next step re-reads
        set_flat_grads(parts, grads(3))
        opt.begin_step()
        assert calls["n"] == 2
    finally:
        stats.layer_abs_sums = original


@pytest.mark.parametrize("how", ["assign", "load_state_dict"])
def test_replaced_moments_are_the_ones_updated(how):
    """The layer views of a flat parameter and its moments are kept between steps; a moment tensor replaced by
    another object (as a loader may do) must be the one the next step updates, with the same result as a fresh
    optimizer started from the same values."""
    full = reference_params()
    opt, parts, _ = make_flat_optimizer(full, fused=True)
    fresh, fparts, _ = make_flat_optimizer(full, fused=True)
    for step in range(2):
        for o, ps in ((opt, parts), (fresh, fparts)):
            set_flat_grads(ps, grads(step))
            o.begin_step()
            o.step()
    g = torch.Generator().manual_seed(9)
    new = {p: (0.01 * torch.randn(p.numel(), generator=g), 0.01 * torch.rand(p.numel(), generator=g)) for p in parts}
    old = {p: (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in parts}
    old_values = {p: (m.clone(), v.clone()) for p, (m, v) in old.items()}
    if how == "assign":
        for p in parts:
            opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"] = (t.clone() for t in new[p])
    else:
        sd = opt.state_dict()
        for i, p in enumerate(parts):
            sd["state"][i] = dict(sd["state"][i], exp_avg=new[p][0].clone(), exp_avg_sq=new[p][1].clone())
        opt.load_state_dict(sd)
    for fp, p in zip(fparts, parts):
        fresh.state[fp]["exp_avg"].copy_(new[p][0])
        fresh.state[fp]["exp_avg_sq"].copy_(new[p][1])
    for step in range(2, 4):
        for o, ps in ((opt, parts), (fresh, fparts)):
            set_flat_grads(ps, grads(step))
            o.begin_step()
            o.step()
    for p, fp in zip(parts, fparts):
        assert torch.equal(p.detach(), fp.detach())
        assert torch.equal(opt.state[p]["exp_avg"], fresh.state[fp]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh.state[fp]["exp_avg_sq"])
        if how == "assign":  # the replaced tensors were left alone
            assert torch.equal(old[p][0], old_values[p][0]) and torch.equal(old[p][1], old_values[p][1])


def test_state_dict_keeps_mu_by_name_and_describes_the_layout():
    full = reference_params()
    opt, parts, half = make_flat_optimizer(full)
    for step in range(2):
        set_flat_grads(parts, grads(step))
        opt.begin_step()
        opt.step()
    sd = opt.state_dict()
    assert set(sd["layer_state"]) == set(SHAPES)
    assert sd["flat_layout"][0]["fragments"] == [("a", 0, 31, 0)]
    assert sd["flat_layout"][1]["fragments"] == [("a", 0, 4, 31), ("b", 4, 11, 0), ("c", 15, 12, 0)]
    opt2, parts2, _ = make_flat_optimizer(full)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.layer_state.mu, opt.layer_state.mu) and bool(opt2.layer_state.has_mu.all())
    assert adamhd_dist.layer_deltas(opt2) == adamhd_dist.layer_deltas(opt)


def test_step_without_begin_step_is_an_error():
    opt, parts, _ = make_flat_optimizer(reference_params())
    set_flat_grads(parts, grads(0))
    with pytest.raises(RuntimeError, match="begin_step"):
        opt.step()


@pytest.mark.parametrize("frags, match", [
    ([Fragment(0, 0, 10), Fragment(1, 5, 3)], "overlap"),
    ([Fragment(0, 15, 10)], "outside its flat tensor"),
    ([Fragment(3, 0, 1)], "refers to layer 3"),
    ([Fragment(0, 0, 2), Fragment(0, 4, 2)], "appears twice"),
    ([Fragment(1, 0, 4, offset=9)], r"covers elements \[9, 13\)"),
])
def test_bad_fragments_are_refused(frags, match):
    flat = torch.zeros(20)
    with pytest.raises(ValueError, match=match):
        FlatLayout(["x", "y", "z"], [12, 11, 5], [0, 0, 0], {flat: frags}, None)


def test_bad_layer_tables_are_refused():
    with pytest.raises(ValueError, match="unique"):
        FlatLayout(["x", "x"], [1, 1], [0, 0], {}, None)
    with pytest.raises(ValueError, match="does not hold"):
        FlatLayout(["x"], [6], [0], {}, None, [(2, 2)])


def test_a_flat_partition_without_its_layout_is_refused():
    """What DeepSpeed hands AdamHD when nobody attached the layout: the optimizer's params replaced by flat
    partitions. The step stops with the fix named instead of taking each partition as one layer."""
    full = reference_params()
    given = [torch.nn.Parameter(t.clone()) for t in full.values()]
    opt = adamhd_dist.AdamHD(given, **HP)
    p0, p1, _ = split_into_partitions(full)
    parts = (torch.nn.Parameter(p0), torch.nn.Parameter(p1))
    opt.param_groups[0]["params"] = list(parts)  # as ZeRO-1/2 do: one flat partition per group and rank
    set_flat_grads(parts, grads(0))
    before = [p.detach().clone() for p in parts]
    with pytest.raises(UnplacedTensorError, match=r"adamhd_dist\.deepspeed\.attach\(engine\)"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, parts))  # nothing was stepped
    # the same flat tensors with their layout step exactly as the separate layers (previous tests)
    f0, f1 = fragments(p0.numel())
    numels = [torch.Size(s).numel() for s in SHAPES.values()]
    opt.set_layer_stats(FlatLayerStats(FlatLayout(list(SHAPES), numels, [0, 0, 0], {parts[0]: f0, parts[1]: f1},
                                                  None)))
    opt.begin_step()
    opt.step()
    assert not torch.equal(before[0], parts[0].detach())


def test_elementwise_groups_step_any_tensor():
    """A group without a statistic (no decay, or a constant δ) is elementwise: exact on any piece of a layer, so
    an engine's flat partition steps there without a layout."""
    for kw in (dict(weight_decay=0.0), dict(delta_mode="constant", delta=0.5)):
        opt = adamhd_dist.AdamHD([torch.nn.Parameter(torch.ones(3))], lr=0.1, **kw)
        flat = torch.nn.Parameter(torch.ones(8))
        opt.param_groups[0]["params"] = [flat]
        flat.grad = torch.ones(8)
        opt.step()
        assert torch.all(flat.detach() < 1.0)


def test_whole_layer_replacements_are_placed():
    """An engine that replaces each parameter by a same-shaped copy (DeepSpeed's stage-0 fp16/bf16 optimizer keeps
    fp32 masters) hands the optimizer whole layers: stepped as the layers they replace, δ from each copy."""
    full = reference_params()
    ref_params = [torch.nn.Parameter(t.clone()) for t in full.values()]
    ref = adamhd_dist.AdamHD(ref_params, **HP)
    opt = adamhd_dist.AdamHD([torch.nn.Parameter(t.to(torch.bfloat16)) for t in full.values()], **HP)
    copies = [torch.nn.Parameter(t.clone()) for t in full.values()]
    opt.param_groups[0]["params"] = copies
    for step in range(3):
        g = grads(step)
        for p, c, n in zip(ref_params, copies, SHAPES):
            p.grad, c.grad = g[n].clone(), g[n].clone()
        ref.step()
        opt.step()
    for p, c in zip(ref_params, copies):
        assert torch.equal(p.detach(), c.detach())
    # a copy of another shape at that position is not that layer
    opt.param_groups[0]["params"] = [copies[1], copies[0], copies[2]]
    with pytest.raises(UnplacedTensorError):
        opt.step()


def test_a_state_saved_over_other_partitions_is_refused():
    """Moments saved per flat partition load only where the layers are cut the same way; a state saved at another
    partitioning (another world size) is refused, whether the layout is known before or after the load."""
    full = reference_params()
    opt, parts, _ = make_flat_optimizer(full)
    set_flat_grads(parts, grads(0))
    opt.begin_step()
    opt.step()
    sd = opt.state_dict()
    moved = {k: dict(v, fragments=[(n, s + 1, c, o) for n, s, c, o in v["fragments"]])
             for k, v in sd["flat_layout"].items()}
    other, _, _ = make_flat_optimizer(full)
    with pytest.raises(ValueError, match="cut the layers differently"):
        other.load_state_dict(dict(sd, flat_layout=moved))
    other.load_state_dict(sd)  # the same cut loads
    assert torch.equal(other.layer_state.mu, opt.layer_state.mu)
    # loaded before the layout is attached (a transformers Trainer resumes before its callbacks run)
    p0, p1, half = split_into_partitions(full)
    late = adamhd_dist.AdamHD([torch.nn.Parameter(p0), torch.nn.Parameter(p1)], **HP)
    late.load_state_dict(dict(sd, flat_layout=moved))
    f0, f1 = fragments(half)
    numels = [torch.Size(s).numel() for s in SHAPES.values()]
    ps = late.param_groups[0]["params"]
    def attach():
        late.set_layer_stats(FlatLayerStats(FlatLayout(list(SHAPES), numels, [0, 0, 0], {ps[0]: f0, ps[1]: f1},
                                                       None)))

    for _ in range(2):  # refused before anything changed: a retry is refused again
        with pytest.raises(ValueError, match="cut the layers differently"):
            attach()
        assert late.layer_state is None and not late.layer_stats.flat


def test_a_group_that_starts_needing_the_statistic_is_checked_again():
    """A group stepped while it needed no statistic (weight decay warm-up at 0) held flat partitions legitimately;
    once its weight decay turns on, the same partitions must be refused, not taken as layers."""
    full = reference_params()
    opt = adamhd_dist.AdamHD([torch.nn.Parameter(t.clone()) for t in full.values()], **dict(HP, weight_decay=0.0))
    p0, p1, _ = split_into_partitions(full)
    parts = (torch.nn.Parameter(p0), torch.nn.Parameter(p1))
    opt.param_groups[0]["params"] = list(parts)
    set_flat_grads(parts, grads(0))
    opt.step()  # elementwise: fine
    opt.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(UnplacedTensorError):
        opt.step()


def test_a_decayed_tensor_outside_the_flat_layout_is_refused():
    full = reference_params()
    opt, parts, _ = make_flat_optimizer(full)
    extra = torch.nn.Parameter(torch.ones(5))
    opt.add_param_group({"params": [extra], "weight_decay": 0.1, "delta_mode": "constant", "delta": 0.5})
    set_flat_grads(parts, grads(0))
    extra.grad = torch.ones(5)
    opt.begin_step()
    with pytest.raises(UnplacedTensorError, match="not in the optimizer's flat layout"):
        opt.step()


def test_a_given_parameter_cut_into_a_shard_is_refused():
    """FSDP1 (use_orig_params) keeps the Parameter objects and swaps their data for 1-D shards: a given tensor
    whose shape changed is no longer the layer it was given as."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = adamhd_dist.AdamHD([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.ones(4, 4)
    opt.step()
    w.data = w.data.reshape(-1)[:8].clone()
    w.grad = torch.ones(8)
    with pytest.raises(UnplacedTensorError):
        opt.step()
    w._fsdp_flattened = True
    with pytest.raises(UnplacedTensorError, match="FSDP1"):
        opt.step()


def test_replacements_of_the_trainable_parameters_are_placed():
    """DeepSpeed's stage-0 fp16/bf16 optimizer keeps fp32 copies of the trainable, non-empty params only: a group
    given with a frozen param holds fewer tensors, each still a whole layer in order."""
    w, frozen, b = torch.randn(4, 4), torch.randn(3), torch.randn(2, 2)
    given = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(frozen.clone(), requires_grad=False),
             torch.nn.Parameter(b.clone())]
    opt = adamhd_dist.AdamHD(given, lr=0.1, weight_decay=0.1)
    ref_ps = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    ref = adamhd_dist.AdamHD(ref_ps, lr=0.1, weight_decay=0.1)
    copies = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    opt.param_groups[0]["params"] = copies
    for c, r in zip(copies, ref_ps):
        c.grad, r.grad = torch.ones_like(c), torch.ones_like(r)
    opt.step()
    ref.step()
    assert all(torch.equal(c, r) for c, r in zip(copies, ref_ps))
