"""An exclusive lock on a run's workdir: a second run on the same workdir is refused, in one line
naming the holder, before it writes anything (two runs would replace each other's checkpoints).

Local or NFS workdir: `flock` on `<workdir>/.dmt_lock` (Linux's NFS client maps it to a POSIX lock the
server holds), which the kernel releases when the process ends, crash or SIGKILL included. The file
holds the holder (host, pid, start time) for the message and is left in place.

gs:// (or any path without flock): a lock object `<workdir>/.dmt_lock.json` with the holder and a
heartbeat refreshed every HEARTBEAT_S by a daemon thread. A lock whose heartbeat is older than
STALE_S belongs to a dead run and is taken over. Object stores offer no create-if-absent through
etils.epath, so two runs starting within the same second could both take it: the lock re-reads the
object after writing it and yields to whichever holder the store kept.

In a multi-process run process 0 holds the lock; the others share it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time

from etils import epath

from dmt_jax import storage
from dmt_jax.errors import UserError

LOCK_FILE = ".dmt_lock"
LOCK_OBJECT = ".dmt_lock.json"
HEARTBEAT_S = 60.0
STALE_S = 300.0


class WorkdirLocked(UserError):
    """Another run holds the workdir."""


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "heartbeat": time.time(),
    }


def _refusal(workdir, holder: dict, where) -> WorkdirLocked:
    who = (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    )
    return WorkdirLocked(
        f"workdir {workdir} is in use by another run ({who}; lock {where}): wait for it to finish, stop it, "
        "or choose another --workdir"
    )


def _is_local(workdir: str) -> bool:
    return "://" not in str(workdir)


class WorkdirLock:
    """`with WorkdirLock(workdir):` or acquire() / release(); WorkdirLocked when another run holds it."""

    def __init__(self, workdir: str | os.PathLike, use_object: bool | None = None):
        self.workdir = storage.resolve(workdir, "--workdir")  # the form every writer uses
        self.use_object = not _is_local(self.workdir) if use_object is None else use_object
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder = _holder()

    def acquire(self) -> WorkdirLock:
        epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if self.use_object:
            self._acquire_object()
        else:
            self._acquire_file()
        return self

    def release(self):
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(OSError):
                if self._read_object() == self.holder:
                    (epath.Path(self.workdir) / LOCK_OBJECT).unlink()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # ---------------------------------------------------------------- local / NFS: flock

    def _acquire_file(self):
        import fcntl

        path = os.path.join(self.workdir, LOCK_FILE)
        fd = storage.open_local(path, os.O_RDWR | os.O_CREAT, 0o644)  # never a planted link or FIFO
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise _refusal(self.workdir, holder, path) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd

    # ---------------------------------------------------------------- object stores: lock object

    def _read_object(self) -> dict | None:
        path = epath.Path(self.workdir) / LOCK_OBJECT
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _write_object(self):
        (epath.Path(self.workdir) / LOCK_OBJECT).write_text(json.dumps(self.holder))

    def _acquire_object(self):
        found = self._read_object()
        if found and time.time() - float(found.get("heartbeat", 0)) < STALE_S:
            raise _refusal(self.workdir, found, epath.Path(self.workdir) / LOCK_OBJECT)
        self._write_object()
        time.sleep(1.0)  # another run that wrote at the same moment: the store keeps one of the two
        found = self._read_object()
        if found != self.holder:
            raise _refusal(self.workdir, found or {}, epath.Path(self.workdir) / LOCK_OBJECT)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="dmt-workdir-lock")
        self._thread.start()

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            self.holder["heartbeat"] = time.time()
            with contextlib.suppress(OSError):
                self._write_object()
