"""Unit tests of adamhd_study.analysis (pruning, histograms, steps-to-target, the outlier schedule) and of
adamhd_study.stats (the rule that calls a difference real)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from adamhd_study.analysis import (LAYER_TYPES, OutlierInjector, OutlierSchedule, decayed_tensors,
                                  layer_type, magnitude_edges, magnitude_histograms, magnitude_prune, prune_model_,
                                  small_weight_fraction, speedup, steps_to_target)
from adamhd_study.stats import compare_values, t_critical
from adamhd_train.models import build_model


@pytest.fixture(scope="module")
def nano():
    return build_model("nano", vocab_size=300, context=32, seed=0)


# ------------------------------------------------------------------------------------------------ layer types
@pytest.mark.parametrize("name, kind", [
    ("transformer.h.0.attn.c_attn.weight", "attn.qkv"),
    ("transformer.h.3.attn.c_proj.weight", "attn.proj"),
    ("transformer.h.0.mlp.c_fc.weight", "mlp.fc"),
    ("transformer.h.0.mlp.c_proj.weight", "mlp.proj"),
    ("transformer.wte.weight", "embedding"),
    ("transformer.wpe.weight", "embedding"),
    ("lm_head.weight", "embedding"),
    ("model.layers.2.self_attn.q_proj.weight", "attn.qkv"),
    ("model.layers.2.self_attn.o_proj.weight", "attn.proj"),
    ("model.layers.2.mlp.gate_proj.weight", "mlp.fc"),
    ("model.layers.2.mlp.down_proj.weight", "mlp.proj"),
    ("model.embed_tokens.weight", "embedding"),
    ("encoder.some_matrix", "other"),
])
def test_layer_type(name, kind):
    assert layer_type(name) == kind
    assert kind in LAYER_TYPES


def test_decayed_tensors_keeps_matrices_once(nano):
    sd = nano.state_dict()
    dec = decayed_tensors(sd)
    assert all(t.dim() >= 2 for t in dec.values())
    assert not any(n.endswith(".bias") or ".ln_" in n for n in dec)
    # the LM head is the token embedding (tied): one of the two names only
    assert ("lm_head.weight" in dec) != ("transformer.wte.weight" in dec)
    expected = sum(p.numel() for n, p in nano.named_parameters() if p.dim() >= 2)
    assert sum(t.numel() for t in dec.values()) == expected


# ------------------------------------------------------------------------------------------------ pruning
def test_global_prune_zeroes_exactly_the_smallest():
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 11, generator=g), "b": torch.randn(13, 3, generator=g) * 5}
    before = {k: v.clone() for k, v in tensors.items()}
    pruned, res = magnitude_prune(tensors, 0.3)
    total = 7 * 11 + 13 * 3
    k = round(0.3 * total)
    allabs = torch.cat([v.abs().reshape(-1) for v in before.values()])
    smallest = set(torch.argsort(allabs)[:k].tolist())
    flat = torch.cat([pruned["a"].reshape(-1), pruned["b"].reshape(-1)])
    assert set(torch.nonzero(flat == 0).flatten().tolist()) == smallest
    assert res.zeroed == k and res.total == total
    assert res.achieved_sparsity == pytest.approx(k / total)
    # untouched entries keep their exact values; the inputs are not modified
    keep = flat != 0
    assert torch.equal(flat[keep], torch.cat([before["a"].reshape(-1), before["b"].reshape(-1)])[keep])
    for name in tensors:
        assert torch.equal(tensors[name], before[name])
    assert res.threshold == pytest.approx(float(allabs.sort().values[k - 1]))


def test_layer_prune_hits_each_tensor():
    g = torch.Generator().manual_seed(1)
    tensors = {"small": torch.randn(10, 10, generator=g) * 1e-3, "big": torch.randn(20, 5, generator=g)}
    pruned, res = magnitude_prune(tensors, 0.4, scope="layer")
    for name, t in pruned.items():
        assert int((t == 0).sum()) == round(0.4 * t.numel())
        assert res.per_layer[name] == pytest.approx(0.4)
        kept_min = t[t != 0].abs().min()
        assert kept_min >= tensors[name][t == 0].abs().max()
    # global scope takes all 80 zeros from the small tensor, whose entries are all below the big one's
    pruned_g, _ = magnitude_prune(tensors, 0.4, scope="global")
    assert int((pruned_g["small"] == 0).sum()) == 80
    assert int((pruned_g["big"] == 0).sum()) == 0


def test_prune_ties_are_exact_and_in_index_order():
    t = {"x": torch.full((4, 5), 0.5), "y": torch.tensor([[0.5, -0.5], [2.0, 0.1]])}
    pruned, res = magnitude_prune(t, 0.5)
    total = 24
    assert res.zeroed == 12 and res.achieved_sparsity == pytest.approx(0.5)
    # 0.1 is the smallest; then 11 of the 22 entries tied at 0.5, the first ones in flat order (all in "x")
    assert pruned["y"][1, 1] == 0
    flat_x = pruned["x"].reshape(-1)
    assert torch.equal(flat_x[:11], torch.zeros(11)) and torch.all(flat_x[11:] == 0.5)
    assert pruned["y"][0, 0] == 0.5 and pruned["y"][0, 1] == -0.5 and pruned["y"][1, 0] == 2.0
    assert total == sum(v.numel() for v in t.values())


def test_prune_edges_and_existing_zeros():
    t = {"w": torch.tensor([[0.0, 0.0, 1.0, -2.0], [3.0, 0.5, -0.25, 4.0]])}
    same, res0 = magnitude_prune(t, 0.0)
    assert torch.equal(same["w"], t["w"]) and res0.zeroed == 0 and res0.achieved_sparsity == pytest.approx(0.25)
    allz, res1 = magnitude_prune(t, 1.0)
    assert torch.count_nonzero(allz["w"]) == 0 and res1.achieved_sparsity == 1.0
    p, r = magnitude_prune(t, 0.5)
    assert r.achieved_sparsity == 0.5
    assert sorted(p["w"][p["w"] != 0].abs().tolist()) == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.3", True])
def test_prune_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune({"w": torch.ones(2, 2)}, bad)


def test_prune_rejects_bad_scope_and_inputs():
    with pytest.raises(ValueError, match="scope must be 'global' or 'layer'"):
        magnitude_prune({"w": torch.ones(2, 2)}, 0.5, scope="row")
    with pytest.raises(ValueError, match=r"tensors\['i'\] must be a floating-point tensor"):
        magnitude_prune({"i": torch.ones(2, 2, dtype=torch.long)}, 0.5)


def test_prune_model_leaves_biases_and_norms_and_prunes_tied_head(nano):
    import copy

    model = copy.deepcopy(nano)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = prune_model_(model, 0.4)
    decayed = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    zeros = sum(int((p == 0).sum()) for p in decayed.values())
    total = sum(p.numel() for p in decayed.values())
    assert zeros == round(0.4 * total) and res.achieved_sparsity == pytest.approx(zeros / total)
    for n, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p, before[n]), n
    assert model.lm_head.weight is model.transformer.wte.weight
    assert int((model.lm_head.weight == 0).sum()) == int((model.transformer.wte.weight == 0).sum()) > 0


# ------------------------------------------------------------------------------------------------ histograms
def test_histograms_group_by_layer_type_and_count_everything(nano):
    dec = decayed_tensors(nano.named_parameters())
    hists = magnitude_histograms(dec, bins=30)
    assert list(hists) == ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "embedding"]
    for kind, h in hists.items():
        assert h.counts.sum() == h.numel
        assert h.numel == sum(dec[n].numel() for n in h.names)
        assert all(layer_type(n) == kind for n in h.names)
        assert len(h.edges) == 31 and len(h.counts) == 30
    assert sum(h.numel for h in hists.values()) == sum(t.numel() for t in dec.values())
    assert hists["attn.qkv"].names == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]


def test_histogram_bins_values_and_clamps_outside_range():
    t = {"h.0.mlp.c_fc.weight": torch.tensor([[0.0, 1e-9, 0.02, -0.02], [0.5, 5.0, 50.0, -0.0005]])}
    edges = np.array([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    h = magnitude_histograms(t, edges)["mlp.fc"]
    # [0, 1e-9, 5e-4] below the first edge -> bin 0 with [1e-3, 1e-2); 0.02, 0.02 -> bin 1; 0.5 -> bin 2;
    # 5.0 -> bin 3; 50 above the last edge -> bin 3
    assert h.counts.tolist() == [3, 2, 1, 2]
    assert h.zeros == 1 and h.numel == 8


def test_shared_edges_and_small_fraction():
    a = {"x.c_fc.weight": torch.tensor([[1e-4, 1e-2]]), "x.c_attn.weight": torch.tensor([[1.0, 0.0]])}
    edges = magnitude_edges(a.values(), bins=4)
    assert edges[0] == pytest.approx(1e-4) and edges[-1] == pytest.approx(1.0) and len(edges) == 5
    assert small_weight_fraction(a, 1e-3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        magnitude_edges(a.values(), bins=0)
    with pytest.raises(ValueError, match="edges must be an increasing"):
        magnitude_histograms(a, np.array([1.0, 0.5]))


# ------------------------------------------------------------------------------------------------ speed-up
def test_steps_to_target_interpolates():
    assert steps_to_target([0, 10, 20, 30], [5.0, 4.0, 3.0, 2.0], 3.5) == pytest.approx(15.0)
    assert steps_to_target([0, 10, 20], [5.0, 4.0, 3.0], 3.0) == pytest.approx(20.0)
    assert steps_to_target([0, 10, 20], [5.0, 4.0, 3.5], 3.0) is None
    assert steps_to_target([5, 10], [2.0, 1.0], 3.0) == 5.0
    # the first crossing counts, even when the curve rises again
    assert steps_to_target([0, 10, 20, 30], [5.0, 2.0, 4.0, 1.0], 3.0) == pytest.approx(0 + 10 * (2 / 3))
    # a missing point is skipped
    assert steps_to_target([0, 10, 20], [5.0, float("nan"), 3.0], 4.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        steps_to_target([0, 0], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="same length"):
        steps_to_target([0, 1], [1.0], 1.0)


def test_speedup_known_answers():
    steps = list(range(0, 101, 10))
    ref = (steps, [4.0 - 0.02 * s for s in steps])            # 4.0 -> 2.0 over 100 steps
    cand = (steps, [4.0 - 0.04 * s for s in steps])           # twice as fast
    assert speedup(ref, cand, 2.0) == pytest.approx(2.0)
    assert speedup(cand, ref, 2.0) == pytest.approx(0.5)
    assert speedup(ref, ref, 3.0) == pytest.approx(1.0)
    slow = (steps, [4.0 - 0.01 * s for s in steps])           # reaches only 3.0
    assert speedup(ref, slow, 2.5) == 0.0
    assert speedup(slow, ref, 2.5) is None
    # in tokens: 3x the tokens per step, same curve per token -> no speed-up in tokens
    tokens = [3 * s for s in steps]
    assert speedup(ref, (tokens, [4.0 - 0.02 * t / 3 for t in tokens]), 2.0) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------ outliers
def test_outlier_schedule_is_deterministic():
    a, b = OutlierSchedule(seed=7, rate=0.1), OutlierSchedule(seed=7, rate=0.1)
    ev = a.events(2000)
    assert ev == b.events(2000)
    assert 150 < len(ev) < 250                                # rate 0.1
    assert ev != OutlierSchedule(seed=8, rate=0.1).events(2000)
    assert all(i >= 500 for i in OutlierSchedule(seed=7, rate=0.1, start=500).events(2000))
    assert set(OutlierSchedule(seed=7, rate=0.1, start=500).events(2000)) == {i for i in ev if i >= 500}
    assert OutlierSchedule(seed=7, rate=0.0).events(100) == []
    pos, signs = a.spike(ev[0], 3, 10_000)
    pos2, signs2 = b.spike(ev[0], 3, 10_000)
    assert np.array_equal(pos, pos2) and np.array_equal(signs, signs2)
    assert len(pos) == 10 and len(set(pos.tolist())) == 10 and set(signs.tolist()) <= {-1.0, 1.0}


def test_outlier_apply_spikes_only_the_chosen_entries():
    s = OutlierSchedule(seed=0, rate=1.0, scale=50.0, fraction=0.01)
    g = torch.randn(40, 50, generator=torch.Generator().manual_seed(0))
    out = s.apply(g, 3, 2)
    pos, signs = s.spike(3, 2, g.numel())
    diff = (out - g).reshape(-1)
    assert torch.count_nonzero(diff) == len(pos) == 20
    rms = g.pow(2).mean().sqrt()
    assert torch.allclose(diff[torch.from_numpy(pos)], 50.0 * rms * torch.from_numpy(signs).float(), rtol=1e-5)
    assert torch.equal(s.apply(g, 3, 2), out)                 # no hidden state
    scaled = OutlierSchedule(seed=0, rate=1.0, scale=10.0, mode="scale").apply(g, 0, 0)
    assert torch.allclose(scaled, 10 * g)


@pytest.mark.parametrize("field, value, match", [
    ("rate", 1.5, "outlier rate must be in"), ("scale", 0.0, "outlier scale must be a positive"),
    ("fraction", 0.0, "outlier fraction must be in"), ("mode", "add", "outlier mode must be one of spike, scale"),
    ("seed", -1, "outlier seed"), ("start", 1.5, "outlier start"),
])
def test_outlier_schedule_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        OutlierSchedule(**{field: value})


def _grads_with_injector(schedule, steps=4):
    model = build_model("nano", vocab_size=300, context=32, seed=0)
    inj = OutlierInjector(schedule).install(model)
    x = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(steps):
        model.train()
        model.zero_grad()
        model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.eval()
        with torch.no_grad():
            model(input_ids=x[:, :-1])                        # eval passes are not counted
    return inj, grads


def test_injector_changes_exactly_the_event_micro_batches():
    events = OutlierSchedule(seed=2, rate=0.5).events(4)
    assert 0 < len(events) < 4
    inj, spiked = _grads_with_injector(OutlierSchedule(seed=2, rate=0.5))
    _, clean = _grads_with_injector(OutlierSchedule(seed=2, rate=0.0))
    assert [e["micro_batch"] for e in inj.events] == events
    n_params = len([p for p in build_model("nano", vocab_size=300, context=32).parameters()])
    assert all(e["params"] == n_params for e in inj.events)
    for i in range(4):
        same = all(torch.equal(spiked[i][n], clean[i][n]) for n in clean[i])
        assert same == (i not in events)
    # same schedule, same events, same gradients: what makes the arm identical for every optimizer
    inj2, spiked2 = _grads_with_injector(OutlierSchedule(seed=2, rate=0.5))
    assert inj2.events == inj.events
    assert all(torch.equal(spiked[i][n], spiked2[i][n]) for i in range(4) for n in spiked[i])


# ------------------------------------------------------------------------------------------------ verdicts
def test_compare_values_one_seed_uses_min_effect_only():
    c = compare_values([3.00], [2.95], min_effect=0.01)
    assert c.outcome == "better" and c.noise is None and c.threshold == 0.01
    assert c.difference == pytest.approx(-0.05)
    assert compare_values([3.00], [3.005], min_effect=0.01).outcome == "same"
    assert compare_values([3.00], [3.02], min_effect=0.01).outcome == "worse"


def test_compare_values_uses_seed_noise():
    ref = [3.00, 3.10, 2.90]
    noisy = [2.90, 3.15, 2.86]                                # mean diff -0.03, paired SE large
    c = compare_values(ref, noisy, min_effect=0.01)
    diffs = np.array(noisy) - np.array(ref)
    se = diffs.std(ddof=1) / math.sqrt(3)
    assert c.noise == pytest.approx(se) and c.threshold == pytest.approx(4.302653 * se)
    assert c.outcome == "same"
    steady = [2.97, 3.07, 2.87]                               # the same -0.03 in every seed
    assert compare_values(ref, steady, min_effect=0.01).outcome == "better"
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        compare_values([1.0], [1.0, 2.0], min_effect=0.0)


def test_t_critical_values_match_the_table():
    """Two-sided 5% critical values of Student's t (any statistics table), and the normal limit."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}
    for df, t in table.items():
        assert t_critical(df) == pytest.approx(t, abs=5e-4), df
    assert t_critical(2, alpha=0.01) == pytest.approx(9.925, abs=5e-4)
    assert t_critical(10_000) == pytest.approx(1.960, abs=1e-3)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="df must be an integer >= 1"):
            t_critical(bad)


@pytest.mark.parametrize("ref, cand", [
    ([3.00, 3.10], [2.95, 3.07]),                      # 2 seeds: differences -0.05, -0.03 (mean -0.04, SE 0.01)
    ([3.00, 3.10, 2.90], [2.95, 3.08, 2.87]),          # 3 seeds: -0.05, -0.02, -0.03 (mean -0.033, SE 0.0088)
])
def test_few_seeds_negative_control(ref, cand):
    """A difference twice its standard error is no evidence at 2-3 seeds: a naive rule (|mean| > 2 SE) would
    call these real; a paired t test at 5% does not (p = 0.16 and 0.06)."""
    diffs = np.array(cand) - np.array(ref)
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert abs(diffs.mean()) > max(0.01, 2 * se)           # what the naive rule would see
    c = compare_values(ref, cand, min_effect=0.01)
    assert c.outcome == "same"
    assert c.t_critical == pytest.approx(t_critical(len(diffs) - 1))
    assert c.threshold == pytest.approx(c.t_critical * se) and abs(c.difference) < c.threshold
    assert c.p_value == pytest.approx(scipy.stats.ttest_rel(cand, ref).pvalue) and c.p_value > 0.05


def test_few_seeds_consistent_difference_is_real():
    """A difference far beyond its noise is real under both rules, in either direction."""
    ref, cand = [3.00, 3.10, 2.90], [2.95, 3.052, 2.848]  # -0.05, -0.048, -0.052: SE 0.0012
    c = compare_values(ref, cand, min_effect=0.01)
    assert c.outcome == "better" and c.difference == pytest.approx(-0.05) and c.p_value < 0.001
    assert c.threshold == pytest.approx(0.01)               # t x SE = 0.005 < the minimum effect
    assert compare_values(cand, ref, min_effect=0.01).outcome == "worse"
