"""Run manifests: everything needed to re-run a pre-training job, written into its run directory.

A manifest is one JSON file (``<run dir>/manifest.json``) with

- ``settings``: the job's fully resolved settings (:class:`adamhd_train.settings.TrainSettings` as a dict: model,
  batch, schedule, dtype, seed, data options, ...), from which ``launch/pretrain_gpt3.py --from-manifest`` rebuilds
  the same job;
- ``deepspeed_config``: the DeepSpeed config exactly as passed to ``deepspeed.initialize`` (after the launcher set
  the batch numbers and adapted it to the hardware), and ``deepspeed_config_source``, the file as read;
- ``world_size``, ``seed``, ``launcher`` (how the ranks were started), ``argv``, ``rerun_command``;
- ``data``: source, tokenizer, token counts and the SHA-256 of the corpus, tokenizer and token files;
- ``git``: commit, branch, and whether the work tree had uncommitted changes (with a hash of the diff);
- ``packages``: versions of Python, torch, deepspeed, transformers, datasets, tokenizers, numpy, ...;
- ``hardware``: host, CPU model and count, memory, GPUs, CUDA version;
- ``resumes``: one entry per later launch that continued the run (time, step, world size, git, hardware).

    >>> m = build_manifest(settings={"seed": 1}, world_size=2, launcher="deepspeed")
    >>> sorted(m)[:3]
    ['argv', 'created', 'data']
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from adamhd_dist.fsutil import atomic_write

from .ranks import available_cpus

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "build_manifest",
    "write_manifest",
    "read_manifest",
    "record_resume",
    "git_info",
    "package_versions",
    "hardware_info",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "tokenizers", "numpy", "tqdm", "matplotlib",
             "tensorboard", "triton", "mpi4py", "adamhd_dist")
_REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", errors="replace")


def git_info(repo: Path | str = _REPO) -> dict[str, Any]:
    """``{"commit", "branch", "dirty", "diff_sha256", "untracked_files"}`` of the repository holding this
    package; ``{"commit": None}`` outside a git checkout. ``dirty`` is True when tracked files differ from the
    commit or files git does not ignore are untracked; ``diff_sha256`` identifies the tracked changes
    (``git diff HEAD``), so two dirty runs can be told apart."""
    repo = Path(repo)
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    if commit is None:
        return {"commit": None}
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo)
    diff = _run(["git", "diff", "HEAD"], repo) or ""
    untracked = _run(["git", "ls-files", "--others", "--exclude-standard"], repo) or ""
    return {
        "commit": commit.strip(),
        "branch": branch.strip() if branch else None,
        "dirty": bool(diff.strip() or untracked.strip()),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff.strip() else None,
        "untracked_files": len(untracked.split()),
    }


def package_versions() -> dict[str, Optional[str]]:
    """Python and the versions of the packages a run depends on (None when not installed)."""
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["torch_cuda"] = torch.version.cuda
    out["torch_git"] = getattr(torch.version, "git_version", None)
    return out


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def hardware_info() -> dict[str, Any]:
    """Host name, OS, CPU model, CPUs available to this process, memory, and GPUs (name, memory) if any."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus_available": available_cpus(),
        "cpus_total": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_bytes": int(p.total_memory),
                                 "capability": f"{p.major}.{p.minor}"})
        info["cuda"] = torch.version.cuda
    return info


def build_manifest(
    *,
    settings: dict[str, Any],
    world_size: int,
    launcher: str,
    deepspeed_config: Optional[dict] = None,
    deepspeed_config_source: Optional[dict] = None,
    data: Optional[dict] = None,
    derived: Optional[dict] = None,
    argv: Optional[list[str]] = None,
    rerun_command: Optional[str] = None,
) -> dict[str, Any]:
    """The manifest of a new run (see the module docstring for the keys).

    Args:
        settings: the resolved job settings, JSON-able (``dataclasses.asdict`` of a TrainSettings).
        world_size: data-parallel ranks of this launch.
        launcher: how the ranks were started ("deepspeed", "torchrun", "mpirun", "single process").
        deepspeed_config, deepspeed_config_source: the config passed to DeepSpeed, and the file as read.
        data: :meth:`adamhd_train.data.PreparedData.manifest` of the corpus.
        derived: numbers the launcher derived and printed (batch plan, schedule, parameter counts).
        argv: the command line of rank 0; rerun_command: a command that re-runs this job.
    """
    return {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": settings.get("seed"),
        "world_size": world_size,
        "launcher": launcher,
        "argv": list(sys.argv if argv is None else argv),
        "rerun_command": rerun_command,
        "settings": settings,
        "derived": derived or {},
        "deepspeed_config": deepspeed_config,
        "deepspeed_config_source": deepspeed_config_source,
        "data": data or {},
        "git": git_info(),
        "packages": package_versions(),
        "hardware": hardware_info(),
        "resumes": [],
    }


def write_manifest(manifest: dict[str, Any], run_dir: Path | str) -> Path:
    """Write ``manifest`` to ``run_dir/manifest.json`` atomically (a complete file or the previous one)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def write(f):
        json.dump(manifest, f, indent=1, sort_keys=False, default=str)
        f.write("\n")

    return atomic_write(run_dir / MANIFEST_FILE, write)


def read_manifest(path: Path | str) -> dict[str, Any]:
    """A manifest from a file or a run directory, with a clear error for a missing, invalid or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {str(path)!r}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"manifest {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise ValueError(f"{str(path)!r} is not a run manifest (no \"settings\" object)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest {str(path)!r} has format {manifest.get('format')!r}; this version reads "
                         f"format {MANIFEST_FORMAT}")
    return manifest


def record_resume(run_dir: Path | str, *, step: int, world_size: int, launcher: str,
                  argv: Optional[list[str]] = None) -> None:
    """Append a record of a launch that resumed the run at ``step`` to the run's manifest."""
    manifest = read_manifest(run_dir)
    manifest.setdefault("resumes", []).append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "world_size": world_size,
        "launcher": launcher,
        "argv": list(sys.argv if argv is None else argv),
        "git": git_info(),
        "hardware": hardware_info(),
    })
    write_manifest(manifest, run_dir)
