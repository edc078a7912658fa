"""Start launch/pretrain_gpt3.py the three ways a user does (deepspeed launcher, torchrun, mpirun), bounded in time.

Every launch runs in its own session on a free port with MASTER_ADDR=127.0.0.1; on timeout or when the test is
done with a failed launch, the whole process group (launcher and ranks) gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dist_utils import ROOT, free_port

SCRIPT = "launch/pretrain_gpt3.py"
BIN = Path(sys.executable).parent
# The fields of a metrics record that do not depend on timing: equal bitwise between equal runs.
EXACT_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "batch_tokens", "accum_steps", "delta_min",
                "delta_median", "delta_max", "val_loss", "val_ppl")


@dataclass
class Launch:
    cmd: list
    returncode: int
    output: str
    seconds: float

    def check(self) -> "Launch":
        assert self.returncode == 0, f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n{self.output[-8000:]}"
        return self


def base_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(key, None)
    # PATH stays as the caller's: the launchers are started by absolute path, and a different PATH could pick
    # another `ninja` for the JIT-built C++ kernels, which then rebuild (ninja versions hash commands differently).
    env.update(MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    if extra:
        env.update(extra)
    return env


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the launch's process group, then SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start(cmd: list, *, env: dict | None = None, log: Path | None = None) -> tuple[subprocess.Popen, Path]:
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"launch-{os.getpid()}-{time.monotonic_ns()}.log"
    fh = open(log, "w")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or base_env(), stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    return proc, log


def run(cmd: list, *, env: dict | None = None, timeout: float = 240) -> Launch:
    """Run a launch to completion (or kill it at ``timeout``) and return its exit status and output."""
    t0 = time.monotonic()
    proc, log = start(cmd, env=env)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out = log.read_text(errors="replace")
        log.unlink(missing_ok=True)
        raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout:.0f} s\n{out[-8000:]}")
    finally:
        if proc.poll() is None:
            stop_group(proc)
    stop_group(proc, grace=1.0)  # ranks a failed launcher may have left behind
    out = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    return Launch(cmd, proc.returncode, out, time.monotonic() - t0)


def deepspeed_cmd(args: list, nprocs: int = 2) -> list:
    return [BIN / "deepspeed", "--num_gpus", str(nprocs), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), SCRIPT] + args


def torchrun_cmd(args: list, nprocs: int = 2) -> list:
    return [BIN / "torchrun", "--nproc-per-node", str(nprocs), "--master-addr", "127.0.0.1", "--master-port",
            str(free_port()), SCRIPT] + args


def mpirun_available() -> bool:
    if not (BIN / "mpirun").exists():
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def mpirun_env(fakebin: Path) -> dict:
    """Environment for mpirun as root with a `hostname` that answers -I with 127.0.0.1: DeepSpeed's MPI
    discovery takes rank 0's address from `hostname -I`, and no traffic may leave loopback."""
    fakebin.mkdir(parents=True, exist_ok=True)
    real = shutil.which("hostname") or "/bin/hostname"
    stub = fakebin / "hostname"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = "-I" ]; then echo 127.0.0.1; else exec {real} "$@"; fi\n')
    stub.chmod(0o755)
    env = base_env({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                    "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"})
    env["PATH"] = f"{fakebin}{os.pathsep}{env['PATH']}"
    return env


def mpirun_cmd(args: list, nprocs: int = 2) -> list:
    return [BIN / "mpirun", "-np", str(nprocs), "--oversubscribe", "-x", "PATH", "-x", "MASTER_ADDR",
            "-x", "PYTHONUNBUFFERED", "-x", "CUDA_VISIBLE_DEVICES", "-x", "DS_ACCELERATOR",
            sys.executable, SCRIPT] + args + ["--master-port", str(free_port())]


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def exact(records: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in EXACT_FIELDS} for r in records]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)
