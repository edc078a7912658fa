"""AdamHD under DeepSpeed pipeline parallelism (``PipelineModule``, ZeRO-1, ``engine.train_batch``) on CPU ranks
(gloo): 2 stages × dp 1 (world 2) and 2 stages × dp 2 (world 4), each against single-process AdamHD on the full,
unpipelined model with the same global batch and the same clipping.

Exact means: the params of every stage within 1e-5·max|θ_ref| and every δ within 1e-5 relative after every step.
Each layer's statistic belongs to its stage: AdamHD's one collective per step runs over the stage's data-parallel
group (its ranks are checked against the stages every rank reports), none at dp 1. Tied layers across stages
(``TiedLayerSpec``) are exact, both copies equal; a checkpoint saved mid-run resumes as the uninterrupted run; a
stage without decayed layers is refused at attach with the reason (DeepSpeed would hang at the first step);
ZeRO-2/3 are refused by DeepSpeed; the export refuses a pipeline checkpoint. One launch per world size; the
per-rank code is tests/dist_workers_pipeline.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import dist_workers_pipeline as W
from dist_utils import ROOT, run_ranks

TOL = 1e-5
WORLDS = (2, 4)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"pp2_dp{w // 2}")
def world(request, tmp_path_factory):
    ck = tmp_path_factory.mktemp(f"pp{request.param}")
    return request.param, run_ranks("dist_workers_pipeline:deepspeed_suite", request.param,
                                    kwargs={"ckdir": str(ck)}, timeout=400), ck


def _errors(kind, res, ref, first=0, deltas=True):
    """(max param error relative to max|θ_ref|, max δ relative error) of one rank's run against the reference."""
    scale = max(p.abs().max().item() for p in ref["params"].values())
    perr = max((p - ref["params"][W.ref_name(kind, n)]).abs().max().item() for n, p in res["params"].items()) / scale
    derr = 0.0
    for i, d in enumerate(res["deltas"] if deltas else ()):
        want = ref["deltas"][first + i]
        assert d, "every step has δ of the stage's decayed layers"
        for n, v in d.items():
            derr = max(derr, abs(v - want[W.ref_name(kind, n)]) / abs(want[W.ref_name(kind, n)]))
    return perr, derr


def _assert_exact(world, case, kind="main"):
    w, ranks, _ = world
    ref = ranks[0]["reference"][kind]
    stages = set()
    for r in ranks:
        res = r[case]
        assert "error" not in res, res["error"]
        perr, derr = _errors(kind, res, ref)
        assert perr < TOL and derr < TOL, (case, perr, derr)
        stages.add(res["stage"])
        # the statistic's collective: one per step over this stage's data-parallel ranks, none without dp
        want = [[res["stage_ranks"]]] * len(res["calls"]) if w > 2 else [[]] * len(res["calls"])
        assert res["calls"] == want, (res["calls"], res["stage_ranks"])
    assert stages == {0, 1}
    names = set().union(*(r[case]["params"] for r in ranks))
    assert {W.ref_name(kind, n) for n in names} == set(ref["params"]), "every layer lives on some stage"


@pytest.mark.parametrize("case", ["main", "attach"])
def test_pipeline_equals_one_process(world, case):
    """Through adamhd_dist.deepspeed.initialize and through deepspeed.initialize + attach."""
    _assert_exact(world, case)


def test_tied_layer_across_stages_is_exact(world):
    _assert_exact(world, "tied", "tied")
    ranks = world[1]
    copies = [r["tied"]["params"]["tied_modules.tie.weight"] for r in ranks]
    assert all((c == copies[0]).all() for c in copies), "the tied copies of both stages stay identical"


def test_stage_without_decayed_layers_is_refused_loudly(world):
    for r in world[1]:
        err = r["nodecay"].get("error", "")
        assert "same number of optimizer param groups" in err and "{0: 2, 1: 1}" in err, err


def test_stage_without_decayed_layers_joins_no_statistic_collective(world):
    """The same model with the groups given per stage (two undecayed groups on the norm-and-bias stage): exact, and
    that stage issues no collective for the statistic while the other reduces over its own dp group."""
    w, ranks, _ = world
    ref = ranks[0]["reference"]["nodecay"]
    for r in ranks:
        res = r["nodecay_split"]
        assert "error" not in res, res["error"]
        perr, _ = _errors("nodecay", res, ref, deltas=False)
        assert perr < TOL, perr
        if res["stage"] == 1:
            assert res["calls"] == [[]] * W.STEPS and all(d == {} for d in res["deltas"]), res["calls"]
        else:
            assert _errors("nodecay", res, ref)[1] < TOL
            assert res["calls"] == ([[res["stage_ranks"]]] if w > 2 else [[]]) * W.STEPS, res["calls"]


def test_plain_initialize_without_attach_refuses(world):
    for r in world[1]:
        err = r["plain"].get("error", "")
        assert "UnplacedTensorError" in err or "flat" in err, err


def test_checkpoint_resume_continues_as_the_uninterrupted_run(world):
    for r in world[1]:
        res, full = r["resume"], r["main"]
        assert "error" not in res, res["error"]
        assert res["loaded_deltas"] == res["saved_deltas"], "μ comes back with the checkpoint"
        assert f"adamhd_layer_state.stage{full['stage']}.pt" in res["files"], res["files"]
        for n, p in res["params"].items():
            assert (p - full["params"][n]).abs().max().item() == 0.0, n  # bitwise on CPU at the same world size
        assert res["deltas"] == full["deltas"][W.SAVE_AT:]


def test_export_refuses_a_pipeline_checkpoint_naming_the_universal_one(world):
    """Each stage's file holds that stage's layers only: the export (data-parallel pieces joined by name) refuses
    and names the universal checkpoint, which writes every parameter whole."""
    _, _, ck = world
    proc = subprocess.run([sys.executable, "-m", "adamhd_dist.deepspeed", "export", str(ck), "--out",
                           str(ck / "x.pt")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "holds pipeline stages (adamhd_layer_state.stage0.pt, adamhd_layer_state.stage1.pt): export joins " \
        "data-parallel pieces only" in proc.stderr and "to-universal" in proc.stderr, proc.stderr[-3000:]
    assert not (ck / "x.pt").exists()


def test_zero2_and_zero3_are_refused_by_deepspeed(world):
    for r in world[1]:
        for key in ("zero2", "zero3"):
            assert r[key] and "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism" in r[key], r[key]


def test_a_per_partition_statistic_is_visibly_wrong(world):
    """The negative control: each ZeRO-1 flat partition taken as one layer."""
    ranks = world[1]
    for r in ranks:
        assert "error" not in r["naive"], r["naive"]["error"]
    worst = [max(e) for e in zip(*(_errors("main", r["naive"], ranks[0]["reference"]["main"]) for r in ranks))]
    assert worst[0] > 10 * TOL and worst[1] > 1000 * TOL, worst
