"""AdamHD under DeepSpeed AutoTP (``"tensor_parallel": {"autotp_size": 2}``) with ZeRO-1/2 on CPU ranks.

A tensor-parallel layer is sliced over the tensor-parallel ranks and its slices partitioned again by ZeRO over
the data-parallel ones: its statistic is the sum over both, and a layer AutoTP keeps whole (embeddings, norms,
the row-wise biases) must be counted once, all in the one all-reduce of the step. Checked against one process on
the whole model over the same global batches (params and every δ within 1e-5), through
``adamhd_dist.deepspeed.initialize``, the user's own ``deepspeed.initialize`` + ``attach`` and DeepSpeed's
optimizer wrapper; a same-layout save/resume; a universal checkpoint of a tp-1 run (all ranks data-parallel)
loaded at tp 2; the refusals; and the data-parallel-only sum as a negative control. One launch of 4 ranks
(tp 2 × dp 2) carries every case: a launch of transformers + DeepSpeed on a loaded 2-core machine costs most of
the time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from dist_utils import ROOT, run_ranks  # noqa: E402

TOL = 1e-5
CASES = [{"stage": 1}, {"stage": 2}, {"stage": 2, "door": "attach"}, {"stage": 1, "door": "wrapper"},
         {"stage": 2, "naive": True}, {"stage": 2, "ckpt": True}]
REFUSALS = [(0, "initialize"), (3, "initialize"), (0, "attach")]
WORLD, TP = 4, 2
UNIVERSAL = [1, 2]  # ZeRO stages loading a tp-1 × dp-4 universal checkpoint at tp 2 × dp 2


@pytest.fixture(scope="module")
def autotp_ck(tmp_path_factory):
    return tmp_path_factory.mktemp("autotp_ck")


@pytest.fixture(scope="module")
def tp2(autotp_ck):
    return run_ranks("dist_workers_autotp:suite", WORLD, timeout=900,
                     kwargs={"world": WORLD, "tp": TP, "cases": CASES, "refusals": REFUSALS,
                             "ckpt_dir": str(autotp_ck), "universal": UNIVERSAL})


def _key(case):
    return tuple(sorted(case.items()))


def whole(ranks, key, ref_params, part="params"):
    """Every parameter whole again: the slices of a tensor-parallel one concatenated in tensor-parallel rank
    order along the dimension AutoTP cut."""
    by_tp = {}
    for r in ranks:
        res = r[key] if part == "params" else r[key][part]
        first = by_tp.setdefault(r[key]["tp_rank"], res)
        for name, (p, _) in res["params"].items():  # data-parallel replicas of a tensor-parallel rank agree
            assert torch.equal(p, first["params"][name][0]), (key, name)
    out = {}
    for name, ref in ref_params.items():
        pieces = [by_tp[t]["params"][name] for t in sorted(by_tp)]
        if not pieces[0][1]:
            out[name] = pieces[0][0]
            continue
        dim = next(d for d in range(ref.dim()) if pieces[0][0].shape[d] != ref.shape[d])
        out[name] = torch.cat([p for p, _ in pieces], dim=dim)
    return out


def errors(ranks, key, part="params"):
    ref = ranks[0]["reference"]
    got = whole(ranks, key, ref["params"], part)
    scale = max(float(p.abs().max()) for p in ref["params"].values())
    perr = max(float((got[n] - ref["params"][n]).abs().max()) for n in ref["params"]) / scale
    deltas = ranks[0][key]["deltas"] if part == "params" else ranks[0][key][part]["deltas"]
    assert set(deltas) == set(ref["deltas"])
    derr = max(abs(deltas[n] - d) / abs(d) for n, d in ref["deltas"].items())
    return perr, derr


@pytest.mark.parametrize("case", [c for c in CASES if not c.get("naive") and not c.get("ckpt")], ids=str)
def test_autotp_equals_one_process(tp2, case):
    res = tp2[0][_key(case)]
    assert "error" not in res, res["error"]
    perr, derr = errors(tp2, _key(case))
    assert perr < TOL and derr < TOL, (perr, derr)
    assert res["counts"]["reduce"] == 4, res["counts"]  # ONE collective per step (4 steps) for every layer
    assert all(r[_key(case)]["deltas"] == res["deltas"] for r in tp2), "every rank uses the same δ"


def test_the_data_parallel_only_sum_is_visibly_wrong(tp2):
    res = tp2[0][_key({"stage": 2, "naive": True})]
    assert "error" not in res, res["error"]
    _, derr = errors(tp2, _key({"stage": 2, "naive": True}))
    assert derr > 1e-2, derr  # a slice's mean taken for the layer's


def test_save_and_resume_keeps_mu_under_autotp(tp2):
    key = _key({"stage": 2, "ckpt": True})
    res = tp2[0][key]
    assert "error" not in res, res["error"]
    assert max(errors(tp2, key)) < TOL
    perr, derr = errors(tp2, key, part="resumed")
    assert perr < TOL and derr < TOL, (perr, derr)


@pytest.mark.parametrize("stage,door", REFUSALS)
def test_autotp_without_exact_layout_is_refused(tp2, stage, door):
    msg = tp2[0][("refuse", stage, door)]
    assert msg is not None, "refused"
    assert "autotp_size" in msg and "stage" in msg, msg


def test_universal_checkpoint_changes_tensor_and_data_parallel_degree(tp2):
    """tp 1 × dp 4 (ZeRO-2) saved at step 2 → ``to-universal`` → tp 2 × dp 2 under ZeRO-1 and ZeRO-2: DeepSpeed cuts
    the whole weights and moments for AutoTP, μ comes by layer name; the last steps land on the one-process run."""
    assert "error" not in tp2[0]["tp1"], tp2[0]["tp1"]["error"]
    assert max(errors(tp2, "tp1")) < TOL  # the tp-1 run itself is exact
    for stage in UNIVERSAL:
        key = ("universal", stage)
        assert "error" not in tp2[0][key], tp2[0][key]["error"]
        assert {r[key]["tp_rank"] for r in tp2} == {0, 1}
        perr, derr = errors(tp2, key)
        assert perr < TOL and derr < TOL, (stage, perr, derr)


def test_tensor_parallel_checkpoints_refuse_our_reshard_and_the_export(tp2, autotp_ck):
    """Our reshard and export join data-parallel pieces by layer name: a checkpoint of another tensor-parallel
    size is refused at load, and an AutoTP checkpoint at export, both naming the universal checkpoint."""
    msg = tp2[0]["plain_reshard"]
    assert msg and f"was written at tensor-parallel size 1, 1 pipeline stage(s) and {WORLD} data-parallel ranks; " \
        f"this engine runs tensor-parallel size {TP}, 1 stage(s) and {WORLD // TP} data-parallel ranks" in msg, msg
    assert '"checkpoint": {"load_universal": true}' in msg
    src = autotp_ck / "ck_ckptTrue_stage2"
    proc = subprocess.run([sys.executable, "-m", "adamhd_dist.deepspeed", "export", str(src), "--out",
                           str(autotp_ck / "x.pt")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"holds tensor-parallel slices ({TP} model-parallel ranks): export joins data-parallel pieces only" in \
        proc.stderr and "to-universal" in proc.stderr, proc.stderr[-3000:]
    assert not (autotp_ck / "x.pt").exists()
