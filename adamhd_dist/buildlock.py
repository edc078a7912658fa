"""Build locks of torch's C++ extensions: a live build is waited for, a lock a killed build left is removed or
reported with the command that clears it.

``torch.utils.cpp_extension.load`` takes ``<TORCH_EXTENSIONS_DIR>/<name>/lock`` on every load (also when nothing is
rebuilt): it creates the file exclusively, keeps it open while it builds, and removes it at the end. Any other load
of the same extension waits while the file exists, forever and without a word. A process killed in between (a run
stopped by a time limit, a rank SIGKILLed by its launcher) leaves the file behind.

Our builds go through :func:`building`: for the whole build the builder holds an ``flock`` on ``lock.owner`` beside
the lock and writes its pid, host, start time and command line into it (emptied when the build ends). The kernel
releases an ``flock`` when its holder dies, even by SIGKILL, so a lock found while that ``flock`` is free and the
record still filled was left by a builder that is gone: it is removed. A builder that holds the ``flock`` is alive
and is waited for. The record proves only a lock made during its build (not older than its start) and on this host
(an ``flock`` on a network filesystem need not reach other machines); other locks are judged as third-party ones.

A lock without such a record (a third-party builder, e.g. DeepSpeed's op builders called directly) is judged by who
holds it open: a process on this host that has the lock open, or works in the build folder (ninja, the compiler),
is a live builder and is waited for (a compiler outlives a builder killed with its process group: ninja starts
each command in a group of its own). When none does, the lock is removed only when it is older than any build
(:data:`STALE_AFTER_S`, ``ADAMHD_BUILD_LOCK_STALE_S``) and every process on this host could be inspected; otherwise,
after a short wait (:data:`GRACE_S`), :class:`BuildLockError` names the lock, its age and the ``rm`` command. A
build running on another machine or in another container that shares the folder cannot be seen from here, which is
why a young lock is reported rather than removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["BuildLockError", "LockState", "building", "check", "extension_dir", "inspect", "load_deepspeed_ops",
           "deepspeed_op_builders", "GRACE_S", "STALE_AFTER_S", "STALE_ENV", "LOCK", "OWNER"]

LOCK = "lock"
"""torch's lock file in an extension's build folder."""
OWNER = "lock.owner"
"""Our builder's record beside it (kept; emptied when a build ends): flocked for the whole build."""
GRACE_S = 10.0
"""How long a lock nobody here holds is watched for its builder to finish (a cached load holds it milliseconds)
before it is reported."""
STALE_AFTER_S = 1800.0
"""Age beyond which a third-party lock that no process on this host holds is removed. The builds this project runs
take one to three minutes on a loaded CPU machine (our kernel, DeepSpeed's CPU ops); DeepSpeed's largest CUDA ops
take up to about a quarter of an hour."""
STALE_ENV = "ADAMHD_BUILD_LOCK_STALE_S"


class BuildLockError(RuntimeError):
    """A build lock that may have been left by a killed build and could not be proven so; the message says how to
    clear it."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stale_after() -> float:
    text = os.environ.get(STALE_ENV, "").strip()
    if not text:
        return STALE_AFTER_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{STALE_ENV}={text!r}: expected a positive number of seconds")
    return value


def extension_dir(name: str) -> str:
    """torch's build folder of the extension ``name`` (created when missing)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, verbose=False)


@dataclass
class LockState:
    """What :func:`inspect` found in a build folder."""

    path: str
    exists: bool
    age_s: float = 0.0
    mtime: float = 0.0
    holders: list[tuple[int, str]] = field(default_factory=list)
    """Processes on this host that have the lock open or work in the build folder: (pid, command line)."""
    complete: bool = True
    """Every process on this host could be inspected (False without /proc, or with processes of other users)."""

    @property
    def held(self) -> bool:
        return bool(self.holders)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return shlex.join(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return "?"


def _holders(lock: str, folder: str) -> tuple[list[tuple[int, str]], bool]:
    """Processes on this host with ``lock`` open or ``folder`` as working directory; and whether all were seen."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return [], False
    lock, folder = os.path.realpath(lock), os.path.realpath(folder)
    found, complete = [], True
    for pid in pids:
        try:
            if os.readlink(f"/proc/{pid}/cwd") == folder:
                found.append(pid)
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:  # exited meanwhile
            continue
        except OSError:  # another user's process
            complete = False
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == lock:
                    found.append(pid)
                    break
            except OSError:
                continue
    return [(pid, _cmdline(pid)) for pid in found], complete


def inspect(build_dir: str) -> LockState:
    """The lock of ``build_dir``: whether it exists, its age, and who on this host holds it."""
    path = os.path.join(build_dir, LOCK)
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return LockState(path, False)
    holders, complete = _holders(path, build_dir)
    return LockState(path, True, max(time.time() - mtime, 0.0), mtime, holders, complete)


def _read_record(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _write_record(fd: int) -> None:
    command = _cmdline(os.getpid())
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": command if command != "?" else shlex.join([sys.executable] + sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def _who(record: dict) -> str:
    ago = time.time() - float(record.get("started", time.time()))
    return (f"pid {record.get('pid')} on {record.get('host')}, started {ago:.0f} s ago: "
            f"{_short(str(record.get('command', '?')))}")


def _remove(path: str, ino: int | None) -> None:
    """Remove ``path`` if it is still the file that was judged (not a new lock taken meanwhile)."""
    try:
        if ino is None or os.stat(path).st_ino == ino:
            os.remove(path)
    except FileNotFoundError:
        pass


def _ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _short(command: str, limit: int = 160) -> str:
    return command if len(command) <= limit else command[:limit - 3] + "..."


def _clear_rm(path: str) -> str:
    return f"rm -f {shlex.quote(path)}"


def _settle(build_dir: str, previous: dict | None, say: Callable[[str], None], grace_s: float,
            poll_s: float) -> None:
    """With our owner ``flock`` held: return once no lock is in the way; wait for live builders; remove a lock left
    by a dead one; raise :class:`BuildLockError` for one that cannot be judged."""
    waited_for: set[int] = set()
    t0 = time.monotonic()
    here = socket.gethostname()
    while True:
        st = inspect(build_dir)
        if not st.exists:
            return
        ino = _ino(st.path)
        if st.held:  # a live builder on this host that does not use the owner record (or still finishing)
            new = [h for h in st.holders if h[0] not in waited_for]
            if new:
                say(f"adamhd_dist: waiting for a live build holding {st.path}: "
                    + "; ".join(f"pid {p}: {_short(c)}" for p, c in new))
                waited_for.update(p for p, _ in new)
            t0 = time.monotonic()  # the grace period starts once nobody holds it
            time.sleep(poll_s)
            continue
        if previous is not None and previous.get("host") == here and \
                st.mtime >= float(previous.get("started", 0.0)) - 2.0:
            # Made during the tenure of a builder whose flock the kernel has released: that builder is dead.
            say(f"adamhd_dist: removing the build lock {st.path} ({st.age_s:.0f} s old): its builder is no longer "
                f"running ({_who(previous)})")
            _remove(st.path, ino)
            previous = None
            continue
        if time.monotonic() - t0 < grace_s:
            time.sleep(poll_s)
            continue
        limit = _stale_after()
        if st.complete and st.age_s > limit:
            say(f"adamhd_dist: removing the build lock {st.path}: {st.age_s:.0f} s old (more than {limit:g} s, "
                f"longer than any build) and no process on this host holds it")
            _remove(st.path, ino)
            continue
        if st.complete:
            seen = "no process on this host has it open"
            auto = f"a lock like this older than {limit:g} s is removed automatically; {STALE_ENV} sets that age"
        else:
            seen = "no process that could be inspected on this host has it open"
            auto = "it is not removed automatically, as some processes on this host cannot be inspected"
        raise BuildLockError(
            f"the extension build lock {st.path} ({st.age_s:.0f} s old) has no live builder here: {seen}, so it "
            f"was most likely left by a build that was killed, and every build or load of this extension would wait "
            f"on it forever. Unless a build sharing this folder runs on another machine or in another container, "
            f"remove it: {_clear_rm(st.path)}   ({auto})")


@contextlib.contextmanager
def building(build_dir: str, *, say: Callable[[str], None] = _say, grace_s: float | None = None,
             poll_s: float = 0.2) -> Iterator[None]:
    """Hold ``build_dir``'s owner record for a build (or a load: torch takes its lock either way).

    Waits while another of our builders holds it (saying whose build it is), then clears the folder's lock as the
    module docstring says (:class:`BuildLockError` when it cannot be judged), records this process, and yields; the
    caller runs ``torch.utils.cpp_extension.load`` (or anything that calls it) inside. The record is emptied when
    the block ends, also on an exception. ``grace_s``: how long a lock nobody here holds is watched before it is
    judged (default :data:`GRACE_S`).
    """
    grace_s = GRACE_S if grace_s is None else grace_s
    try:
        import fcntl
    except ImportError:  # Windows: no flock, so no owner record; locks are judged as third-party ones
        _settle(build_dir, None, say, grace_s, poll_s)
        yield
        return
    os.makedirs(build_dir, exist_ok=True)
    owner = os.path.join(build_dir, OWNER)
    writable = True
    try:
        fd = os.open(owner, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's record in a shared folder: take its flock, leave its text
        fd, writable = os.open(owner, os.O_RDONLY), False
    recorded = False
    try:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # ranks of one run load the same ops at the same moment: say nothing about a short wait
                if time.monotonic() - t0 < 2.0:
                    time.sleep(0.05)
                    continue
                record = _read_record(fd)
                say(f"adamhd_dist: waiting for the build in {build_dir} by "
                    f"{_who(record) if record else 'another process'}")
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
        _settle(build_dir, _read_record(fd), say, grace_s, poll_s)
        if writable:
            _write_record(fd)
            recorded = True
        yield
    finally:
        try:
            if recorded:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock


def check(build_dir: str, **kwargs) -> None:
    """Wait for a live build in ``build_dir``, remove a lock a dead one left, or raise :class:`BuildLockError`
    (see :func:`building`); build nothing."""
    with building(build_dir, **kwargs):
        pass


# ---------------------------------------------------------------------------------------------------- DeepSpeed
_OFFLOAD = ("cpu", "nvme")


def deepspeed_op_builders(ds_config: dict) -> list:
    """The DeepSpeed op builders (instances, for the current accelerator) that ``deepspeed.initialize`` JIT-loads
    for ``ds_config``: the shared-memory collectives on a CPU accelerator, and the optimizer's op — for ``Adam`` and
    ``AdamW`` ``FusedAdamBuilder`` (``CPUAdamBuilder`` with ZeRO-Offload of the optimizer, none with
    ``torch_adam``), ``FusedLambBuilder`` for ``Lamb``, ``FusedLionBuilder`` / ``CPULionBuilder`` for ``Lion``,
    ``CPUAdagradBuilder`` for ``Adagrad`` offloaded. Other optimizers (``AdamHD`` included) need none. Builders
    this accelerator does not implement or that are incompatible are left out (DeepSpeed reports those itself)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    names = ["ShareMemCommBuilder"]
    opt = ds_config.get("optimizer") if isinstance(ds_config.get("optimizer"), dict) else {}
    kind = str(opt.get("type", "")).lower()
    params = opt.get("params") if isinstance(opt.get("params"), dict) else {}
    zero = ds_config.get("zero_optimization") if isinstance(ds_config.get("zero_optimization"), dict) else {}
    off = zero.get("offload_optimizer") if isinstance(zero.get("offload_optimizer"), dict) else {}
    offload = str(off.get("device", "none")).lower() in _OFFLOAD
    if kind in ("adam", "adamw") and not params.get("torch_adam", False):
        names.append("CPUAdamBuilder" if offload else "FusedAdamBuilder")
    elif kind == "lamb":
        names.append("FusedLambBuilder")
    elif kind == "lion":
        names.append("CPULionBuilder" if offload else "FusedLionBuilder")
    elif kind == "adagrad" and offload:
        names.append("CPUAdagradBuilder")
    out = []
    for name in names:
        try:
            builder = acc.create_op_builder(name)
        except Exception:  # noqa: BLE001 - an accelerator without this op: DeepSpeed says so when it needs it
            builder = None
        if builder is None or getattr(builder, "NAME", "") == "deepspeed_not_implemented":
            continue
        try:
            if not builder.is_compatible(verbose=False):
                continue
        except Exception:  # noqa: BLE001
            continue
        out.append(builder)
    return out


def load_deepspeed_ops(ds_config: dict, *, say: Callable[[str], None] = _say, grace_s: float | None = None) -> list:
    """Build (first time) and load the ops ``deepspeed.initialize`` needs for ``ds_config``, each under
    :func:`building`, so a build killed here leaves a lock the next one removes; DeepSpeed then finds them loaded.
    Returns the names loaded. :class:`BuildLockError` for a lock that cannot be judged; a build that fails
    otherwise is left for DeepSpeed to report when it needs the op."""
    loaded = []
    for builder in deepspeed_op_builders(ds_config):
        if builder.name in getattr(builder, "_loaded_ops", {}):  # loaded in this process already
            loaded.append(builder.name)
            continue
        folder = extension_dir(builder.name)
        with building(folder, say=say, grace_s=grace_s):
            try:
                builder.load(verbose=False)
            except Exception as exc:  # noqa: BLE001 - DeepSpeed raises it again, in context, when it needs the op
                say(f"adamhd_dist: DeepSpeed's {builder.name} op could not be built here: {type(exc).__name__}: "
                    f"{exc}")
                continue
        loaded.append(builder.name)
    return loaded
