"""Running the planned runs as subprocesses: :func:`execute` starts them ``parallel`` at a time (the optimizers of
one arm and seed side by side), each with ``MASTER_ADDR=127.0.0.1``, its own port, its own log and a time limit,
and reuses a run directory that already holds the finished run. Before any run starts, :func:`prebuild_ops` builds
the C++ ops the runs load (DeepSpeed's for their configs, AdamHD's CPU kernel), once, in this process: a run's time
limit then never stops a build, and a build lock left by an earlier killed build is removed or reported first."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from adamhd_dist import buildlock
from adamhd_dist.deepspeed import is_adamhd_config
from adamhd_train.checkpoints import latest_checkpoint
from adamhd_train.ports import free_port
from adamhd_train.ranks import available_cpus

from .config import CompareConfig
from .plan import RunSpec, command_for, run_spec

__all__ = ["execute", "prebuild_ops", "threads_per_run", "read_status", "STATUS_FILE"]

STATUS_FILE = "compare_status.json"
"""Written into a run directory when its run ends: exit status, wall time, command, threads, log."""


def threads_per_run(cfg: CompareConfig) -> int:
    """CPU threads each run gets: the machine's cores shared by the runs and ranks that run at the same time."""
    return max(1, available_cpus() // (cfg.parallel * cfg.nproc))


def read_status(run: RunSpec) -> dict:
    """The run's status file (from this invocation or an earlier one)."""
    return json.loads((run.run_dir / STATUS_FILE).read_text())


def _finished(run: RunSpec) -> bool:
    found = latest_checkpoint(run.run_dir / "checkpoints")
    return (found is not None and found[0] >= run.max_steps and (run.run_dir / "metrics.jsonl").is_file()
            and (run.run_dir / STATUS_FILE).is_file() and read_status(run).get("returncode") == 0)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    except ProcessLookupError:
        pass


def _batches(runs: list[RunSpec], parallel: int) -> list[list[RunSpec]]:
    """The runs grouped by arm and seed (at most ``parallel`` per group): a group starts together."""
    groups: list[list[RunSpec]] = []
    for run in runs:
        if groups and (groups[-1][0].arm, groups[-1][0].seed) == (run.arm, run.seed) and len(groups[-1]) < parallel:
            groups[-1].append(run)
        else:
            groups.append([run])
    return groups


def _load_cpu_kernel() -> None:
    from adamhd_dist.optim.kernels import cpu

    cpu.load()


def prebuild_ops(cfg: CompareConfig, optimizers, *, say: Callable[[str], None] = print) -> None:
    """Build (first time) and load here the ops the runs of ``optimizers`` load: DeepSpeed's for each config
    (:func:`adamhd_dist.buildlock.load_deepspeed_ops`) and, on a machine without CUDA, AdamHD's CPU kernel for the
    selected ISA (``ADAMHD_CPU_ISA``, which the runs inherit). Raises
    :class:`~adamhd_dist.buildlock.BuildLockError` for a build lock that must be cleared by hand; a build that
    fails otherwise is said and left to the runs (which report it, or take AdamHD's foreach path)."""
    t0 = time.perf_counter()
    configs = {name: json.loads(cfg.config_path(name).read_text()) for name in optimizers}
    say("[compare] building the ops the runs load (first time only), before any run starts")
    built = []
    for ds_config in configs.values():
        built += [n for n in buildlock.load_deepspeed_ops(ds_config, say=say) if n not in built]
    if not torch.cuda.is_available() and any(is_adamhd_config(c) for c in configs.values()):
        try:
            _load_cpu_kernel()
            built.append("AdamHD's CPU kernel")
        except buildlock.BuildLockError:
            raise
        except Exception as exc:  # noqa: BLE001 - the runs meet the same and take the foreach path
            say(f"[compare] AdamHD's CPU kernel is unavailable ({exc}); its runs take the foreach path")
    say(f"[compare] ops ready in {time.perf_counter() - t0:.0f} s: {', '.join(built) or 'none needed'}")


@dataclass
class _Active:
    run: RunSpec
    proc: subprocess.Popen
    t0: float
    log: Any
    cmd: list[str]


class _Runner:
    """The subprocesses of one :func:`execute` call."""

    def __init__(self, cfg: CompareConfig, say: Callable[[str], None]):
        self.cfg, self.say = cfg, say
        self.threads = threads_per_run(cfg)
        self.env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
        if not torch.cuda.is_available():
            self.env["OMP_NUM_THREADS"] = str(self.threads)
        self.active: list[_Active] = []
        self.status: dict[str, dict] = {}

    def start(self, run: RunSpec) -> None:
        """Start ``run``, or record it as reused when its directory holds the finished run."""
        if _finished(run):
            self.status[run.name] = dict(read_status(run), reused=True)
            self.say(f"[compare] {run.name}: finished earlier in {run.run_dir}, reused")
            return
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "compare_spec.json").write_text(json.dumps(run_spec(run, self.cfg), indent=1) + "\n")
        cmd = command_for(run, self.cfg, free_port())
        log = open(run.run_dir / "launcher.log", "w")
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        self.say(f"[compare] {run.name}: started ({self.threads} thread(s))")
        proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.active.append(_Active(run, proc, time.perf_counter(), log, cmd))

    def poll(self) -> None:
        """Record the runs that ended; stop those past ``run_timeout_s``."""
        still = []
        for a in self.active:
            elapsed = time.perf_counter() - a.t0
            code = a.proc.poll()
            if code is None and elapsed > self.cfg.run_timeout_s:
                _kill(a.proc)
                code = 124
                a.log.write(f"\n[compare] stopped after {elapsed:.0f} s (--run-timeout {self.cfg.run_timeout_s:g})\n")
            if code is None:
                still.append(a)
                continue
            a.log.close()
            st = {"returncode": code, "wall_s": elapsed, "command": shlex.join(a.cmd), "threads": self.threads,
                  "log": str(a.run.run_dir / "launcher.log"), "finished": time.time()}
            (a.run.run_dir / STATUS_FILE).write_text(json.dumps(st, indent=1) + "\n")
            self.status[a.run.name] = dict(st, reused=False)
            self.say(f"[compare] {a.run.name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {elapsed:.0f} s")
        self.active = still

    def stop_all(self) -> None:
        for a in self.active:
            _kill(a.proc)
            a.log.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def execute(runs: list[RunSpec], cfg: CompareConfig, *, say: Callable[[str], None] = print) -> dict[str, dict]:
    """Start every run not finished yet (``cfg.parallel`` at a time), wait for all; ``{run name: status}`` with
    ``returncode``, ``wall_s``, ``command``, ``log``, ``threads`` and ``reused`` (True when the run directory
    already held the finished run). Output of each run goes to ``<run dir>/launcher.log``.

    The runs of one arm and seed (one per optimizer) start together, and only when there are slots for all of
    them, so the optimizers being compared share the machine for their whole run: their wall-clock figures see
    the same background load. The ops the runs load are built first (:func:`prebuild_ops`), so no run's time or
    time limit includes a build."""
    todo = [run for run in runs if not _finished(run)]
    if todo:
        prebuild_ops(cfg, list(dict.fromkeys(run.optimizer for run in todo)), say=say)
    pending = _batches(runs, cfg.parallel)
    runner = _Runner(cfg, say)
    # SIGTERM stops the running children too (they run in their own sessions, out of reach of a group kill)
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        while pending or runner.active:
            while pending and len(runner.active) + len(pending[0]) <= cfg.parallel:
                for run in pending.pop(0):
                    runner.start(run)
            time.sleep(0.5)
            runner.poll()
    finally:
        runner.stop_all()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return runner.status
