"""Faults injected into launch/pretrain_gpt3.py on two CPU ranks under the deepspeed launcher: a diverging run, a
full disk (a small tmpfs in a private mount namespace: real ENOSPC from the kernel), and SIGTERM to the launcher's
pid alone or to one rank. Each asserts the outcome (exit status, message) and that no earlier data is lost and no
rank is left running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import launch_runs as lr

from adamhd_train import checkpoints as ck
from adamhd_train.train import EXIT_NONFINITE, EXIT_SAVE_FAILED

pytestmark = pytest.mark.slow

DATA = ["--max-chars", "200000", "--vocab-size", "512", "--val-fraction", "0.05"]
BASE = ["--deepspeed", "ds_configs/zero2_adamhd.json", "--model", "nano", "--seed", "3", "--global-batch-tokens",
        "1024", "--micro-batch", "4", "--eval-batches", "1", "--no-tensorboard"] + DATA


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    from adamhd_train.data import prepare_data

    cache = tmp_path_factory.mktemp("data-cache")
    prepare_data("embedded", vocab_size=512, max_chars=200_000, val_fraction=0.05, cache_dir=cache, progress=False)
    return cache


def _ranks_of(out: Path) -> list[int]:
    """Pids of processes still running for the run writing into ``out``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(out) in cmd and state not in ("Z", "X"):
                found.append(int(d.name))
    return found


def _wait_gone(out: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _ranks_of(out):
        time.sleep(0.3)
    left = _ranks_of(out)
    for pid in left:  # never leave a rank behind, even when the test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def test_a_diverging_run_stops_before_saving_that_state(tmp_path, data_cache):
    """A peak LR of 1e30 makes step 2's loss non-finite: the run stops there with EXIT_NONFINITE and a message,
    writes no checkpoint of that state, keeps the step-1 checkpoint (finite weights) and reports the NaN step in
    metrics.jsonl and the summary."""
    out = tmp_path / "run"
    launch = lr.run(lr.deepspeed_cmd(BASE + ["--max-steps", "8", "--save-interval", "1", "--keep-checkpoints", "1",
                                             "--lr", "1e30", "--warmup-tokens", "0", "--eval-interval", "4",
                                             "--data-cache", data_cache, "--out-dir", out]))
    assert launch.returncode == EXIT_NONFINITE, launch.output[-4000:]
    assert "stopped after step 2: the training loss of step 2 is nan" in launch.output, launch.output[-4000:]
    assert "Nothing of this state is saved" in launch.output
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [1]
    assert ck.verify_checkpoint(out / "checkpoints" / "step1") == []
    records = lr.metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert lr.finite([records[0]["loss"]]) and records[1]["loss"] is None
    assert "non-finite training loss at 1 logged step(s): 2" in launch.output
    assert not _ranks_of(out)


def _in_small_fs(mount: Path, size: str, cmd: list, copy_to: Path) -> list:
    """``cmd`` run with a tmpfs of ``size`` mounted on ``mount`` in a private mount namespace (no root needed on
    the host; the file system is gone when the command ends, so its contents are copied to ``copy_to``)."""
    mount.mkdir(parents=True, exist_ok=True)
    copy_to.mkdir(parents=True, exist_ok=True)
    script = (f'mount -t tmpfs -o size={size} adamhd-test "{mount}" || exit 97; "$@"; rc=$?; '
              f'cp -a "{mount}/." "{copy_to}/"; exit $rc')
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"] + [str(c) for c in cmd]


def _small_fs_available(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(_in_small_fs(tmp_path / "probe", "1m", ["true"], tmp_path / "probe-copy"),
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_a_full_disk_stops_the_run_with_the_bytes_needed_and_keeps_earlier_checkpoints(tmp_path, data_cache):
    """Out-dir on a 3.5 MiB file system, checkpoints of about 2.3 MB: the first save fits; before the second,
    every rank finds too little room, and the run stops with EXIT_SAVE_FAILED naming the bytes needed and free,
    nothing written and step 3 intact. On a 1 MiB file system the first save itself hits ENOSPC while DeepSpeed
    writes: one message naming the device error, the partial folder removed, no rank left running."""
    if not _small_fs_available(tmp_path):
        pytest.skip("no private mount namespace here (unshare --user --mount) to make a small file system in")
    args = BASE + ["--max-steps", "9", "--save-interval", "3", "--eval-interval", "9", "--keep-checkpoints", "3",
                   "--data-cache", data_cache]
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    full = lr.run(_in_small_fs(mnt, "3584k", lr.deepspeed_cmd(args + ["--out-dir", mnt / "run"]), copy))
    assert full.returncode == EXIT_SAVE_FAILED, full.output[-4000:]
    assert "no room for checkpoint step 6" in full.output and "(the size of the newest checkpoint)" in full.output
    assert "free on the fullest rank" in full.output, full.output[-4000:]
    root = copy / "run" / "checkpoints"
    assert [s for s, _ in ck.list_checkpoints(root)] == [3] and ck.verify_checkpoint(root / "step3") == []
    assert not list(root.glob(".partial-*"))

    mnt2, copy2 = tmp_path / "mnt2", tmp_path / "copy2"
    first = lr.run(_in_small_fs(mnt2, "1m", lr.deepspeed_cmd(args + ["--out-dir", mnt2 / "run"]), copy2))
    assert first.returncode == EXIT_SAVE_FAILED, first.output[-4000:]
    assert "checkpoint step 3 could not be written: no space left on the device" in first.output, first.output[-4000:]
    assert "The partial folder is removed and the earlier checkpoints are intact" in first.output
    root2 = copy2 / "run" / "checkpoints"
    assert ck.list_checkpoints(root2) == [] and not list(root2.glob(".partial-*"))
    assert (copy2 / "run" / "metrics.jsonl").is_file()  # the run's other files stay
    assert not _ranks_of(mnt2) and not _ranks_of(mnt)


def _start_and_wait_for_steps(cmd: list, out: Path, steps: int, env=None):
    proc, log = lr.start(cmd, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(lr.metrics(out)) >= steps:
            return proc, log
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    lr.stop_group(proc)
    raise AssertionError(f"the run did not reach step {steps}:\n{text[-4000:]}")


@pytest.mark.parametrize("launcher, target", [("deepspeed", "launcher"), ("deepspeed", "one rank"),
                                              ("torchrun", "launcher"), ("mpirun", "launcher")])
def test_sigterm_to_the_launcher_alone_or_to_one_rank_saves_and_stops_every_rank(launcher, target, tmp_path,
                                                                                  data_cache):
    """SIGTERM to the launcher's pid alone (the `deepspeed` command does not pass it on; torchrun and mpirun do) or
    to one rank: every rank finishes its step, one checkpoint is saved and verifies, and no rank is left running.
    (mpirun's own end stops its forwarding of the ranks' output, so their last lines are not asserted there.)"""
    out = tmp_path / "run"
    args = BASE + ["--max-steps", "5000", "--save-interval", "5000", "--eval-interval", "5000", "--log-interval", "1",
                   "--data-cache", data_cache, "--out-dir", out]
    env = None
    if launcher == "mpirun":
        if not lr.mpirun_available():
            pytest.fail("mpirun not found beside the interpreter: install the project's [mpi] extra")
        env = lr.mpirun_env(tmp_path / "bin")
    cmd = {"deepspeed": lr.deepspeed_cmd, "torchrun": lr.torchrun_cmd, "mpirun": lr.mpirun_cmd}[launcher](args)
    proc, log = _start_and_wait_for_steps(cmd, out, 2, env=env)
    try:
        if target == "launcher":
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        else:
            rank = next(pid for pid in _ranks_of(out) if "--local_rank=1" in Path(f"/proc/{pid}/cmdline").read_text())
            os.kill(rank, signal.SIGTERM)
        left = _wait_gone(out, 150)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            lr.stop_group(proc)
        _wait_gone(out, 1)
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    assert not left, text[-4000:]
    assert launcher == "mpirun" or "interrupted after step" in text, text[-4000:]
    if launcher == "deepspeed" and target == "launcher":
        assert "the launcher process" in text and "ended" in text
    step, folder = ck.latest_checkpoint(out / "checkpoints")
    assert 2 <= step < 5000 and ck.verify_checkpoint(folder) == []
    assert ck.read_trainer_state(folder)["step"] == step
    assert [r["step"] for r in lr.metrics(out)] == list(range(1, step + 1))
