"""AdamHD through the ecosystem's doors on CPU ranks (gloo): the transformers Trainer with DeepSpeed (ZeRO-2, ZeRO-3,
offload) and FSDP2 plus ``AdamHDCallback``, a Trainer save/resume, Accelerate's DeepSpeed plugin plus
``adamhd_dist.deepspeed.attach``, and Accelerate's FSDP2 in-place parameter swap at world 3.

Every run is compared with single-process AdamHD on the unsharded model with the same global batch (max|θ −
θ_ref| ≤ 1e-5·max|θ_ref|, every δ within 1e-5 relative). Negative controls: without the callback, or without
attach, the first step refuses (a per-partition δ would be 1.7e-4 to 2.2e-4 off the reference on this model).
DeepSpeed AutoTP (tp 2 × dp 1, ZeRO-1/2) through the Trainer + callback and through Accelerate + attach, on a tiny
LLaMA: the tensor-parallel slices are joined again and compared the same way, with one all-reduce per step and the
whole global batch on both tensor-parallel ranks; without the callback it refuses. Two launches (world 2 and world 3;
tests/dist_workers_hf.py ``suite`` runs the cases of a world size one after another in the same processes; the
AutoTP cases come last in theirs).
"""

from __future__ import annotations

import pytest
import torch

import dist_workers_hf as W
from dist_utils import run_ranks

TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return W.reference("adamhd")


# DeepSpeed AutoTP, tp 2 × dp 1 (the tiny LLaMA of dist_workers_hf.build_llama)
AUTOTP = [("trainer_autotp_z2", "trainer_autotp", dict(world=2, stage=2)),
          ("trainer_autotp_z1", "trainer_autotp", dict(world=2, stage=1)),
          ("accelerate_autotp_z2", "accelerate_autotp", dict(world=2, stage=2)),
          ("accelerate_autotp_z1_wrapper", "accelerate_autotp", dict(world=2, stage=1, door="wrapper")),
          ("trainer_autotp_z2_no_callback", "trainer_autotp", dict(world=2, stage=2, callback=False))]


@pytest.fixture(scope="module")
def ref_llama():
    return W.reference("adamhd", arch="llama")


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    ck = tmp_path_factory.mktemp("hf_ckpt")
    cases = [("trainer_z2", "trainer_ds", dict(world=2, stage=2)),
             ("trainer_z3", "trainer_ds", dict(world=2, stage=3)),
             ("trainer_z2_offload", "trainer_ds", dict(world=2, stage=2, offload=True)),
             ("trainer_z2_no_callback", "trainer_ds", dict(world=2, stage=2, callback=False)),
             ("trainer_resume_z2", "trainer_ds_resume", dict(world=2, stage=2, outdir=str(ck / "z2"))),
             ("trainer_resume_z3", "trainer_ds_resume", dict(world=2, stage=3, outdir=str(ck / "z3"))),
             ("accelerate_ds_z2", "accelerate_ds", dict(world=2, stage=2)),
             ("accelerate_ds_z3", "accelerate_ds", dict(world=2, stage=3)),
             ("accelerate_ds_z2_no_attach", "accelerate_ds", dict(world=2, stage=2, attach=False))]
    cases += AUTOTP  # last: DeepSpeed's AutoTP groups live for the process, a later engine would trip on them
    return run_ranks("dist_workers_hf:suite", 2, kwargs={"cases": cases}, env=W.RANK_ENV, timeout=900)


@pytest.fixture(scope="module")
def world3():
    cases = [("swap", "accelerate_fsdp2_swap", dict(world=3)),
             ("swap_unfused", "accelerate_fsdp2_swap", dict(world=3, fused=False)),
             ("trainer_fsdp2", "trainer_fsdp2", dict(world=3))]
    return run_ranks("dist_workers_hf:suite", 3, kwargs={"cases": cases}, env=W.RANK_ENV, timeout=600)


def rel_err(params, reference):
    assert set(params) == set(reference), set(params) ^ set(reference)
    num = max(float((params[n] - reference[n]).abs().max()) for n in reference)
    return num / max(float(reference[n].abs().max()) for n in reference)


def ok(out, label):
    """Every rank's result of a case, failing with the rank's traceback if the case raised."""
    for rank, res in enumerate(out):
        assert "error" not in res[label], f"{label} on rank {rank}:\n{res[label]['error']}"
    return [res[label] for res in out]


def assert_exact(out, label, ref):
    results = ok(out, label)
    for res in results:
        err = rel_err(res["params"], ref["params"])
        assert err <= TOL, f"{label}: max|θ − θ_ref| / max|θ_ref| = {err:.3g}"
        assert set(res["deltas"]) == set(ref["deltas"]), label  # layer names, not positions
        for name, d in ref["deltas"].items():
            assert abs(res["deltas"][name] - d) <= TOL * d, f"{label}: δ of {name} {res['deltas'][name]} vs {d}"
    for res in results[1:]:  # every rank: the same parameters and the same δ
        assert rel_err(res["params"], results[0]["params"]) == 0.0 and res["deltas"] == results[0]["deltas"]
    return results


# ----------------------------------------------------------------------------------------------------------------
# transformers Trainer + DeepSpeed
@pytest.mark.parametrize("label", ["trainer_z2", "trainer_z3", "trainer_z2_offload"])
def test_trainer_deepspeed_with_the_callback_equals_one_process(world2, ref, label):
    """Trainer(optimizer_cls_and_kwargs=(AdamHD, kw), args=TrainingArguments(deepspeed=...),
    callbacks=[AdamHDCallback()]) at world 2; layer_deltas(trainer) gives every layer's δ by name."""
    for res in assert_exact(world2, label, ref):
        assert res["engine"] == "DeepSpeedEngine" and res["strategy"] == "FlatLayerStats"
        for name, mu in ref["mu"].items():
            assert abs(res["mu"][name] - mu) <= TOL * mu


def test_trainer_logs_the_delta_summary(world2, ref):
    """Every log line (every 3 steps) carries adamhd/delta_{min,median,max} of the per-layer δ."""
    res = ok(world2, "trainer_z2")[0]
    logged = [e for e in res["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == [3, 6]
    last, d = logged[-1], sorted(ref["deltas"].values())
    assert last["adamhd/delta_min"] == pytest.approx(d[0], rel=TOL)
    assert last["adamhd/delta_max"] == pytest.approx(d[-1], rel=TOL)
    assert d[0] < last["adamhd/delta_median"] < d[-1]


def test_trainer_deepspeed_without_the_callback_refuses(world2):
    for res in ok(world2, "trainer_z2_no_callback"):
        assert res["refused"] and "AdamHDCallback" in res["refused"]
        assert res["changed"] == 0.0  # no parameter moved


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_resume_keeps_mu(world2, stage):
    """save_strategy="steps" every 3 steps, then train(resume_from_checkpoint="checkpoint-3") in a fresh Trainer:
    the resumed run ends bit for bit where the uninterrupted one does, μ of every layer included."""
    for res in ok(world2, f"trainer_resume_z{stage}"):
        full, resumed = res["full"], res["resumed"]
        assert full["checkpoints"] == ["checkpoint-3", "checkpoint-6"]
        assert rel_err(resumed["params"], full["params"]) == 0.0
        assert resumed["mu"] == full["mu"] and len(full["mu"]) == 10


# ----------------------------------------------------------------------------------------------------------------
# transformers Trainer + FSDP2, Accelerate
def test_trainer_fsdp2_with_the_callback_equals_one_process(world3, ref):
    for res in assert_exact(world3, "trainer_fsdp2", ref):
        assert res["dtensor_params"] == res["n_params"] == 28 and res["strategy"] == "DTensorLayerStats"


@pytest.mark.parametrize("label", ["accelerate_ds_z2", "accelerate_ds_z3"])
def test_accelerate_deepspeed_with_attach_equals_one_process(world2, ref, label):
    """accelerator.prepare(model, AdamHD(...), dl) under the DeepSpeed plugin, then attach(model)."""
    for res in assert_exact(world2, label, ref):
        assert res["engine"] == "DeepSpeedEngine"


def test_accelerate_deepspeed_without_attach_refuses(world2):
    for res in ok(world2, "accelerate_ds_z2_no_attach"):
        assert res["refused"] and "adamhd_dist.deepspeed.attach(engine)" in res["refused"]


@pytest.mark.parametrize("label", ["swap", "swap_unfused"])
def test_accelerate_fsdp2_inplace_swap_is_exact(world3, ref, label):
    """Accelerate's FSDP2 prepare swaps DTensors into the optimizer's param groups in place, bypassing
    add_param_group: AdamHD notices them at its first step and reduces over the shards (this crashed in native code
    before)."""
    for res in assert_exact(world3, label, ref):
        assert res["swapped"] == 28 and res["strategy"] == "DTensorLayerStats"


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed AutoTP ("tensor_parallel": {"autotp_size": 2}) through the Trainer and Accelerate, tp 2 × dp 1
def join_tp(results, reference):
    """Whole parameters again: a sliced one's pieces concatenated in tensor-parallel rank order along the
    dimension AutoTP cut; an unsliced one (embeddings, norms, head) must be the same on every rank."""
    by_tp = {res["tp_rank"]: res["params"] for res in results}
    assert sorted(by_tp) == [0, 1]
    out = {}
    for name, ref in reference.items():
        pieces = [by_tp[t][name] for t in sorted(by_tp)]
        if not pieces[0][1]:
            assert all(torch.equal(p, pieces[0][0]) and not s for p, s in pieces), name
            out[name] = pieces[0][0]
            continue
        dim = next(d for d in range(ref.dim()) if pieces[0][0].shape[d] != ref.shape[d])
        out[name] = torch.cat([p for p, _ in pieces], dim=dim)
        assert out[name].shape == ref.shape, name
    return out


@pytest.mark.parametrize("label", [c[0] for c in AUTOTP if "no_callback" not in c[0]])
def test_autotp_through_trainer_and_accelerate_equals_one_process(world2, ref_llama, label):
    """Trainer(args=TrainingArguments(deepspeed=cfg with "tensor_parallel": {"autotp_size": 2}),
    callbacks=[AdamHDCallback()]) (transformers' deepspeed_init calls deepspeed.tp_model_init), and
    Accelerator(deepspeed_plugin=...) + prepare + attach(engine) or attach(optimizer, module=engine.module)
    (deepspeed.initialize applies AutoTP from the config)."""
    results = ok(world2, label)
    assert [r["dp_world"] for r in results] == [1, 1]
    assert any(s for r in results for _, s in r["params"].values()), "AutoTP sliced nothing"
    err = rel_err(join_tp(results, ref_llama["params"]), ref_llama["params"])
    assert err <= TOL, f"{label}: max|θ − θ_ref| / max|θ_ref| = {err:.3g}"
    for res in results:
        assert res["engine"] == "DeepSpeedEngine" and res["strategy"] == "FlatLayerStats"
        assert set(res["deltas"]) == set(ref_llama["deltas"]), label
        for name, d in ref_llama["deltas"].items():
            assert abs(res["deltas"][name] - d) <= TOL * d, f"{label}: δ of {name} {res['deltas'][name]} vs {d}"
        for name, mu in ref_llama["mu"].items():
            assert abs(res["mu"][name] - mu) <= TOL * mu, f"{label}: μ of {name}"
        assert res["counts"]["reduce"] == W.STEPS, res["counts"]  # one all-reduce per step for every layer
    assert results[1]["deltas"] == results[0]["deltas"]


@pytest.mark.parametrize("label", [c[0] for c in AUTOTP if "no_callback" not in c[0]])
def test_autotp_both_tensor_parallel_ranks_get_the_whole_global_batch(world2, label):
    """At dp 1 the data loader must not split the batch over the tensor-parallel ranks: each forward on each rank
    is the step's whole global batch (Trainer: its dataloader; Accelerate: prepare's "tp" device mesh)."""
    x = W.data()
    for res in ok(world2, label):
        seen = res["seen"]
        assert len(seen) == W.STEPS
        for t, ids in enumerate(seen):
            assert torch.equal(ids, x[t * W.GLOBAL_BATCH:(t + 1) * W.GLOBAL_BATCH]), (label, t, ids.shape)


def test_trainer_autotp_without_the_callback_refuses(world2):
    for res in ok(world2, "trainer_autotp_z2_no_callback"):
        assert res["refused"] and "AdamHDCallback" in res["refused"]
        assert res["changed"] == 0.0
