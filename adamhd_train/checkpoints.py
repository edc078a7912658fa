"""The checkpoint folder of a run: atomic commits, the newest complete checkpoint, pruning.

    <run dir>/checkpoints/step200/       a complete checkpoint (engine files + trainer_state.json + rng_rank*.pt)
    <run dir>/checkpoints/step300/
    <run dir>/checkpoints/latest         "step300" (for DeepSpeed's tools and for people)
    <run dir>/checkpoints/.partial-step400/   being written; never read

Every rank writes its part into ``.partial-step<N>``; after a barrier, rank 0 records every file's size and
checksum in ``checksums.json`` (the last write) and renames the folder to ``step<N>`` (one ``rename``, after the
files reached the disk). A launch that resumes verifies them first (:func:`verify_checkpoint`); a checkpoint that
fails is set aside as ``.corrupt-step<N>`` (never deleted), and ``--resume auto`` takes the newest one that
verifies. A checkpoint without ``checksums.json`` (written before checksums were recorded) loads unverified, with
a note. A run killed while saving leaves a ``.partial-*`` folder that
is ignored and removed at the next start, and every earlier checkpoint intact. The folder layout assumes that all
ranks see the same file system (as DeepSpeed's own checkpoints do).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from adamhd_dist.fsutil import (CHECKSUMS, atomic_write, checksum_files, checkpoint_files, file_checksum,
                                publish_folder, verify_checksums, write_checksums)

__all__ = ["CHECKPOINT_DIR", "TRAINER_STATE", "tag_for", "partial_tag", "list_checkpoints", "latest_checkpoint",
           "commit_checkpoint", "prune_checkpoints", "remove_partials", "write_json_atomic", "read_trainer_state",
           "save_rng_state", "load_rng_state", "CHECKSUMS", "write_checksums", "checksum_files", "verify_checkpoint", "set_aside",
           "checkpoint_files", "file_checksum", "folder_bytes", "free_bytes"]

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step{step}"


def partial_tag(step: int) -> str:
    """Folder name of a checkpoint while it is being written."""
    return f".partial-step{step}"


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""

    def write(f):
        json.dump(obj, f, indent=1)
        f.write("\n")

    atomic_write(path, write)


def list_checkpoints(root: Path | str) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _TAG.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path | str) -> Optional[tuple[int, Path]]:
    """The newest complete checkpoint under ``root`` as ``(step, folder)``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(folder: Path | str, files: Optional[list[str]] = None) -> Optional[list[str]]:
    """A checkpoint's problems against its checksums (:func:`adamhd_dist.fsutil.verify_checksums`)."""
    return verify_checksums(folder, files)


def set_aside(folder: Path | str) -> Path:
    """Rename a checkpoint that failed verification to ``.corrupt-<name>`` beside it (kept, never read again)."""
    folder = Path(folder)
    target = folder.with_name(f".corrupt-{folder.name}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f".corrupt-{folder.name}-{n}")
    os.rename(folder, target)
    return target


def commit_checkpoint(root: Path | str, step: int, checksums: Optional[dict[str, dict]] = None) -> Path:
    """Publish ``.partial-step<N>`` as ``step<N>`` (rank 0, after every rank finished writing) and point
    ``latest`` at it, after recording every file's checksum (``checksums``: computed by the ranks, else here). A
    previous ``step<N>`` (a run that resumed from an earlier step) is replaced."""
    root = Path(root)
    tmp, final = root / partial_tag(step), root / tag_for(step)
    if not (tmp / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"checkpoint {str(tmp)!r} is incomplete: no {TRAINER_STATE}")
    write_checksums(tmp, checksums)
    publish_folder(tmp, final, replace=True)
    atomic_write(root / "latest", lambda f: f.write(tag_for(step) + "\n"))
    return final


def folder_bytes(folder: Path | str) -> int:
    """The bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def free_bytes(path: Path | str) -> int:
    """Free bytes (for this user) of the file system holding ``path`` or its nearest existing parent."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _finite(folder: Path) -> bool:
    try:
        return json.loads((folder / TRAINER_STATE).read_text()).get("params_finite") is True
    except (OSError, ValueError, AttributeError):
        return False


def prune_checkpoints(root: Path | str, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (``keep <= 0`` keeps all); the deleted folders.
    The newest checkpoint whose weights were checked finite when it was saved is never deleted, even when
    ``keep`` newer ones exist that were not checked."""
    if keep <= 0:
        return []
    found = list_checkpoints(root)
    gone = [p for _, p in found[:-keep]]
    if not any(_finite(p) for _, p in found[-keep:]):
        good = next((p for _, p in reversed(found[:-keep]) if _finite(p)), None)
        gone = [p for p in gone if p != good]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def remove_partials(root: Path | str) -> list[Path]:
    """Delete the leftovers of interrupted saves (``.partial-*``, ``.replaced-*``) under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = [p for p in root.iterdir() if p.name.startswith((".partial-", ".replaced-"))]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def read_trainer_state(folder: Path | str) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint folder, with a clear error when it is not a checkpoint."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a complete checkpoint of this launcher (no {TRAINER_STATE})")
    try:
        state = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{str(path)!r} cannot be read as a checkpoint's trainer state: {e}") from None
    missing = [k for k in ("step", "tokens", "sampler") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} is not a trainer state of this launcher: it lacks {missing}")
    return state


def _rng_file(folder: Path | str, rank: int) -> Path:
    return Path(folder) / f"rng_rank{rank}.pt"


def save_rng_state(folder: Path | str, rank: int) -> None:
    """Write this process's random states (torch, CUDA, numpy, Python) into ``folder/rng_rank<rank>.pt``."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, _rng_file(folder, rank))


def load_rng_state(folder: Path | str, rank: int) -> bool:
    """Restore the random states :func:`save_rng_state` wrote for ``rank``; False when the folder has none."""
    path = _rng_file(folder, rank)
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True
