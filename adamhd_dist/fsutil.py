"""Durable file writes shared by checkpoints, the data cache and run manifests: a reader sees the old file or the
complete new one, never a partial write."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Optional

__all__ = ["fsync_dir", "fsync_tree", "atomic_write", "publish_folder", "CHECKSUMS", "checkpoint_files", "file_checksum", "checksum_files",
           "write_checksums", "verify_checksums"]

CHECKSUMS = "checksums.json"
"""A folder's record of every file's size and BLAKE2b-128 checksum, written as its last file."""
_CHUNK = 8 << 20


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


def publish_folder(tmp: Path | str, final: Path | str, *, replace: bool = False) -> Path:
    """Make the folder ``tmp`` visible as ``final`` in one rename, after its files reached the disk.

    ``replace``: an existing ``final`` is renamed aside to ``.replaced-<name>`` first and removed after (a crash
    in between leaves that folder, never a half-written ``final``). Otherwise an existing ``final`` raises
    FileExistsError and ``tmp`` is left as it is."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if replace and final.exists():
        old = final.with_name(f".replaced-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if not replace and final.exists():
            raise FileExistsError(f"{str(final)!r} exists already") from e
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_files(folder: Path | str) -> list[str]:
    """Every file of a folder but the checksum record, as sorted paths relative to it."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def file_checksum(path: Path | str) -> str:
    """BLAKE2b (128-bit) of a file's bytes, read in 8 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def checksum_files(folder: Path | str, files: list[str]) -> dict[str, dict]:
    """``{file: {"bytes", "blake2b"}}`` of ``files`` (paths relative to ``folder``): one rank's share."""
    folder = Path(folder)
    return {rel: {"bytes": (folder / rel).stat().st_size, "blake2b": file_checksum(folder / rel)} for rel in files}


def write_checksums(folder: Path | str, files: Optional[dict[str, dict]] = None) -> dict:
    """Record the size and checksum of every file of ``folder`` in ``checksums.json`` (its last write); ``files``:
    the records already computed (by every rank, a share each), else computed here."""
    folder = Path(folder)
    if files is None:
        files = checksum_files(folder, checkpoint_files(folder))
    missing = sorted(set(checkpoint_files(folder)) - set(files))
    if missing:
        raise RuntimeError(f"checkpoint {str(folder)!r}: no checksum for {missing}")
    record = {"algorithm": "blake2b-128", "files": dict(sorted(files.items()))}
    atomic_write(folder / CHECKSUMS, lambda f: f.write(json.dumps(record, indent=1) + "\n"))
    return record


def verify_checksums(folder: Path | str, files: Optional[list[str]] = None) -> Optional[list[str]]:
    """The problems of a folder against its ``checksums.json``: one line per file that is missing, has another
    size or another checksum (``files``: only those, e.g. one rank's share). ``[]``: it verifies. None: it has no
    checksums (written before they were recorded)."""
    folder = Path(folder)
    record_path = folder / CHECKSUMS
    if not record_path.is_file():
        return None
    try:
        recorded = json.loads(record_path.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return [f"{record_path}: the checksum record cannot be read ({e})"]
    problems = []
    for rel in recorded if files is None else files:
        want, path = recorded.get(rel), folder / rel
        if want is None:
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{path}: {size:,} bytes, {want['bytes']:,} were written (truncated or overwritten)")
        elif file_checksum(path) != want["blake2b"]:
            problems.append(f"{path}: its checksum differs from the one recorded when it was written (the bytes "
                            f"changed on disk)")
    return problems
