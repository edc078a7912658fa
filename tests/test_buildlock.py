"""Build locks of torch's extension builder: a lock left by a killed builder is removed (our builders) or named
with the command that clears it (third-party builders), a live builder is waited for, and the comparison builds its
ops before any run starts. Every test works in a temporary TORCH_EXTENSIONS_DIR; no real compile runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adamhd_dist import buildlock

ROOT = Path(__file__).resolve().parents[1]

# A builder in its own process: it loads adamhd_dist/buildlock.py alone (no torch import, a fast start), takes the
# lock as torch's FileBaton does (exclusive create, kept open), says "ready", and holds it until told to finish.
# mode "ours": inside buildlock.building(); "foreign": without any owner record.
_BUILDER = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("bl", sys.argv[1])
bl = sys.modules["bl"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(bl)
folder, mode, ready, release = sys.argv[2:6]
lock = os.path.join(folder, "lock")
def hold():
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)
    open(ready, "w").close()
    while not os.path.exists(release):
        time.sleep(0.05)
    os.close(fd)
    os.remove(lock)
if mode == "ours":
    with bl.building(folder, grace_s=0.1):
        hold()
else:
    hold()
"""


class Builder:
    """A child process holding ``folder``'s lock (see ``_BUILDER``)."""

    def __init__(self, tmp_path: Path, folder: Path, mode: str):
        self.ready, self.release = tmp_path / f"ready-{mode}", tmp_path / f"release-{mode}"
        self.proc = subprocess.Popen([sys.executable, "-c", _BUILDER, buildlock.__file__, str(folder), mode,
                                      str(self.ready), str(self.release)])
        t0 = time.monotonic()
        while not self.ready.exists():
            assert self.proc.poll() is None, f"builder exited with {self.proc.returncode}"
            assert time.monotonic() - t0 < 60, "builder did not take the lock"
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self) -> int:
        self.release.touch()
        return self.proc.wait(timeout=30)

    def __del__(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    root = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    folder = root / "some_op"
    folder.mkdir(parents=True)
    return folder


def _in_thread(fn):
    """Run ``fn`` in a thread; returns (thread, box) where box gets "error" or "done"."""
    box: dict = {}

    def run():
        try:
            fn()
            box["done"] = True
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# ------------------------------------------------------------------------------------------------ our builders
def test_a_lock_left_by_a_sigkilled_builder_is_removed(tmp_path, ext_dir):
    b = Builder(tmp_path, ext_dir, "ours")
    record = json.loads((ext_dir / buildlock.OWNER).read_text())
    assert record["pid"] == b.proc.pid and record["host"]
    b.kill()
    lock = ext_dir / buildlock.LOCK
    assert lock.exists()  # what torch would wait on forever
    said: list[str] = []
    t0 = time.monotonic()
    buildlock.check(str(ext_dir), say=said.append, grace_s=30)
    assert time.monotonic() - t0 < 10  # proven stale: no grace period, no age rule
    assert not lock.exists()
    assert len(said) == 1 and str(lock) in said[0] and "no longer running" in said[0] and \
        f"pid {b.proc.pid}" in said[0], said
    assert (ext_dir / buildlock.OWNER).read_text() == ""  # the check's own record is emptied when it ends


def test_a_live_builder_is_waited_for_not_removed(tmp_path, ext_dir):
    b = Builder(tmp_path, ext_dir, "ours")
    said: list[str] = []
    t, box = _in_thread(lambda: buildlock.check(str(ext_dir), say=said.append, grace_s=0.1))
    t.join(3.0)  # a wait is announced after 2 s (ranks of one run contend for a moment on every load)
    assert t.is_alive() and not box  # still waiting, past any grace period
    assert (ext_dir / buildlock.LOCK).exists()
    assert any("waiting for the build" in s and f"pid {b.proc.pid}" in s for s in said), said
    assert b.finish() == 0  # the builder removed its own lock (it would fail had the waiter removed it)
    t.join(30)
    assert box == {"done": True}


def test_a_live_third_party_builder_is_waited_for(tmp_path, ext_dir):
    b = Builder(tmp_path, ext_dir, "foreign")
    state = buildlock.inspect(str(ext_dir))
    assert state.exists and b.proc.pid in [pid for pid, _ in state.holders]
    said: list[str] = []
    t, box = _in_thread(lambda: buildlock.check(str(ext_dir), say=said.append, grace_s=0.1))
    t.join(1.5)
    assert t.is_alive() and not box and (ext_dir / buildlock.LOCK).exists()
    assert any("waiting for a live build" in s and f"pid {b.proc.pid}" in s for s in said), said
    assert b.finish() == 0
    t.join(30)
    assert box == {"done": True}


# ------------------------------------------------------------------------------------------------ third-party locks
def test_a_dead_third_party_lock_is_reported_with_its_path_and_the_command(tmp_path, ext_dir):
    b = Builder(tmp_path, ext_dir, "foreign")
    b.kill()
    lock = ext_dir / buildlock.LOCK
    t0 = time.monotonic()
    with pytest.raises(buildlock.BuildLockError) as err:
        buildlock.check(str(ext_dir), say=lambda s: None, grace_s=0.3)
    assert time.monotonic() - t0 >= 0.3  # watched for the grace period first
    msg = str(err.value)
    assert str(lock) in msg and f"rm -f {lock}" in msg and " s old" in msg and "no live builder" in msg, msg
    assert lock.exists()  # young: may belong to a build this host cannot see


def test_an_old_third_party_lock_is_removed_only_when_every_process_was_seen(ext_dir, monkeypatch):
    lock = ext_dir / buildlock.LOCK
    lock.write_text("")
    old = time.time() - 120
    os.utime(lock, (old, old))
    monkeypatch.setenv(buildlock.STALE_ENV, "60")
    monkeypatch.setattr(buildlock, "_holders", lambda *a: ([], False))  # another user's process could hold it
    with pytest.raises(buildlock.BuildLockError, match="some processes on this host cannot be inspected"):
        buildlock.check(str(ext_dir), say=lambda s: None, grace_s=0)
    assert lock.exists()
    monkeypatch.setattr(buildlock, "_holders", lambda *a: ([], True))
    said: list[str] = []
    buildlock.check(str(ext_dir), say=said.append, grace_s=0)
    assert not lock.exists() and "longer than any build" in said[0] and str(lock) in said[0]
    monkeypatch.setenv(buildlock.STALE_ENV, "soon")
    lock.write_text("")
    with pytest.raises(ValueError, match="ADAMHD_BUILD_LOCK_STALE_S='soon': expected a positive number"):
        buildlock.check(str(ext_dir), say=lambda s: None, grace_s=0)


def test_a_lock_older_than_a_dead_owners_build_is_not_taken_for_its_own(ext_dir, monkeypatch):
    """A dead owner's record proves only the locks made during its build."""
    (ext_dir / buildlock.OWNER).write_text(json.dumps({"pid": 999999, "host": os.uname().nodename,
                                                       "started": time.time(), "command": "x"}))
    lock = ext_dir / buildlock.LOCK
    lock.write_text("")
    old = time.time() - 100
    os.utime(lock, (old, old))
    monkeypatch.setattr(buildlock.socket, "gethostname", lambda: os.uname().nodename)
    with pytest.raises(buildlock.BuildLockError, match="rm -f"):
        buildlock.check(str(ext_dir), say=lambda s: None, grace_s=0)
    assert lock.exists()


# ------------------------------------------------------------------------------------------------ the CPU kernel
class _FakeTorchLoad:
    """torch's cpp_extension.load as far as its lock goes: the same FileBaton, no compile; a lock in the way would
    make the real one wait forever, so it fails instead."""

    def __init__(self):
        self.calls = 0

    def __call__(self, name, **kwargs):
        from torch.utils import cpp_extension
        from torch.utils.file_baton import FileBaton

        baton = FileBaton(os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock"))
        assert baton.try_acquire(), "torch would wait on this lock forever"
        baton.release()
        self.calls += 1
        return f"module {name}"


def test_cpu_kernel_load_clears_a_dead_owners_lock_and_reports_a_foreign_one(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    from adamhd_dist.optim.kernels import cpu

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu, "_modules", {})
    monkeypatch.setattr(cpu, "_errors", {})
    fake = _FakeTorchLoad()
    monkeypatch.setattr(cpp_extension, "load", fake)
    folder = Path(cpp_extension._get_build_directory(cpu._ext_name("generic"), verbose=False))
    b = Builder(tmp_path, folder, "ours")  # a kernel build killed midway
    b.kill()
    assert cpu.load("generic") == f"module {cpu._ext_name('generic')}" and fake.calls == 1
    assert not (folder / "lock").exists() and (folder / buildlock.OWNER).read_text() == ""

    monkeypatch.setattr(cpu, "_modules", {})
    monkeypatch.setattr(buildlock, "GRACE_S", 0.1)
    (folder / "lock").write_text("")  # a lock with no owner record and nobody holding it
    with pytest.raises(buildlock.BuildLockError, match=f"rm -f {folder / 'lock'}"):
        cpu.load("generic")
    assert fake.calls == 1  # torch was never asked to wait on it
    (folder / "lock").unlink()
    assert cpu.load("generic") and fake.calls == 2  # not cached as a missing kernel: cleared, it loads


# ------------------------------------------------------------------------------------------------ DeepSpeed's ops
def test_deepspeed_ops_of_a_config_match_what_initialize_loads(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    adamw = json.loads((ROOT / "ds_configs" / "zero2_adamw.json").read_text())
    adamhd = json.loads((ROOT / "ds_configs" / "zero2_adamhd.json").read_text())

    def names(cfg):
        return sorted(b.name for b in buildlock.deepspeed_op_builders(cfg))

    # ZeRO-2 without offload: DeepSpeed's FusedAdam (CPU accelerator: op_builder/cpu/fused_adam.py), and the
    # shared-memory collectives every CPU run initialises
    assert names(adamw) == ["deepspeed_shm_comm", "fused_adam"]
    offload = dict(adamw, zero_optimization=dict(adamw["zero_optimization"], offload_optimizer={"device": "cpu"}))
    assert names(offload) == ["cpu_adam", "deepspeed_shm_comm"]
    torch_adam = dict(adamw, optimizer={"type": "AdamW", "params": {"torch_adam": True}})
    assert names(torch_adam) == ["deepspeed_shm_comm"]
    assert names(adamhd) == ["deepspeed_shm_comm"]


def test_the_engine_loads_deepspeeds_ops_before_initialize(monkeypatch):
    import torch

    from adamhd_train import engine

    order = []
    monkeypatch.setattr(engine.buildlock, "load_deepspeed_ops", lambda cfg, **kw: order.append(("ops", cfg)))

    def initialize(**kw):
        order.append(("initialize", kw["config"]))
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine.ads, "initialize", initialize)
    cfg = json.loads((ROOT / "ds_configs" / "zero2_adamw.json").read_text())
    with pytest.raises(RuntimeError, match="stop here"):
        engine.DeepSpeedEngine(torch.nn.Linear(2, 2), cfg, lr_scheduler=None, weight_decay=0.1, device="cpu")
    assert order == [("ops", cfg), ("initialize", cfg)]


# ------------------------------------------------------------------------------------------------ the comparison
def _study(tmp_path, monkeypatch):
    from adamhd_study import execute as ex
    from adamhd_study.config import preset
    from adamhd_study.plan import plan_runs

    cfg = preset("tiny", out_dir=str(tmp_path / "cmp"), arms=("baseline",))
    events = []
    monkeypatch.setattr(ex._Runner, "start", lambda self, run: events.append(("start", run.name)))
    monkeypatch.setattr(ex.torch.cuda, "is_available", lambda: False)
    return ex, cfg, plan_runs(cfg), events


def test_the_comparison_builds_its_ops_before_any_run_starts(tmp_path, monkeypatch):
    ex, cfg, runs, events = _study(tmp_path, monkeypatch)
    monkeypatch.setattr(ex.buildlock, "load_deepspeed_ops",
                        lambda c, **kw: events.append(("deepspeed ops", c["optimizer"]["type"])) or [])
    monkeypatch.setattr(ex, "_load_cpu_kernel", lambda: events.append(("cpu kernel", None)))
    said: list[str] = []
    ex.execute(runs, cfg, say=said.append)
    assert events == [("deepspeed ops", "AdamHD"), ("deepspeed ops", "AdamW"), ("cpu kernel", None),
                      ("start", "baseline-adamhd-s0"), ("start", "baseline-adamw-s0")]
    assert any("before any run starts" in s for s in said), said


def test_the_comparison_stops_at_a_stale_lock_before_any_run(tmp_path, monkeypatch):
    ex, cfg, runs, events = _study(tmp_path, monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(buildlock, "GRACE_S", 0.1)

    class FakeFusedAdam:  # DeepSpeed's builder, without the minute-long compile
        name = "fused_adam"

        def load(self, verbose=False):
            events.append(("load", self.name))

    monkeypatch.setattr(buildlock, "deepspeed_op_builders", lambda cfg: [FakeFusedAdam()])
    monkeypatch.setattr(ex, "_load_cpu_kernel", lambda: events.append(("cpu kernel", None)))
    lock = Path(buildlock.extension_dir("fused_adam")) / "lock"
    lock.write_text("")  # left by an AdamW run killed in its first build
    with pytest.raises(buildlock.BuildLockError) as err:
        ex.execute(runs, cfg, say=lambda s: None)
    assert str(lock) in str(err.value) and f"rm -f {lock}" in str(err.value)
    assert events == []  # nothing loaded, no run started
    lock.unlink()
    ex.execute(runs, cfg, say=lambda s: None)
    assert events[-2:] == [("start", "baseline-adamhd-s0"), ("start", "baseline-adamw-s0")]
    assert ("load", "fused_adam") in events
