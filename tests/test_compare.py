"""The comparison harness: configuration, run planning, the verdict from numbers, and one small end-to-end run of
launch/compare.py (nano model, a few steps, tmp folders) that must produce the report, the plots and results.json."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adamhd_study.collect import load_final_weights
from adamhd_study.config import ARMS, preset
from adamhd_study.plan import check_run_dirs, plan_runs, run_spec
from adamhd_study.summary import summarize
from adamhd_train.cli import build_parser, given_options
from adamhd_train.ranks import LaunchContext
from adamhd_train.resolve import resolve_settings

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ configuration
def test_tiny_preset_values(tmp_path):
    cfg = preset("tiny", out_dir=str(tmp_path))
    assert cfg.model == "tiny" and cfg.data == "embedded" and cfg.arms == ARMS
    assert cfg.optimizers == {"adamhd": "ds_configs/zero2_adamhd.json", "adamw": "ds_configs/zero2_adamw.json"}
    assert cfg.reference == "adamw" and cfg.weight_decay == 0.1 and cfg.seeds == 1
    assert preset("gpt3-small", out_dir=str(tmp_path)).model == "gpt3-small"


@pytest.mark.parametrize("overrides, match", [
    ({"arms": ("baseline", "giant")}, r"--arms: unknown arm\(s\) \['giant'\] \(allowed: baseline, large-batch, "
                                      r"outliers\)"),
    ({"arms": ("outliers",)}, "--arms must include 'baseline'"),
    ({"model": "gpt5"}, r"--model: unknown model 'gpt5' \(allowed: gpt3-small"),
    ({"optimizers": {"adamw": "ds_configs/zero2_adamw.json"}}, "--optimizer: give at least two optimizers"),
    ({"optimizers": {"a": "ds_configs/zero2_adamw.json", "b": "nope.json"}}, "--optimizer b=nope.json: no such"),
    ({"reference": "sgd"}, r"--reference 'sgd' is not one of the optimizers \(adamhd, adamw\)"),
    ({"sparsities": (0.0, 1.2)}, r"--sparsities must be numbers in \[0, 1\)"),
    ({"max_steps": 0}, "--max-steps must be a positive integer"),
    ({"outlier_rate": 2.0}, "--outlier-rate must be in"),
    ({"outlier_mode": "add"}, "--outlier-mode must be one of spike, scale"),
    ({"prune_scope": "row"}, "--prune-scope must be 'global' or 'layer'"),
    ({"global_batch_tokens": 1000}, r"--global-batch-tokens \(1000\) must be a multiple of --seq-len \(128\)"),
    ({"max_steps": 2, "large_batch_factor": 4}, r"--max-steps \(2\) must be >= --large-batch-factor"),
])
def test_config_errors_name_the_flag(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        preset("tiny", out_dir=str(tmp_path), **overrides)


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match=r"--preset: unknown preset 'huge' \(allowed: tiny, gpt3-small\)"):
        preset("huge")


def test_plan_runs_same_budget_and_same_outliers(tmp_path):
    cfg = preset("tiny", out_dir=str(tmp_path), seeds=2)
    runs = plan_runs(cfg)
    assert len(runs) == 2 * 3 * 2
    assert len({r.run_dir for r in runs}) == len(runs)
    tokens = {(r.arm, r.optimizer, r.seed): r.global_batch_tokens * r.max_steps for r in runs}
    assert set(tokens.values()) == {cfg.global_batch_tokens * cfg.max_steps}
    big = [r for r in runs if r.arm == "large-batch"]
    assert all(r.global_batch_tokens == 4 * cfg.global_batch_tokens and r.max_steps == cfg.max_steps // 4
               for r in big)
    for seed in (0, 1):
        out = [r.outliers for r in runs if r.arm == "outliers" and r.seed == seed]
        assert len(out) == 2 and out[0] == out[1] and out[0]["seed"] == 1000 + seed
    assert all(r.outliers is None for r in runs if r.arm != "outliers")
    # adjacent pairs: the optimizers of one arm and seed run side by side
    assert [(r.arm, r.seed) for r in runs[0:2]] == [("baseline", 0)] * 2


def test_launcher_accepts_every_run(tmp_path):
    """Each run's options parse and resolve in the launcher itself: same model, schedule inputs, no ramp."""
    cfg = preset("tiny", out_dir=str(tmp_path))
    ctx = LaunchContext(0, 1, 0, 1, "single process", False)
    resolved = {}
    for run in plan_runs(cfg):
        given = given_options(build_parser().parse_args(run.launcher_args(cfg)))
        r = resolve_settings(given, ctx)
        resolved[run.name] = r
        s = r.settings
        assert s.model == "tiny" and s.seq_len == 128 and s.seed == run.seed and s.ramp_tokens == 0
        assert s.global_batch_tokens == run.global_batch_tokens and s.max_steps == run.max_steps
        assert s.weight_decay == 0.1 and s.out_dir == str(run.run_dir)
        assert r.derived["run_tokens"] == cfg.global_batch_tokens * cfg.max_steps
    hd, w = resolved["baseline-adamhd-s0"], resolved["baseline-adamw-s0"]
    assert hd.derived["optimizer_type"] == "AdamHD" and w.derived["optimizer_type"] == "AdamW"
    for key in ("lr", "warmup_tokens", "decay_tokens", "min_lr_ratio", "grad_clip", "micro_batch"):
        assert getattr(hd.settings, key) == getattr(w.settings, key), key
    assert hd.adamhd_kwargs["betas"] == tuple(w.adamhd_kwargs["betas"]) and hd.adamhd_kwargs["eps"] == \
        w.adamhd_kwargs["eps"]
    assert resolved["large-batch-adamhd-s0"].settings.warmup_tokens == hd.settings.warmup_tokens


# ------------------------------------------------------------------------------------------------ verdict
def _fake_run(arm, opt, seed, final, *, pace=1.0, prune_slope=1.0):
    """A finished run: validation curve falling linearly to ``final`` (``pace`` > 1 reaches each loss sooner),
    pruning loss growing with ``prune_slope``."""
    steps = list(range(0, 101, 10))
    curve = [{"step": s, "tokens": 2048 * s, "elapsed_s": 0.5 * s,
              "val_loss": max(final, 6.0 - (6.0 - final) * min(1.0, pace * s / 100))} for s in steps[1:]]
    by_type = {"attn.qkv": {"mean_abs": 0.02, "small_fraction_1e-3": 0.04}}
    return {"name": f"{arm}-{opt}-s{seed}", "arm": arm, "optimizer": opt, "seed": seed, "ok": True,
            "final_val_loss": final, "curve": curve, "train_s": 50.0, "wall_s": 80.0, "events": [],
            "parameters": 1_000_000, "tokens": 204_800, "max_steps": 100, "global_batch_tokens": 2048,
            "pruning": [{"sparsity": s, "achieved": s, "val_loss": final + prune_slope * s ** 2}
                        for s in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)],
            "weights": {"small_fraction_1e-3": 0.04, "mean_abs": 0.02, "by_type": by_type}}


def _fake_results(cand_final, *, pace=1.0, prune_slope=1.0, outlier_hit=(0.05, 0.05)):
    res = []
    for opt, final, p, slope, hit in (("adamw", 3.0, 1.0, 1.0, outlier_hit[0]),
                                      ("adamhd", cand_final, pace, prune_slope, outlier_hit[1])):
        res.append(_fake_run("baseline", opt, 0, final, pace=p, prune_slope=slope))
        res.append(_fake_run("outliers", opt, 0, final + hit, pace=p))
    return res


def test_verdict_follows_the_numbers_when_the_candidate_wins(tmp_path):
    cfg = preset("tiny", out_dir=str(tmp_path), arms=("baseline", "outliers"))
    s = summarize(cfg, _fake_results(2.9, pace=2.0, prune_slope=0.15, outlier_hit=(0.08, 0.01)))
    text = " ".join(s["verdict"]["adamhd"])
    assert "adamhd's is lower (better)" in text
    assert "agrees in direction with the paper's claim" in text
    assert "in wall-clock (at least 10% faster)" in text and "is reproduced here" in text
    assert "up to 50% sparsity for adamhd and 20% for adamw" in text
    assert "agrees with the paper's claim that 20-30% of the weights can be pruned" in text
    assert "more robust than adamw" in text
    assert "one seed, so no seed-noise estimate" in text
    assert s["speedup"]["baseline"]["adamhd"][0]["speedup_steps"] > 1.5


def test_verdict_says_so_when_the_candidate_does_not_win(tmp_path):
    cfg = preset("tiny", out_dir=str(tmp_path), arms=("baseline", "outliers"))
    s = summarize(cfg, _fake_results(3.004))
    text = " ".join(s["verdict"]["adamhd"])
    assert "not measurably different" in text
    assert "does not reproduce the paper's claim of up to 4 points lower perplexity" in text
    assert "is not reproduced here" in text
    assert "does not reproduce the paper's claim of 20-30% memory savings" in text
    assert "no measurable difference in robustness" in text
    assert "does not beat adamw on any measured quantity" in text
    row = s["speedup"]["baseline"]["adamhd"][0]
    assert row["target"] == pytest.approx(3.004) and 0.95 < row["speedup_steps"] <= 1.0


def _fake_seeds(ref_finals, cand_finals):
    return [_fake_run("baseline", opt, seed, final)
            for opt, finals in (("adamw", ref_finals), ("adamhd", cand_finals)) for seed, final in enumerate(finals)]


def _meta():
    machine = {"cpu": "test CPU", "cpus": 2, "gpus": "none", "memory_gb": 1.0, "python": "3", "torch": "2",
               "deepspeed": "0"}
    return {"command": "python launch/compare.py", "started": 0.0, "machine": machine, "load_start": 0.0,
            "load_end": 0.0, "total_s": 60.0, "runs_wall_s": None, "runs_cpu_s": None, "threads": 1,
            "data": {"train_tokens": 1000, "val_tokens": 100}, "val_batches": 3}


def test_verdict_and_report_use_the_paired_t_test_at_three_seeds(tmp_path):
    """Three seeds whose mean difference is over twice its standard error (a naive two-standard-error rule would call it real), yet not
    significant in a paired t test: the verdict calls it no measurable difference and names the test, and the
    report states the rule with its critical value."""
    from adamhd_study.report import render_report

    cfg = preset("tiny", out_dir=str(tmp_path), arms=("baseline",), seeds=3)
    results = _fake_seeds([3.00, 3.10, 2.90], [2.95, 3.08, 2.87])
    s = summarize(cfg, results)
    j = s["judgements"]["adamhd"]["final:baseline"]
    assert j["outcome"] == "same" and j["seeds"] == [0, 1, 2] and j["t_critical"] == pytest.approx(4.303, abs=1e-3)
    text = " ".join(s["verdict"]["adamhd"])
    assert "adamhd's is not measurably different" in text
    assert "t critical value 4.30 × seed standard error" in text and "paired t test over 3 seeds" in text
    no_plots = dict.fromkeys(("tokens", "time", "pruning", "hist", "deltas", "outliers"))
    report = render_report(cfg, results, s, _meta(), no_plots)
    assert "Seeds: 3 " in report and "two-sided paired t test on the per-seed differences at level α = 0.05" \
        in report and "critical value 4.30 at 2 degrees of freedom" in report
    rule = report.split("## Thresholds used by the verdict")[1]
    assert "two-sided paired t test" in rule and "12.71 at 2 seeds, 4.30 at 3 seeds" in rule
    assert "$" not in report  # every template placeholder was filled
    steady = summarize(cfg, _fake_seeds([3.00, 3.10, 2.90], [2.95, 3.052, 2.848]))
    assert steady["judgements"]["adamhd"]["final:baseline"]["outcome"] == "better"
    assert "adamhd's is lower (better)" in " ".join(steady["verdict"]["adamhd"])


# ------------------------------------------------------------------------------------------------ end to end
E2E_ARGS = ["--preset", "tiny", "--model", "nano", "--seq-len", "64", "--global-batch-tokens", "512",
            "--micro-batch", "8", "--max-steps", "6", "--eval-interval", "2", "--eval-batches", "2",
            "--final-eval-batches", "3", "--max-chars", "200k", "--vocab-size", "400", "--val-fraction", "0.05",
            "--large-batch-factor", "2", "--outlier-rate", "0.5", "--sparsities", "0,0.25,0.5",
            "--parallel", "6", "--run-timeout", "240"]


def _run_compare(args, timeout):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "compare.py")] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)                      # compare stops its runs on SIGTERM
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"launch/compare.py did not finish in {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    out_dir = tmp / "out"
    args = E2E_ARGS + ["--out-dir", str(out_dir), "--data-cache", str(tmp / "cache")]
    # compare.py builds the ops its runs load before starting them; a first build (DeepSpeed's fused_adam and
    # shared-memory ops, AdamHD's CPU kernel) takes minutes on a loaded 2-core machine and is cached afterwards,
    # so it happens here, outside the comparison's time limit
    prebuild = ("from adamhd_study.config import preset\nfrom adamhd_study.execute import prebuild_ops\n"
                "cfg = preset('tiny')\nprebuild_ops(cfg, list(cfg.optimizers))\n")
    subprocess.run([sys.executable, "-c", prebuild], cwd=ROOT, check=True, timeout=1800,
                   env=dict(os.environ, MASTER_ADDR="127.0.0.1"))
    code, log = _run_compare(args, timeout=420)
    return out_dir, args, code, log


@pytest.mark.slow
def test_end_to_end_report_and_plots(e2e):
    out_dir, _, code, log = e2e
    assert code == 0, log[-4000:]
    report = (out_dir / "report.md").read_text()
    for section in ("## Verdict", "## What was measured", "## Final validation loss", "## Steps to target",
                    "## Magnitude pruning", "## Weight magnitudes", "## Outlier-gradient ablation", "## Large batch",
                    "## Huber threshold δ per layer", "## Thresholds used by the verdict"):
        assert section in report, section
    assert "Seeds: 1" in report and "no estimate of seed noise" in report
    for png in ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "pruning.png", "weight_histograms.png",
                "deltas.png", "outliers.png"):
        assert f"]({png})" in report
        assert (out_dir / png).read_bytes()[:8] == PNG_MAGIC, png
        assert (out_dir / png).stat().st_size > 5000, png


@pytest.mark.slow
def test_end_to_end_numbers(e2e):
    out_dir, _, code, log = e2e
    assert code == 0, log[-4000:]
    res = json.loads((out_dir / "results.json").read_text())
    runs = {r["name"]: r for r in res["runs"]}
    assert sorted(runs) == sorted(f"{a}-{o}-s0" for a in ARMS for o in ("adamhd", "adamw"))
    assert all(r["ok"] and r["returncode"] == 0 for r in runs.values())
    for r in runs.values():
        assert r["tokens"] == 6 * 512 and math.isfinite(r["final_val_loss"])
        assert r["curve"][-1]["step"] == r["max_steps"]
    assert runs["large-batch-adamw-s0"]["max_steps"] == 3
    # pruning: the achieved sparsity is the requested one, and pruning more costs loss
    for opt in ("adamhd", "adamw"):
        prune = runs[f"baseline-{opt}-s0"]["pruning"]
        assert [p["sparsity"] for p in prune] == [0.0, 0.25, 0.5]
        assert [p["achieved"] for p in prune] == pytest.approx([0.0, 0.25, 0.5], abs=1e-6)
        assert prune[0]["val_loss"] < prune[2]["val_loss"]
        hist = runs[f"baseline-{opt}-s0"]["histograms"]
        assert set(hist) == {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "embedding"}
        assert all(sum(h["counts"]) == h["numel"] for h in hist.values())
    # the outlier events are the same for both optimizers, and they changed the training
    ev_hd, ev_w = runs["outliers-adamhd-s0"]["events"], runs["outliers-adamw-s0"]["events"]
    assert ev_hd and [e["micro_batch"] for e in ev_hd] == [e["micro_batch"] for e in ev_w]
    assert runs["outliers-adamhd-s0"]["final_val_loss"] != runs["baseline-adamhd-s0"]["final_val_loss"]
    # AdamHD logged a δ per decayed layer, AdamW none
    assert runs["baseline-adamhd-s0"]["deltas"] and runs["baseline-adamhd-s0"]["deltas"][-1]["deltas"]
    assert all(not rec["deltas"] for rec in runs["baseline-adamw-s0"]["deltas"])
    s = res["summary"]
    assert set(s["verdict"]) == {"adamhd"} and len(s["verdict"]["adamhd"]) >= 5


def _processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd[:200]}")
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_end_to_end_leaves_no_process_behind(e2e):
    out_dir, _, code, log = e2e
    assert code == 0, log[-4000:]
    assert _processes_mentioning(str(out_dir)) == []


@pytest.mark.slow
def test_end_to_end_rerun_reuses_finished_runs(e2e):
    out_dir, args, code, log = e2e
    assert code == 0, log[-4000:]
    before = (out_dir / "runs" / "baseline-adamhd-s0" / "metrics.jsonl").read_text()
    code2, log2 = _run_compare(args, timeout=240)
    assert code2 == 0, log2[-4000:]
    assert log2.count("reused") == 6 and "started" not in log2
    assert (out_dir / "runs" / "baseline-adamhd-s0" / "metrics.jsonl").read_text() == before
    assert "(reused from an earlier invocation)" in (out_dir / "report.md").read_text()


def test_gpt3_small_preset_resolves_on_a_gpu_machine(tmp_path):
    """The GPU preset's runs are valid launcher jobs (checked without a GPU: nothing is built or downloaded)."""
    cfg = preset("gpt3-small", out_dir=str(tmp_path), nproc=1)
    ctx = LaunchContext(0, 1, 0, 1, "single process", True)
    for run in plan_runs(cfg):
        given = given_options(build_parser().parse_args(run.launcher_args(cfg)))
        s = resolve_settings(given, ctx).settings
        assert s.model == "gpt3-small" and s.seq_len == 2048 and s.dtype == "bf16" and s.lr == 6e-4
        assert s.global_batch_tokens * s.max_steps == 524_288 * 2000


def test_run_dir_with_other_settings_is_refused(tmp_path):
    cfg = preset("tiny", out_dir=str(tmp_path))
    runs = plan_runs(cfg)
    check_run_dirs(runs, cfg)                                  # nothing there yet
    for run in runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "compare_spec.json").write_text(json.dumps(run_spec(run, cfg)))
    check_run_dirs(runs, cfg)                                  # the same settings: reusable
    other = preset("tiny", out_dir=str(tmp_path), outlier_rate=0.05, lr=1e-3)
    with pytest.raises(ValueError, match=r"holds the run baseline-adamhd-s0 with other settings \(now: --lr "
                                         r"0\.001\)"):
        check_run_dirs(plan_runs(other), other)
    only_outliers = preset("tiny", out_dir=str(tmp_path), outlier_rate=0.05)
    with pytest.raises(ValueError, match=r"outliers-adamhd-s0 with other settings \(now: outliers .*'rate': "
                                         r"0\.05"):
        check_run_dirs(plan_runs(only_outliers), only_outliers)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_final_weights_from_an_fsdp_style_checkpoint(tmp_path):
    """A torch.distributed.checkpoint folder (what the FSDP2 engine writes) reads back as a full state dict."""
    import torch
    import torch.distributed.checkpoint as dcp

    from adamhd_train.checkpoints import TRAINER_STATE

    folder = tmp_path / "checkpoints" / "step3"
    folder.mkdir(parents=True)
    sd = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}
    dcp.save({"model": sd, "optim": {}}, checkpoint_id=str(folder / "dcp"), no_dist=True)
    (folder / TRAINER_STATE).write_text(json.dumps({"step": 3}))
    got = load_final_weights(tmp_path)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint at step 5"):
        load_final_weights(tmp_path, step=5)
