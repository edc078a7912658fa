"""How the ranks of a run were started, and joining them into one process group.

:func:`launch_context` reads the rank layout from the environment before any process group exists (the deepspeed
launcher and torchrun set RANK/WORLD_SIZE, mpirun sets OMPI_COMM_WORLD_* or PMI_*, a plain ``python`` sets
nothing); :func:`init_process_group` starts the group the engine needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .ports import DEFAULT_MASTER_PORT, free_port

__all__ = ["LaunchContext", "launch_context", "init_process_group", "available_cpus"]


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class LaunchContext:
    """Rank layout read from the environment before the process group exists."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    """``"deepspeed"``/``"torchrun"`` (RANK etc. set), ``"mpirun"`` (OpenMPI/PMI variables), ``"single process"``."""
    on_gpu: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> Optional[int]:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return None


def launch_context(on_gpu: Optional[bool] = None) -> LaunchContext:
    """Where this process sits: from RANK/WORLD_SIZE (deepspeed launcher, torchrun), OMPI_COMM_WORLD_* / PMI_*
    (mpirun), or nothing (a single process)."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "deepspeed"
        local = _env_int("LOCAL_RANK") or 0
        local_world = _env_int("LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world
    elif _env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE") is not None:
        launcher = "mpirun"
        rank = _env_int("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0
        world = _env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
        local = _env_int("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
        local_world = _env_int("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS") or world
    else:
        launcher, rank, world, local, local_world = "single process", 0, 1, 0, 1
    return LaunchContext(rank, world, local, local_world, launcher, bool(on_gpu))


def init_process_group(launch: str, ctx: LaunchContext, master_port: Optional[int]) -> None:
    """Join the ranks: DeepSpeed's ``init_distributed`` for ``launch == "deepspeed"`` (it also discovers ranks
    under mpirun), ``torch.distributed`` for FSDP2; NCCL on GPUs, gloo on CPUs. A single process gets a loopback
    rendezvous on ``master_port`` (or a free port)."""
    if ctx.launcher == "single process":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR=os.environ.get("MASTER_ADDR",
                          "127.0.0.1"), MASTER_PORT=str(master_port or free_port()))
    backend = "nccl" if ctx.on_gpu else "gloo"
    if ctx.on_gpu:
        torch.cuda.set_device(ctx.local_rank)
    if launch == "deepspeed":
        # deepspeed is imported here only: an FSDP2 run (and an install without the deepspeed extra) never loads it
        import deepspeed

        port = master_port or int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=ctx.launcher == "mpirun",
                                   distributed_port=port, verbose=False)
    else:
        kwargs = {"device_id": torch.device("cuda", ctx.local_rank)} if ctx.on_gpu else {}
        dist.init_process_group(backend, **kwargs)
    if dist.get_world_size() != ctx.world_size:
        raise RuntimeError(f"the process group has {dist.get_world_size()} ranks, the launcher announced "
                           f"{ctx.world_size}")


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """``(state, parent pid)`` of a process from /proc (Linux), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_pids(ctx: LaunchContext) -> list[int]:
    """The processes that started this rank and whose end means the job was stopped: the parent (the deepspeed
    launcher's per-node ``launch``, torchrun's agent, mpirun's daemon) and, under the ``deepspeed`` command, the
    command itself (on one node it starts ``launch`` and does not pass a SIGTERM on: killed alone, it leaves the
    ranks running). Empty for a single process, whose parent is a shell."""
    if ctx.launcher == "single process":
        return []
    pids = [os.getppid()]
    stat = _proc_stat(pids[0])
    if ctx.launcher == "deepspeed" and stat is not None and stat[1] > 1 and "deepspeed" in _cmdline(stat[1]):
        pids.append(stat[1])
    return pids


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    stat = _proc_stat(pid)
    return stat is not None and stat[0] in ("Z", "X")
