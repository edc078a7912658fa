"""launch/pretrain_gpt3.py end to end on CPU ranks: the three launch modes, resume, --from-manifest, bad input.

Short named runs of the `nano` model on a 200k-character slice of the embedded corpus, prepared once per session.
The DeepSpeed run below is the reference the other runs are compared with: a run stopped and resumed, a re-run
from its manifest and the same job started by mpirun reproduce its loss curve bitwise (same settings, same world
size, CPU); FSDP2 computes the same steps up to reduction order, and an FSDP2 run resumes bitwise too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import launch_runs as lr
from dist_utils import ROOT, free_port

from adamhd_train import checkpoints as ck
from adamhd_train import cli
from adamhd_train.ranks import LaunchContext
from adamhd_train.resolve import resolve_settings
from adamhd_train.settings import SettingsError, parse_count

STEPS = 6
DATA = ["--max-chars", "200000", "--vocab-size", "512", "--val-fraction", "0.05"]
RUN = ["--model", "nano", "--max-steps", str(STEPS), "--seed", "3", "--global-batch-tokens", "1024",
       "--micro-batch", "4", "--eval-interval", "3", "--eval-batches", "2", "--save-interval", "3"] + DATA
ZERO2 = ["--deepspeed", "ds_configs/zero2_adamhd.json"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One token cache for every launch of this file (built here once; the runs only read it)."""
    from adamhd_train.data import prepare_data

    cache = tmp_path_factory.mktemp("data-cache")
    prepare_data("embedded", vocab_size=512, max_chars=200_000, val_fraction=0.05, cache_dir=cache, progress=False)
    return cache


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory, data_cache):
    """The reference: DeepSpeed ZeRO-2 AdamHD, deepspeed launcher, 2 CPU ranks, 6 steps of 2 accumulation steps."""
    out = tmp_path_factory.mktemp("ds") / "run"
    launch = lr.run(lr.deepspeed_cmd(ZERO2 + RUN + ["--data-cache", data_cache, "--out-dir", out])).check()
    return out, launch


def _common_outputs(out: Path, *, launcher: str):
    records = lr.metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert lr.finite(r["loss"] for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(r["tokens"] == 1024 * r["step"] for r in records)
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6] and lr.finite(r["val_loss"] for r in vals)
    assert all(r["delta_min"] <= r["delta_median"] <= r["delta_max"] for r in records)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    deltas = [json.loads(x) for x in (out / "deltas.jsonl").read_text().splitlines()]
    assert [d["step"] for d in deltas] == [3, 6] and "transformer.h.0.attn.c_attn.weight" in deltas[0]["deltas"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [3, 6]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step6"
    m = json.loads((out / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["seed"] == 3 and m["launcher"] == launcher
    assert m["settings"]["model"] == "nano" and m["settings"]["max_steps"] == STEPS
    assert re.fullmatch(r"[0-9a-f]{64}", m["data"]["data_hash"])
    assert re.fullmatch(r"[0-9a-f]{64}", m["data"]["tokenizer_hash"])
    assert "commit" in m["git"] and m["packages"]["torch"] and m["packages"]["deepspeed"]
    assert m["hardware"]["cpus_available"] >= 1
    return records, m


@pytest.mark.slow
def test_deepspeed_launcher_end_to_end(ds_run):
    out, launch = ds_run
    records, m = _common_outputs(out, launcher="deepspeed")
    assert all(r["accum_steps"] == 2 for r in records)
    cfg = m["deepspeed_config"]
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (4, 2, 16)
    assert cfg["bf16"]["enabled"] is False and m["settings"]["dtype"] == "fp32"
    assert m["deepspeed_config_source"]["bf16"]["enabled"] is True
    text = launch.output
    for printed in ("global batch 1,024 tokens = 16 sequences x 64 tokens = micro-batch 4 x 2 rank(s) x 2",
                    "tokens per step 1,024; micro-batch 4 (256 tokens per rank); gradient accumulation 2; "
                    "world size 2",
                    "ranks: dp 2 × tp 1 × pp 1 = 2; 8 sequences per data-parallel rank per step (4 per "
                    "micro-step x 2)",
                    "decayed (matrices, embeddings):", "the config asks for bf16; training in fp32",
                    "engine: DeepSpeed ZeRO-2", "MFU: CPU estimate", "train loss"):
        assert printed in text, printed
    assert text.count("engine: DeepSpeed ZeRO-2") == 1, "rank 0 alone prints the run summary"


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(ds_run, data_cache, capsys, monkeypatch):
    out, _ = ds_run
    monkeypatch.chdir(ROOT)
    before = (out / "metrics.jsonl").read_text()
    # one process instead of two: the derived schedule does not depend on the world size, so it is the same job
    rc = cli.main([str(a) for a in ZERO2 + RUN + ["--data-cache", data_cache, "--out-dir", out]])
    assert rc == 0 and "is complete" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted(ds_run, tmp_path, data_cache):
    ref, _ = ds_run
    out = tmp_path / "resumed"
    args = ZERO2 + RUN + ["--data-cache", data_cache, "--out-dir", out]
    first = lr.run(lr.deepspeed_cmd(args + ["--exit-after-steps", "4"])).check()
    assert "stopped after 4 steps" in first.output
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [3, 4]
    assert [r["step"] for r in lr.metrics(out)] == [1, 2, 3, 4]
    second = lr.run(lr.deepspeed_cmd(args)).check()  # the same command: --resume auto is the default
    assert "resuming from" in second.output and "step 4" in second.output
    assert lr.exact(lr.metrics(out)) == lr.exact(lr.metrics(ref))  # bitwise: loss, lr, grad norm, δ, val loss
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["step"] for r in manifest["resumes"]] == [4]
    # the run's training time goes on across the resume instead of starting again from 0
    elapsed = [r["elapsed_s"] for r in lr.metrics(out)]
    saved = ck.read_trainer_state(out / "checkpoints" / "step4")["elapsed_s"]
    assert elapsed == sorted(elapsed) and elapsed[3] <= saved <= elapsed[4]


@pytest.mark.slow
def test_from_manifest_reproduces_the_loss_curve(ds_run, tmp_path):
    ref, _ = ds_run
    out = tmp_path / "rerun"
    launch = lr.run(lr.deepspeed_cmd(["--from-manifest", ref / "manifest.json", "--out-dir", out])).check()
    assert "the job of" in launch.output
    assert lr.exact(lr.metrics(out)) == lr.exact(lr.metrics(ref))
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert a["settings"] | {"out_dir": None} == b["settings"] | {"out_dir": None}
    assert a["data"]["data_hash"] == b["data"]["data_hash"] and a["deepspeed_config"] == b["deepspeed_config"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, data_cache):
    """The same job with FSDP2 under torchrun, 2 CPU ranks."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    launch = lr.run(lr.torchrun_cmd(["--fsdp"] + RUN + ["--data-cache", data_cache, "--out-dir", out])).check()
    return out, launch


@pytest.mark.slow
def test_torchrun_fsdp_end_to_end(ds_run, fsdp_run):
    ref, _ = ds_run
    out, launch = fsdp_run
    records, m = _common_outputs(out, launcher="torchrun")
    assert m["settings"]["launch"] == "fsdp" and m["deepspeed_config"] is None
    assert "engine: FSDP2" in launch.output
    assert (out / "checkpoints" / "step6" / "dcp" / ".metadata").is_file()
    # the same optimizer steps as ZeRO-2, up to reduction order
    for a, b in zip(records, lr.metrics(ref)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["delta_median"] == pytest.approx(b["delta_median"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_resume_equals_uninterrupted(fsdp_run, tmp_path, data_cache):
    ref, _ = fsdp_run
    out = tmp_path / "fsdp-resumed"
    args = ["--fsdp"] + RUN + ["--data-cache", data_cache, "--out-dir", out]
    lr.run(lr.torchrun_cmd(args + ["--exit-after-steps", "2"])).check()
    assert [r["step"] for r in lr.metrics(out)] == [1, 2]
    assert (out / "checkpoints" / "step2" / "dcp" / ".metadata").is_file()
    lr.run(lr.torchrun_cmd(args)).check()
    assert lr.exact(lr.metrics(out)) == lr.exact(lr.metrics(ref))


@pytest.mark.slow
def test_a_damaged_file_of_an_unverified_checkpoint_gets_a_message_naming_the_checkpoint(ds_run, tmp_path,
                                                                                          data_cache):
    """A checkpoint without checksums (written before they were recorded) whose μ file is garbled: loading it
    ends the run with exit status 2 and a message naming the checkpoint and the reader's error, no traceback."""
    out = tmp_path / "run"
    shutil.copytree(ds_run[0] / "checkpoints", out / "checkpoints")
    folder = out / "checkpoints" / "step3"
    (folder / ck.CHECKSUMS).unlink()
    victim = folder / "adamhd_layer_state.pt"
    raw = bytearray(victim.read_bytes())
    raw[100:164] = os.urandom(64)
    victim.write_bytes(bytes(raw))
    launch = lr.run(lr.deepspeed_cmd(ZERO2 + RUN + ["--data-cache", data_cache, "--out-dir", out,
                                                    "--resume", folder]))
    assert launch.returncode == 2, launch.output[-3000:]
    assert f"checkpoint {folder} cannot be loaded" in launch.output, launch.output[-3000:]
    assert "loading it unverified" in launch.output and "Traceback" not in launch.output


@pytest.mark.slow
def test_a_damaged_fsdp_checkpoint_is_refused_before_dcp_reads_it(fsdp_run, tmp_path, data_cache):
    """The FSDP2/DCP checkpoints carry the same checksums: one byte changed in a DCP shard file, and resuming from
    that checkpoint stops the run with exit status 2 naming the file, before anything is loaded."""
    out = tmp_path / "run"
    shutil.copytree(fsdp_run[0] / "checkpoints", out / "checkpoints")
    folder = out / "checkpoints" / "step3"
    victim = sorted((folder / "dcp").glob("*.distcp"))[-1]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    launch = lr.run(lr.torchrun_cmd(["--fsdp"] + RUN + ["--data-cache", data_cache, "--out-dir", out,
                                                       "--resume", folder]))
    # the ranks exit with status 2 (torchrun ends the slower one and itself exits 1)
    assert launch.returncode == 1 and "exitcode  : 2" in launch.output, launch.output[-3000:]
    assert "fails verification, nothing was loaded" in launch.output and victim.name in launch.output


@pytest.mark.slow
def test_mpirun_end_to_end(ds_run, tmp_path, data_cache):
    if not lr.mpirun_available():
        pytest.fail("mpirun and mpi4py are missing: install the project's [mpi] extra (make install does)")
    ref, _ = ds_run
    out = tmp_path / "mpi"
    cmd = lr.mpirun_cmd(ZERO2 + RUN + ["--data-cache", str(data_cache), "--out-dir", str(out)])
    launch = lr.run(cmd, env=lr.mpirun_env(tmp_path / "bin"), timeout=300).check()
    _common_outputs(out, launcher="mpirun")
    assert "started by mpirun" in launch.output
    assert lr.exact(lr.metrics(out)) == lr.exact(lr.metrics(ref))  # the same job at the same world size


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path, data_cache):
    out = tmp_path / "sig"
    args = ["--fsdp", "--model", "nano", "--max-steps", "5000", "--save-interval", "5000", "--log-interval", "1",
            "--eval-batches", "1", "--no-tensorboard", "--data-cache", str(data_cache), "--out-dir", str(out)] + DATA
    proc, log = lr.start([sys.executable, lr.SCRIPT] + args)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and len(lr.metrics(out)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            lr.stop_group(proc)
    text = log.read_text()
    log.unlink(missing_ok=True)
    assert rc == 128 + signal.SIGTERM, text
    step, folder = ck.latest_checkpoint(out / "checkpoints")
    assert 3 <= step < 5000 and "interrupted after step" in text
    assert ck.read_trainer_state(folder)["step"] == step
    assert not list((out / "checkpoints").glob(".partial-*"))


# --------------------------------------------------------------------------------------------------------------
# bad input: a clear message and exit status 2 before any work (nothing written, no process group)
def _main(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (ZERO2 + ["--model", "gpt3-huge"], "--model: unknown model 'gpt3-huge' (allowed: gpt3-small"),
    (ZERO2 + ["--global-batch-tokens", "1000"], "--global-batch-tokens (1,000) must be a multiple of --seq-len (64)"),
    (ZERO2 + ["--micro-batch", "3"], "micro_batch (3) must divide the 8 sequences per rank"),
    (["--deepspeed", "ds_configs/no_such.json"], "DeepSpeed config file not found: 'ds_configs/no_such.json'"),
    (ZERO2 + ["--data", "./no/such/corpus.jsonl"], "--data './no/such/corpus.jsonl': no such file or folder"),
    (ZERO2 + ["--data", "EMPTY"], "is empty or holds only whitespace (0 bytes)"),
    (ZERO2 + ["--data", "BLANK"], "is empty or holds only whitespace (5 bytes)"),
    (ZERO2 + ["--dtype", "fp16"], "--dtype fp16, but this machine has no GPU"),
    (["--fsdp", "--dtype", "fp16"], "--dtype fp16, but this machine has no GPU"),
    (ZERO2 + ["--fsdp"], "--deepspeed and --fsdp are two engines"),
    ([], "choose the engine: --deepspeed CONFIG"),
    (ZERO2 + ["--warmup-tokens", "4k", "--decay-tokens", "1k"], "--decay-tokens (1,000) must be >= --warmup-tokens"),
    (ZERO2 + ["--resume", "no/such/checkpoint"], "is not a complete checkpoint of this launcher"),
])
def test_bad_input_fails_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n ")
    args = [{"EMPTY": tmp_path / "empty.txt", "BLANK": tmp_path / "blank.txt"}.get(a, a) for a in args]
    rc, err = _main(args + ["--out-dir", tmp_path / "run"], capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A path under a file, and a folder whose filesystem refuses writes (read-only: the probe is made to fail as
    a read-only mount fails it), are refused with exit status 2 before data or ranks are set up."""
    monkeypatch.chdir(ROOT)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, err = _main(ZERO2 + ["--out-dir", blocker / "run"], capsys)
    assert rc == 2 and "lies under" in err and "which is a file" in err, err
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    rc, err = _main(ZERO2 + ["--out-dir", tmp_path / "ro" / "run"], capsys)
    assert rc == 2 and "cannot be written" in err and "read-only" in err, err
    assert not (tmp_path / "ro").exists()  # refused while resolving the options: nothing made


def test_invalid_and_fp16_configs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 8,\n')
    rc, err = _main(["--deepspeed", bad, "--out-dir", tmp_path / "run"], capsys)
    assert rc == 2 and "is not valid JSON" in err and "line 2" in err
    fp16 = tmp_path / "fp16.json"
    cfg = json.loads((ROOT / "ds_configs" / "zero2_adamhd.json").read_text())
    cfg.pop("bf16")
    cfg["fp16"] = {"enabled": True}
    fp16.write_text(json.dumps(cfg))
    rc, err = _main(["--deepspeed", fp16, "--out-dir", tmp_path / "run"], capsys)
    assert rc == 2 and "the DeepSpeed config enables fp16, but this machine has no GPU" in err
    cfg["fp16"]["enabled"] = False
    cfg["optimizer"]["params"]["delta_mode"] = "median"
    fp16.write_text(json.dumps(cfg))
    rc, err = _main(["--deepspeed", fp16, "--out-dir", tmp_path / "run"], capsys)
    assert rc == 2 and "delta_mode" in err
    assert not (tmp_path / "run").exists()


def test_too_small_data_is_reported_before_training(data_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ZERO2 + DATA + ["--model", "nano", "--seq-len", "8192", "--global-batch-tokens", "8192",
                           "--data-cache", data_cache, "--out-dir", tmp_path / "run"]
    rc, err = _main(args, capsys)
    assert rc == 2 and "the validation split has" in err and "fewer than one per rank" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_of_another_job_is_refused(ds_run, data_cache, capsys, monkeypatch):
    out, _ = ds_run
    monkeypatch.chdir(ROOT)
    rc, err = _main(ZERO2 + RUN + ["--lr", "1e-3", "--max-steps", "12", "--data-cache", data_cache, "--out-dir", out],
                    capsys)
    assert rc == 2 and "belongs to another job" in err and "--lr 0.003 -> 0.001" in err


@pytest.mark.slow
def test_from_manifest_refuses_options_that_change_the_job(ds_run, capsys, monkeypatch):
    out, _ = ds_run
    monkeypatch.chdir(ROOT)
    rc, err = _main(["--from-manifest", out / "manifest.json", "--model", "tiny", "--seed", "4"], capsys)
    assert rc == 2 and "would change it: --model, --seed" in err


@pytest.mark.slow
def test_bad_input_under_the_deepspeed_launcher(tmp_path):
    launch = lr.run(lr.deepspeed_cmd(ZERO2 + ["--model", "gpt3-huge", "--out-dir", tmp_path / "run"]), timeout=120)
    assert launch.returncode != 0
    assert launch.output.count("pretrain_gpt3.py: error: --model: unknown model 'gpt3-huge'") == 1
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------------
# settings: derived numbers, the GPT-3 schedule, CPU adaptations (no launch)
def _ctx(world=1, gpu=False):
    return LaunchContext(rank=0, world_size=world, local_rank=0, local_world_size=world, launcher="deepspeed",
                         on_gpu=gpu)


def test_gpt3_small_recipe_on_eight_gpus():
    run = resolve_settings({"deepspeed_config": str(ROOT / "ds_configs/zero2_adamhd.json")}, _ctx(8, gpu=True))
    s = run.settings
    assert (s.model, s.seq_len, s.global_batch_tokens, s.lr) == ("gpt3-small", 2048, 524_288, 6e-4)
    assert (run.plan.micro_batch, run.plan.grad_accum_steps) == (8, 4)
    assert (s.warmup_tokens, s.decay_tokens, s.ramp_tokens, s.ramp_start_tokens) == (
        375_000_000, 260_000_000_000, 4_000_000_000, 32_768)
    assert run.derived["nominal_run_tokens"] >= 300_000_000_000 > run.derived["nominal_run_tokens"] - 524_288
    assert run.ramp.tokens_at_step(s.max_steps) == pytest.approx(300e9, rel=5e-3)  # micro-steps of 131k tokens
    assert s.dtype == "bf16" and run.ds_config["bf16"]["enabled"] is True
    assert run.ds_config["train_batch_size"] == 256 and run.ds_config["gradient_accumulation_steps"] == 4
    assert run.ds_config["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # GPU: left as configured


def test_short_run_schedule_is_scaled_and_reported():
    run = resolve_settings({"deepspeed_config": str(ROOT / "ds_configs/zero2_adamhd.json"), "model": "gpt3-small",
                            "max_steps": 1000}, _ctx(8, gpu=True))
    s, src = run.settings, run.derived["schedule_sources"]
    total = run.derived["nominal_run_tokens"]
    assert run.ramp.tokens_at_step(1000) == pytest.approx(total, rel=1e-2)  # the real ramp moves in micro-steps
    assert s.decay_tokens == total and "the run's length" in src["decay_tokens"]
    assert s.warmup_tokens == round(total * 0.05) and "5%" in src["warmup_tokens"]
    assert s.ramp_tokens == round(1000 * 524_288 * 4 / 260) and "scaled" in src["ramp_tokens"]
    assert run.ramp.accum_steps_at(0) == 1 and run.ramp.accum_steps_at(s.ramp_tokens) == 4


def test_cpu_adaptations_of_gpu_configs():
    run = resolve_settings({"deepspeed_config": str(ROOT / "ds_configs/zero2_offload_adamhd.json")}, _ctx(2))
    notes = " | ".join(run.notes)
    assert run.settings.dtype == "fp32" and "training in fp32" in notes
    assert run.ds_config["zero_optimization"]["offload_optimizer"]["pin_memory"] is False and "pin_memory" in notes
    assert run.ds_config["zero_optimization"]["reduce_bucket_size"] < 500_000_000 and "capped" in notes
    assert run.settings.micro_batch == 4 and "does not divide" in notes
    kept = resolve_settings({"deepspeed_config": str(ROOT / "ds_configs/zero2_adamhd.json"), "dtype": "bf16"},
                            _ctx(2))
    assert kept.settings.dtype == "bf16" and kept.ds_config["bf16"]["enabled"] is True


def test_fsdp_fp16_is_refused_on_a_gpu(tmp_path, capsys, monkeypatch):
    """FSDP2 has no loss scaling, so --fsdp --dtype fp16 is refused on a GPU machine too (CUDA faked here: the
    refusal comes before anything touches the GPU), naming the option and bf16; so is such a job from a manifest,
    and the engine itself refuses it."""
    from adamhd_train.engine import build_engine

    ctx = LaunchContext(rank=0, world_size=8, local_rank=0, local_world_size=8, launcher="torchrun", on_gpu=True)
    with pytest.raises(SettingsError, match=r"--dtype fp16 with --fsdp: .* no loss scaling.* use --dtype bf16"):
        resolve_settings({"fsdp": True, "dtype": "fp16"}, ctx)
    bf16 = resolve_settings({"fsdp": True}, ctx).settings
    assert bf16.dtype == "bf16"
    with pytest.raises(SettingsError, match="--dtype fp16 with --fsdp"):
        resolve_settings({}, ctx, base=bf16.to_dict() | {"dtype": "fp16"})
    with pytest.raises(ValueError, match="fp16 needs loss scaling"):
        build_engine("fsdp", torch.nn.Linear(4, 4), device=torch.device("cpu"), make_scheduler=lambda opt: None,
                     weight_decay=0.1, grad_clip=1.0, dtype="fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(ROOT)
    rc, err = _main(["--fsdp", "--dtype", "fp16", "--out-dir", tmp_path / "run"], capsys)
    assert rc == 2 and "pretrain_gpt3.py: error: --dtype fp16 with --fsdp" in err and "--dtype bf16" in err, err
    assert not (tmp_path / "run").exists()


def test_config_with_a_scheduler_is_refused(tmp_path):
    cfg = json.loads((ROOT / "ds_configs" / "zero2_adamhd.json").read_text())
    cfg["scheduler"] = {"type": "WarmupLR", "params": {}}
    path = tmp_path / "sched.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SettingsError, match='"scheduler": the launcher runs the GPT-3 LR schedule itself'):
        resolve_settings({"deepspeed_config": str(path)}, _ctx(2))


def test_world_size_must_divide_the_batch():
    with pytest.raises(SettingsError, match=r"world size \(3 ranks\) must divide the global batch of 8 sequences"):
        resolve_settings({"deepspeed_config": str(ROOT / "ds_configs/zero2_adamhd.json")}, _ctx(3))


def test_token_counts_accept_suffixes():
    assert [parse_count(x) for x in ("4096", "375M", "4B", "32k", "2.6e11", "1_000")] == [
        4096, 375_000_000, 4_000_000_000, 32_000, 260_000_000_000, 1000]
    assert parse_count("123456789012345678901") == 123456789012345678901  # exact, not through a float
    with pytest.raises(Exception, match="not a count"):
        parse_count("lots")
    for bad in ("inf", "1e400", "nan", "2.5"):
        with pytest.raises(Exception, match="not a whole number"):
            parse_count(bad)


def test_checkpoint_folder_ignores_partial_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        (root / ck.partial_tag(step)).mkdir(parents=True)
        ck.write_json_atomic({"step": step}, root / ck.partial_tag(step) / ck.TRAINER_STATE)
        ck.commit_checkpoint(root, step)
    (root / ck.partial_tag(9)).mkdir()  # a save killed half-way: never read
    (root / ck.partial_tag(9) / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert ck.latest_checkpoint(root) == (6, root / "step6")
    assert (root / "latest").read_text().strip() == "step6"
    assert ck.remove_partials(root) == [root / ck.partial_tag(9)] and not (root / ck.partial_tag(9)).exists()
    assert ck.prune_checkpoints(root, keep=1) == [root / "step3"] and ck.list_checkpoints(root) == [(6, root / "step6")]


def test_rotation_never_deletes_the_newest_checkpoint_checked_finite(tmp_path):
    """Checkpoints record that their weights were checked finite; newer ones without that record (written by an
    older launcher) do not push the newest checked one out, whatever --keep-checkpoints says."""
    root = tmp_path / "checkpoints"
    for step, checked in ((2, True), (4, True), (6, False), (8, False)):
        (root / ck.partial_tag(step)).mkdir(parents=True)
        state = {"step": step, **({"params_finite": True} if checked else {})}
        ck.write_json_atomic(state, root / ck.partial_tag(step) / ck.TRAINER_STATE)
        ck.commit_checkpoint(root, step)
    assert ck.prune_checkpoints(root, keep=1) == [root / "step2", root / "step6"]
    assert [s for s, _ in ck.list_checkpoints(root)] == [4, 8]
    assert ck.prune_checkpoints(root, keep=1) == [] and [s for s, _ in ck.list_checkpoints(root)] == [4, 8]


def test_checksums_find_every_damage_and_old_checkpoints_load_unverified(tmp_path):
    """The record written at commit finds a garbled byte (same size), a truncated file and a missing one, names
    each file; a checkpoint without the record is reported as unverified (None); set_aside keeps the folder."""
    root = tmp_path / "checkpoints"
    tmp = root / ck.partial_tag(3)
    (tmp / "sub").mkdir(parents=True)
    ck.write_json_atomic({"step": 3, "tokens": 0, "sampler": {}}, tmp / ck.TRAINER_STATE)
    payload = bytes(range(256)) * 64
    for name in ("optim_states.pt", "model_states.pt", "sub/mu.pt"):
        (tmp / name).write_bytes(payload)
    folder = ck.commit_checkpoint(root, 3)
    assert ck.verify_checkpoint(folder) == []
    record = json.loads((folder / ck.CHECKSUMS).read_text())
    assert set(record["files"]) == {ck.TRAINER_STATE, "optim_states.pt", "model_states.pt", "sub/mu.pt"}
    garbled = bytearray(payload)
    garbled[1000:1004] = b"\xff\x00\xff\x00"
    (folder / "optim_states.pt").write_bytes(bytes(garbled))
    (folder / "model_states.pt").write_bytes(payload[:100])
    (folder / "sub" / "mu.pt").unlink()
    problems = ck.verify_checkpoint(folder)
    assert len(problems) == 3, problems
    assert any("optim_states.pt" in p and "checksum differs" in p for p in problems)
    assert any("model_states.pt" in p and "100 bytes, 16,384 were written" in p for p in problems)
    assert any("mu.pt" in p and "missing" in p for p in problems)
    assert ck.verify_checkpoint(folder, ["model_states.pt"]) == [p for p in problems if "model_states" in p]
    (folder / ck.CHECKSUMS).unlink()
    assert ck.verify_checkpoint(folder) is None
    moved = ck.set_aside(folder)
    assert moved.name == ".corrupt-step3" and (moved / "optim_states.pt").is_file()
    assert ck.list_checkpoints(root) == [] and ck.remove_partials(root) == [] and moved.exists()


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_set_aside_and_the_newest_good_one_resumes(ds_run, tmp_path, data_cache):
    """4 KiB of random bytes in rank 1's optimizer file of the newest checkpoint (same size): the same checkpoint
    given explicitly stops the run with exit status 2 before anything is loaded; --resume auto names the file,
    sets the checkpoint aside (kept) and resumes from the one before, reproducing the uninterrupted run's losses."""
    ref, _ = ds_run
    out = tmp_path / "run"
    args = ZERO2 + RUN + ["--data-cache", data_cache, "--out-dir", out]
    lr.run(lr.deepspeed_cmd(args + ["--exit-after-steps", "4"])).check()
    step4 = out / "checkpoints" / "step4"
    victim = next(p for p in step4.rglob("*optim_states.pt") if "rank_1" in p.name)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 4096] = os.urandom(4096)
    victim.write_bytes(bytes(raw))
    explicit = lr.run(lr.deepspeed_cmd(args + ["--resume", step4]))
    assert explicit.returncode == 2, explicit.output[-3000:]
    assert "fails verification, nothing was loaded" in explicit.output and victim.name in explicit.output
    assert step4.is_dir()  # an explicit folder is never moved
    auto = lr.run(lr.deepspeed_cmd(args)).check()
    assert "is set aside as" in auto.output and victim.name in auto.output and "checksum differs" in auto.output
    assert (out / "checkpoints" / ".corrupt-step4" / victim.relative_to(step4)).is_file()  # kept, not deleted
    assert "resuming from" in auto.output and "step 3" in auto.output
    assert lr.exact(lr.metrics(out)) == lr.exact(lr.metrics(ref))  # steps 4-6 retrained exactly as uninterrupted
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [3, 6]


def test_damaged_run_files_give_messages(tmp_path):
    """A trainer state without its keys or with broken JSON names the file; a metrics file whose last line was cut
    short by a kill still resumes (that line is dropped), a broken line elsewhere names its line."""
    from adamhd_train.metrics import MetricsLog, read_metrics

    folder = tmp_path / "step3"
    folder.mkdir()
    (folder / ck.TRAINER_STATE).write_text('{"tokens": 5}')
    with pytest.raises(ValueError, match=r"trainer_state.json.* lacks \['step', 'sampler'\]"):
        ck.read_trainer_state(folder)
    (folder / ck.TRAINER_STATE).write_text('{"step": 3,')
    with pytest.raises(ValueError, match="cannot be read as a checkpoint's trainer state"):
        ck.read_trainer_state(folder)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
    MetricsLog.truncate(tmp_path, 1)
    assert metrics.read_text() == '{"step": 1, "loss": 2.0}\n'
    metrics.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):
        read_metrics(metrics)


def test_bad_values_stop_before_any_work(tmp_path, capsys):
    base = ["--deepspeed", str(ROOT / "ds_configs/zero2_adamhd.json"), "--out-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        cli.main(base + ["--master-port", "99999"])
    assert "--master-port: '99999' is not a TCP port (1-65535)" in capsys.readouterr().err
    cfg = tmp_path / "ds.json"
    for text, match in (('{"optimizer": "AdamHD"}', '"optimizer" must be an object'),
                        ('{"bf16": true}', '"bf16" must be an object'),
                        ('{"gradient_clipping": "x"}', '"gradient_clipping" must be a number'),
                        ('{"optimizer": {"type": "AdamHD", "params": {"weight_decay": "x"}}}',
                         '"optimizer.params.weight_decay" of the DeepSpeed config must be a number')):
        cfg.write_text(text)
        assert cli.main(["--deepspeed", str(cfg), "--out-dir", str(tmp_path / "run")]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a data file the corpus reader refuses: the reader's message, under the flag, not a traceback
    (tmp_path / "x.csv").write_text("a,b\n")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain_gpt3.py"), *base, "--data",
                           str(tmp_path / "x.csv"), "--master-port", str(free_port())], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, MASTER_ADDR="127.0.0.1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--data" in proc.stderr and "unsupported file type '.csv'" in proc.stderr


def test_make_run_uses_the_deepspeed_launcher_on_two_cpu_ranks():
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^run: install\n((?:\t.*\n)+)", text, re.M).group(1)
    assert "deepspeed --num_gpus 2" in recipe and "launch/pretrain_gpt3.py --deepspeed ds_configs/zero2_adamhd.json" \
        in recipe.replace("\\\n\t\t", "")
    assert "CUDA_VISIBLE_DEVICES=" in recipe


# --------------------------------------------------------------------------------------------------------------
# model parallelism: --tp/--pp checked and planned at resolution, before any rank starts (no launch)
ZERO1_CFG = str(ROOT / "ds_configs/zero1_adamhd.json")
ZERO2_CFG = str(ROOT / "ds_configs/zero2_adamhd.json")


@pytest.mark.parametrize("given, world, message", [
    ({"fsdp": True, "model": "gpt3-13b", "tp": 3}, 6,
     "--tp 3 must divide the 40 attention heads of gpt3-13b (each rank holds whole heads); allowed: [1, 2, 4, 5, 8, "
     "10, 20, 40]"),
    ({"deepspeed_config": ZERO1_CFG, "model": "nano", "tp": 2}, 3,
     "the world size (3 ranks) must be a multiple of --tp 2 × --pp 1 = 2"),
    ({"deepspeed_config": ZERO1_CFG, "model": "gpt3-175b", "tp": 8, "pp": 4}, 16,
     "the world size (16 ranks) must be a multiple of --tp 8 × --pp 4 = 32"),
    ({"deepspeed_config": ZERO1_CFG, "model": "nano", "pp": 9}, 9, "--pp 9: nano has"),
    ({"deepspeed_config": ZERO2_CFG, "model": "gpt3-13b", "pp": 2}, 8,
     "--pp 2 with ZeRO stage 2 (--deepspeed " + ZERO2_CFG + "): DeepSpeed's pipeline engine allows ZeRO stage 0 "
     "or 1 only"),
    ({"deepspeed_config": str(ROOT / "ds_configs/zero3_adamhd.json"), "model": "gpt3-13b", "pp": 2}, 8,
     "--pp 2 with ZeRO stage 3"),
    ({"deepspeed_config": ZERO1_CFG, "model": "gpt3-175b", "tp": 8, "pp": 16}, 256,
     "--pp 16: pipeline stages are not yet supported by the launcher (planned: DeepSpeed PipelineModule, ZeRO-0/1; "
     "the grid would be dp 2 × tp 8 × pp 16)"),
    ({"deepspeed_config": ZERO1_CFG, "model": "gpt3-13b", "tp": 8}, 16,
     "--tp 8 with --deepspeed: not yet supported by the launcher. DeepSpeed AutoTP refuses the GPT-2 blocks"),
    ({"fsdp": True, "model": "gpt3-13b", "tp": 8, "seq_len": 2044}, 16,
     "--seq-len 2044 must be a multiple of --tp 8: the norms and the residual stream run sequence-parallel"),
    ({"fsdp": True, "model": "gpt3-13b", "tp": 8, "pp": 2}, 16,
     "--pp 2: pipeline stages are not yet supported by the launcher (planned: DeepSpeed PipelineModule, ZeRO-0/1; "
     "the grid would be dp 1 × tp 8 × pp 2); use --pp 1 (--fsdp --tp 8 alone runs)"),
    ({"fsdp": True, "tp": 0}, 2, "--tp must be a positive integer, got 0"),
])
def test_model_parallel_layouts_are_checked_before_any_rank_starts(given, world, message):
    with pytest.raises(SettingsError) as e:
        resolve_settings(given, _ctx(world, gpu=True))
    assert message in str(e.value), str(e.value)


def test_tp_and_pp_of_one_plan_the_batch_over_data_parallel_ranks():
    run = resolve_settings({"deepspeed_config": ZERO1_CFG, "model": "nano", "tp": 1, "pp": 1, "seq_len": 64,
                            "global_batch_tokens": 1024, "micro_batch": 4}, _ctx(2))
    assert (run.settings.tp, run.settings.pp) == (1, 1)
    assert (run.derived["dp"], run.derived["tp"], run.derived["pp"]) == (2, 1, 1)
    assert (run.plan.world_size, run.plan.grad_accum_steps) == (2, 2)
    assert "tensor_parallel" not in run.ds_config and run.ds_config["train_batch_size"] == 4 * 2 * 2
    # a manifest written before --tp/--pp existed ran at tp = pp = 1
    settings = run.settings.to_dict()
    del settings["tp"], settings["pp"]
    again = resolve_settings({}, _ctx(2), base=settings, base_ds_source=run.ds_config_source)
    assert (again.settings.tp, again.settings.pp) == (1, 1)


def test_autotp_config_counts_every_rank_in_deepspeeds_batch_check():
    """DeepSpeed checks train_batch_size against every rank when AutoTP builds its groups (no mpu), the tp
    copies included; --tp sets autotp_size and replaces a config's own (with a note)."""
    from adamhd_train.engine import deepspeed_config_for

    source = {"optimizer": {"type": "AdamHD", "params": {}}, "tensor_parallel": {"autotp_size": 4}}
    cfg, notes = deepspeed_config_for(source, micro_batch=4, grad_accum_steps=2, world_size=3, dtype="fp32",
                                      grad_clip=1.0, lr=1e-3, weight_decay=0.1, on_gpu=True, tp=2)
    assert cfg["tensor_parallel"] == {"autotp_size": 2} and cfg["train_batch_size"] == 4 * 2 * 3 * 2
    assert "tensor_parallel.autotp_size 4 -> 2 (--tp)" in notes
    cfg, _ = deepspeed_config_for({"optimizer": {"type": "AdamHD"}}, micro_batch=4, grad_accum_steps=2,
                                  world_size=3, dtype="fp32", grad_clip=1.0, lr=1e-3, weight_decay=0.1,
                                  on_gpu=True)
    assert "tensor_parallel" not in cfg and cfg["train_batch_size"] == 24


def test_large_presets_print_a_suggested_layout_for_8_gpu_nodes():
    from adamhd_train.layouts import describe_layout, suggested_layout

    assert suggested_layout("gpt3-13b", 64)[:3] == (8, 1, 8)
    assert suggested_layout("gpt3-175b", 256)[:3] == (8, 16, 2)
    assert suggested_layout("gpt3-175b", 64) is None and suggested_layout("gpt3-small", 8) is None
    for name in ("gpt3-13b", "gpt3-175b"):
        tp, pp, _ = __import__("adamhd_train.layouts", fromlist=["x"]).SUGGESTED_LAYOUTS[name]
        spec = __import__("adamhd_train.models", fromlist=["x"]).model_spec(name)
        assert spec.n_head % tp == 0 and spec.n_layer % pp == 0, name  # the suggestion passes --tp/--pp's checks
    assert describe_layout("gpt3-175b").startswith("suggested layout for gpt3-175b on 8-GPU nodes: tp 8 × pp 16 "
                                                   "× dp N (128 GPUs = 16 node(s) per replica)")
    assert describe_layout("nano") == ""
    help_text = cli.build_parser().format_help()
    assert "--tp TP" in help_text and "--pp PP" in help_text


def test_run_summary_of_a_large_preset_names_its_suggested_layout():
    from types import SimpleNamespace

    from adamhd_train.describe import _model_lines

    run = resolve_settings({"deepspeed_config": ZERO1_CFG, "model": "gpt3-13b"}, _ctx(8, gpu=True))
    lines = _model_lines(run, SimpleNamespace(vocab_size=50257), torch.nn.Linear(2, 2), [])
    assert lines[-1] == ("  suggested layout for gpt3-13b on 8-GPU nodes: tp 8 × pp 1 × dp N (8 GPUs = 1 node(s) "
                         "per replica); 13B × 16 bytes / 8 GPUs = 26 GB of weights and optimizer state per GPU: one "
                         "node holds a replica, so no pipeline (--tp runs with --fsdp; --pp, and --tp with "
                         "--deepspeed: checked, not yet run by this launcher)")


def test_linear_blocks_keep_the_models_output_and_split_qkv_by_heads():
    """The GPT-2 blocks as nn.Linear modules (what ColwiseParallel/RowwiseParallel take): same logits and loss
    as the Conv1D model, q/k/v separate so a colwise cut holds whole heads of each; simulated here on one process
    by cutting every block's q/k/v/fc colwise and proj rowwise into 2 "ranks" and summing their outputs."""
    import copy

    from adamhd_train.engine import window_loss
    from adamhd_train.models import build_model
    from adamhd_train.tp import SplitQKV, linear_blocks, set_local_heads

    torch.manual_seed(0)
    ref = build_model("nano", vocab_size=512, context=64, seed=3).eval()
    lin = linear_blocks(copy.deepcopy(ref)).eval()
    window = torch.randint(0, 512, (2, 65))
    with torch.no_grad():
        a, b = ref(input_ids=window[:, :-1]).logits, lin(input_ids=window[:, :-1]).logits
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
        assert abs(window_loss(ref, window).item() - window_loss(lin, window).item()) <= 1e-6
    block = lin.transformer.h[0]
    assert isinstance(block.attn.c_attn, SplitQKV) and isinstance(block.mlp.c_fc, torch.nn.Linear)
    assert "transformer.h.0.attn.c_attn.q.weight" in dict(lin.named_parameters())

    # two "tp ranks" by hand: rank r keeps heads [r·H/2, (r+1)·H/2) of q, k, v and the matching proj columns
    tp, d = 2, block.attn.embed_dim
    x = torch.randn(2, 64, d)
    with torch.no_grad():
        full = block.attn(x)[0]
        parts = []
        for r in range(tp):
            shard = copy.deepcopy(block.attn)
            rows = slice(r * d // tp, (r + 1) * d // tp)
            for name in ("q", "k", "v"):
                old = getattr(shard.c_attn, name)
                new = torch.nn.Linear(d, d // tp)
                new.weight.copy_(old.weight[rows]), new.bias.copy_(old.bias[rows])
                setattr(shard.c_attn, name, new)
            proj = torch.nn.Linear(d // tp, d)
            proj.weight.copy_(shard.c_proj.weight[:, rows])
            proj.bias.copy_(shard.c_proj.bias if r == 0 else torch.zeros(d))  # rowwise: the bias once
            shard.c_proj = proj
            wrapper = torch.nn.Module()
            wrapper.transformer = torch.nn.Module()
            wrapper.transformer.h = [torch.nn.Module()]
            wrapper.transformer.h[0].attn = shard
            set_local_heads(wrapper, tp)
            parts.append(shard(x)[0])
        assert (sum(parts) - full).abs().max().item() <= 1e-5 * full.abs().max().item()
    with pytest.raises(ValueError, match="tp: 3 must divide the 4 heads"):
        set_local_heads(lin, 3)
