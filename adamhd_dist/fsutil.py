"""Durable file writes shared by checkpoints, the data cache and run manifests: a reader sees the old file or the
complete new one, never a partial write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["fsync_dir", "fsync_tree", "atomic_write"]


def fsync_dir(path: Path | str) -> None:
    """Flush a directory entry (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path | str) -> None:
    """Flush every file under ``folder`` to disk (before the folder is renamed into place)."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            fsync_dir(p)  # os.fsync on a read-only descriptor works for files too


def atomic_write(path: Path | str, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, rename it over ``path`` and flush
    the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself (and any renames into the folder before it) reach the disk
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
