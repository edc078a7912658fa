"""AdamHD under ``torch.distributed.pipelining`` on CPU ranks (gloo): 2 stages × dp 1 (world 2, plain stage
modules) and 2 stages × dp 2 (world 4, each stage's module ``fully_shard``-ed over its "dp" sub-mesh of a
("pp", "dp") mesh), with ``ScheduleGPipe``, ``Schedule1F1B`` and ``ScheduleInterleaved1F1B`` (two stages per
rank) over 4 microbatches, each against single-process AdamHD on the full model with the same global batch.

Exact means: the params of every stage within 1e-5·max|θ_ref| and every δ within 1e-5 relative after every step.
Each rank's AdamHD holds its stage's layers only, and each layer's statistic stays in its stage: one collective
per step over the stage's dp group at dp 2, none at dp 1, none on a stage without decayed layers (at any dp); the
schedule reduces the FSDP2 gradients once per step, not per microbatch; gradients clipped to the whole model's
norm across stages match ``clip_grad_norm_`` on the full model. A DCP checkpoint per stage (μ included)
resumes on fresh objects and fresh process groups as the uninterrupted run, and the dp 2 checkpoint resumes at
dp 1; a per-shard statistic, the negative control, is visibly wrong. One launch per world size; the per-rank code
is tests/dist_workers_torchpp.py.
"""

from __future__ import annotations

import pytest

import dist_workers_torchpp as W
from dist_utils import run_ranks

TOL = 1e-5
WORLDS = (2, 4)


def _launch(w, tmp_path_factory, load_from=None):
    ck = tmp_path_factory.mktemp(f"torchpp{w}")
    return w, run_ranks("dist_workers_torchpp:suite", w, kwargs={"ckdir": str(ck), "load_from": load_from},
                        timeout=300), str(ck)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _launch(4, tmp_path_factory)


@pytest.fixture(scope="module")
def world2(world4, tmp_path_factory):
    """World 2 also resumes the checkpoint world 4 wrote (at dp 2) at dp 1."""
    return _launch(2, tmp_path_factory, load_from=world4[2])


@pytest.fixture(params=WORLDS, ids=lambda w: f"pp2_dp{w // 2}")
def world(request):
    return request.getfixturevalue(f"world{request.param}")[:2]


def _errors(res, ref, first=0):
    """(max param error of this rank's stage relative to max|θ_ref| of the whole model, max δ relative error)."""
    scale = max(p.abs().max().item() for p in ref["params"].values())
    perr = max((p - ref["params"][n]).abs().max().item() for n, p in res["params"].items()) / scale
    derr = 0.0
    for i, d in enumerate(res["deltas"]):
        want = ref["deltas"][first + i]
        assert set(d) == {n for n in want if n in res["params"]}, (sorted(d), sorted(want))
        for n, v in d.items():
            derr = max(derr, abs(v - want[n]) / abs(want[n]))
    return perr, derr


def _stat_calls(w, res, decayed=True):
    """The collectives AdamHD's step must issue: one per step over this stage's dp group, with dp > 1 and decayed
    layers; none otherwise."""
    one = [res["dp_ranks"]] if (w > 2 and decayed) else []
    return [{"statistic": one, "all_reduce": one, "comm": len(one)}] * len(res["calls"])


def _assert_stages(ranks, case, config="main"):
    ref = ranks[0]["reference"][config]
    assert {r[case]["stage"] for r in ranks} == {0, 1}
    by_stage = {}
    for r in ranks:
        by_stage.setdefault(r[case]["stage"], set(r[case]["params"]))
        assert set(r[case]["params"]) == by_stage[r[case]["stage"]]
    assert not by_stage[0] & by_stage[1], "each rank's optimizer holds its stage's layers only"
    assert by_stage[0] | by_stage[1] == set(ref["params"]), "every layer lives on some stage"


@pytest.mark.parametrize("case", ["gpipe", "1f1b", "interleaved"])
def test_pipeline_equals_one_process(world, case):
    """GPipe (FSDP2 resharding after forward), 1F1B (``reshard_after_forward=False``, as torchtitan) and
    interleaved 1F1B (two stages per rank, one AdamHD over both)."""
    w, ranks = world
    ref = ranks[0]["reference"]["main"]
    _assert_stages(ranks, case)
    for r in ranks:
        res = r[case]
        assert "error" not in res, res["error"]
        assert res["sharded"] == (w > 2) and res["decayed"] > 0
        perr, derr = _errors(res, ref)
        assert perr < TOL and derr < TOL, (case, res["stage"], perr, derr)
        # the statistic stays in the stage: its group is the stage's dp group
        assert set(res["dp_ranks"]) <= set(res["stage_ranks"]) and len(res["dp_ranks"]) == w // 2
        assert res["calls"] == _stat_calls(w, res), res["calls"]
        assert res["chunks"] == (2 if case == "interleaved" else 1)
        if w > 2:  # FSDP2's gradients reduced once per step and stage module by the schedule, over 4 microbatches
            assert [c.get("reduce_scatter_single", 0) + c.get("reduce_scatter_tensor", 0)
                    for c in res["schedule_comms"]] == [res["chunks"]] * W.STEPS, res["schedule_comms"]


def test_clipping_across_stages_equals_one_process(world):
    """1F1B with the gradients clipped to the whole model's norm (each stage's norm squared, summed over "pp"),
    against ``clip_grad_norm_`` on the full model; the clipping is active at every step and changes the run."""
    w, ranks = world
    ref, unclipped = ranks[0]["reference"]["clip"], ranks[0]["reference"]["main"]
    assert len(ref["grad_norms"]) == W.STEPS and min(ref["grad_norms"]) > W.CLIP, ref["grad_norms"]
    scale = max(p.abs().max().item() for p in ref["params"].values())
    moved = max((p - unclipped["params"][n]).abs().max().item() for n, p in ref["params"].items()) / scale
    assert moved > 100 * TOL, moved
    _assert_stages(ranks, "clip")
    for r in ranks:
        res = r["clip"]
        assert "error" not in res, res["error"]
        perr, derr = _errors(res, ref)
        assert perr < TOL and derr < TOL, (res["stage"], perr, derr)
        assert res["calls"] == _stat_calls(w, res), res["calls"]


def test_stage_without_decayed_layers_joins_no_collective(world):
    """Stage 1 holds a LayerNorm and a bias only: AdamHD's step there issues no collective at any dp; stage 0 still
    reduces its decayed layers once per step over its dp group (none at dp 1); both exact."""
    w, ranks = world
    ref = ranks[0]["reference"]["nodecay"]
    _assert_stages(ranks, "nodecay", "nodecay")
    for r in ranks:
        res = r["nodecay"]
        assert "error" not in res, res["error"]
        perr, derr = _errors(res, ref)
        assert perr < TOL and derr < TOL, (res["stage"], perr, derr)
        if res["stage"] == 1:
            assert res["decayed"] == 0 and all(d == {} for d in res["deltas"])
            assert res["calls"] == _stat_calls(w, res, decayed=False), res["calls"]
        else:
            assert res["decayed"] > 0
            assert res["calls"] == _stat_calls(w, res), res["calls"]


def test_checkpoint_resume_continues_as_the_uninterrupted_run(world):
    w, ranks = world
    ref = ranks[0]["reference"]["main"]
    for r in ranks:
        res, full = r["resume"], r["gpipe"]
        assert "error" not in res, res["error"]
        assert res["stage"] == full["stage"]
        assert res["saved_mu"] and res["loaded_mu"] == res["saved_mu"], "μ comes back with the checkpoint"
        assert res["loaded_deltas"] == res["saved_deltas"]
        # μ is in the stage's DCP files, one entry per decayed layer of the stage
        assert res["mu_keys"] == sorted(f"optim.state.{n}.delta_ema" for n in res["saved_mu"]), res["mu_keys"]
        for n, p in res["params"].items():
            assert (p - full["params"][n]).abs().max().item() == 0.0, n  # bitwise on CPU at the same layout
        assert res["deltas"] == full["deltas"][W.SAVE_AT:]
        perr, derr = _errors(res, ref, first=W.SAVE_AT)
        assert perr < TOL and derr < TOL, (perr, derr)
        assert res["calls"] == _stat_calls(w, res), res["calls"]


def test_a_dp2_checkpoint_resumes_at_dp1(world2, world4):
    """The FSDP2-sharded checkpoint of each stage (pp 2 × dp 2) loaded into the plain stage modules of pp 2 × dp 1:
    μ as saved, and the continued run exact against the reference."""
    ranks2, ranks4 = world2[1], world4[1]
    saved = {r["resume"]["stage"]: r["resume"]["saved_mu"] for r in ranks4}
    ref = ranks2[0]["reference"]["main"]
    for r in ranks2:
        res = r["resume_other_dp"]
        assert "error" not in res, res["error"]
        assert not res["sharded"] and res["loaded_mu"] == saved[res["stage"]], (res["loaded_mu"], saved)
        perr, derr = _errors(res, ref, first=W.SAVE_AT)
        assert perr < TOL and derr < TOL, (perr, derr)


def test_a_per_shard_statistic_is_visibly_wrong(world4):
    """The negative control at pp 2 × dp 2: each rank's FSDP2 shard taken as the layer (local sums, local numel)."""
    _, ranks, _ = world4
    ref = ranks[0]["reference"]["main"]
    worst = [0.0, 0.0]
    for r in ranks:
        assert "error" not in r["naive"], r["naive"]["error"]
        worst = [max(a, b) for a, b in zip(worst, _errors(r["naive"], ref))]
    assert worst[0] > 10 * TOL and worst[1] > 1000 * TOL, worst
