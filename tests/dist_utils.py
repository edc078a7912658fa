"""Run a function on N local CPU ranks (gloo) as separate processes, with a bounded time and no stragglers.

    results = run_ranks("dist_workers_fsdp:check_something", world_size=2, kwargs={"steps": 3})

The target is ``module:function`` importable from ``tests/``; it is called as ``fn(**kwargs)`` on every rank with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR=127.0.0.1 / MASTER_PORT set (the process group is NOT initialised:
the target does that, with the backend and engine it tests). Its return value (anything ``torch.save`` accepts)
comes back, one per rank. A rank that raises, hangs past ``timeout`` or dies fails the call with every rank's
output, and every rank's process group is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adamhd_train.ports import free_port  # noqa: F401  (the tests import it from here)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

_RUNNER = r"""
import os, sys, importlib, traceback, torch
sys.path.insert(0, {tests!r})
mod, fn = {target!r}.split(":")
kwargs = torch.load({kwargs!r}, weights_only=False)
try:
    out = getattr(importlib.import_module(mod), fn)(**kwargs)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(3)
torch.save(out, os.path.join({outdir!r}, "rank%s.pt" % os.environ["RANK"]))
try:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
except Exception:
    pass
# The result is on disk: leave without the interpreter's teardown, where gloo's threads of many sub-groups
# (device meshes) are sometimes destroyed while still joinable and abort the process ("terminate called").
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""




def rank_env(rank: int, world_size: int, port: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")]))
    env.setdefault("TRITON_INTERPRET", "1")
    if extra:
        env.update(extra)
    return env


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_ranks(target: str, world_size: int, *, kwargs: dict | None = None, timeout: float = 300,
              env: dict | None = None) -> list:
    """Run ``target`` on ``world_size`` fresh processes; return the per-rank results in rank order."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="adamhd-ranks-") as tmp:
        kw = os.path.join(tmp, "kwargs.pt")
        torch.save(kwargs or {}, kw)
        code = _RUNNER.format(tests=str(TESTS), target=target, kwargs=kw, outdir=tmp)
        procs, logs = [], []
        for rank in range(world_size):
            log = open(os.path.join(tmp, f"log{rank}.txt"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=rank_env(rank, world_size, port, env),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        deadline = time.monotonic() + timeout
        failed = None
        try:
            while True:
                codes = [p.poll() for p in procs]
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = f"rank {bad[0][0]} exited with {bad[0][1]}"
                    break
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    failed = f"timed out after {timeout:.0f} s"
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                kill_group(p)
            for p in procs:
                p.wait()
        if failed:
            text = []
            for rank, log in enumerate(logs):
                log.seek(0)
                text.append(f"----- rank {rank} -----\n{log.read()[-6000:]}")
            raise AssertionError(f"{target} on {world_size} ranks: {failed}\n" + "\n".join(text))
        for log in logs:
            log.close()
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
