"""An exclusive lock on a run's workdir: a second run on the same workdir is refused, in one line
naming the holder, before it writes anything (two runs would replace each other's checkpoints).

Local or NFS workdir: `flock` on `<workdir>/.dmt_lock` (Linux's NFS client maps it to a POSIX lock the
server holds), which the kernel releases when the process ends, crash or SIGKILL included: a restart
takes it at once. The file holds the holder (host, pid, start time) for the message and is left in place.

gs:// workdir: a lock object `<workdir>/.dmt_lock.json`, written only under a generation precondition
(GCS's compare-and-swap): it is created with `ifGenerationMatch=0`, so of two runs starting together
exactly one gets it, and the holder rewrites it every HEARTBEAT_S (10 s, from a thread) on the
condition that it is still the generation it wrote last. A run that finds it held:
- by a process of this host: refused at once if that process lives, taken at once if it is gone (the
  holder records its boot id and its process's start time, so a reused pid or a restarted container
  with the same pid is not mistaken for the holder);
- by another host: watches the object for STALE_S (30 s, three heartbeats) by its own clock. A
  generation that changes belongs to a live run, which is refused as soon as it is seen to change; one
  that stays still belongs to a dead run (SIGKILL, out of memory, a lost host), which is taken over,
  again under a generation precondition (of two restarts, one wins; the other sees its heartbeat).
Why heartbeats rather than a run id passed on by a requeue: a requeue (GKE JobSet, xpk, SLURM) then
needs no cooperation, a run started by hand gets the same protection, and a holder that is still
alive (a lost host that keeps running, a hand-started second run with the same job id) is never
taken over; the price is a wait of at most 30 s for a restart on another host after a crash. Why our
own clock: hosts' clocks differ; whether the generation moves does not depend on them. The heartbeat
is written by a thread rather than at each step: a first compile or an evaluation can outlast 30 s,
and a live run must not look dead then.

In a multi-process run every process takes part (runner.with_workdir_lock): process 0 takes the lock
and its outcome is broadcast, so a refusal ends every process with the same line before anything is
written.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

from dmt_jax import storage
from dmt_jax.errors import UserError

LOCK_FILE = ".dmt_lock"
LOCK_OBJECT = ".dmt_lock.json"
HEARTBEAT_S = 10.0
STALE_S = 3 * HEARTBEAT_S
POLL_S = 1.0


class WorkdirLocked(UserError):
    """Another run holds the workdir."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The start time of process `pid` (in clock ticks since boot, /proc/PID/stat), '' if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "heartbeat": time.time(),  # for people reading the object; the lock never compares clocks
        "boot_id": _boot_id(),
        "process_start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,  # this acquisition
    }


def holder_alive_here(holder: dict) -> bool | None:
    """True / False when `holder` ran on this host (the process is that one and lives, or not); None
    when it ran elsewhere or this host cannot tell (no /proc)."""
    if holder.get("host") != socket.gethostname() or not holder.get("boot_id") or not _boot_id():
        return None
    if holder["boot_id"] != _boot_id():
        return False  # this host rebooted since
    pid = holder.get("pid")
    return (
        isinstance(pid, int)
        and bool(holder.get("process_start"))
        and (_process_start(pid) == holder["process_start"])
    )


def _refusal(workdir, holder: dict, where, how: str = "") -> WorkdirLocked:
    who = (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    )
    # A lock object rewritten by something that is not a run (its content unreadable) yet kept current:
    # say how to remove it, for the case that no run of ours uses the workdir.
    unreadable = "://" in str(where) and "host" not in holder
    rm = f"; if no run uses it, remove the lock: gcloud storage rm {where}" if unreadable else ""
    return WorkdirLocked(
        f"workdir {workdir} is in use by another run ({who}{how}; lock {where}): wait for it to finish, "
        f"stop it, or choose another --workdir{rm}"
    )


class WorkdirLock:
    """`with WorkdirLock(workdir):` or acquire() / release(); WorkdirLocked when another run holds it."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = storage.resolve(workdir, "--workdir")  # the form every writer uses
        self.remote = "://" in self.workdir
        self.holder = _holder()
        self.lost = False  # a gs:// lock found taken over by another run (its heartbeats failed for 30 s)
        self._fd: int | None = None
        self._object: _GcsObject | None = None
        self._generation = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> WorkdirLock:
        if not self.remote:
            os.makedirs(self.workdir, exist_ok=True)
            self._acquire_file()
        elif self.workdir.startswith("gs://"):
            self._acquire_object()
        else:
            raise UserError(f"--workdir={self.workdir}: use a local or NFS path, or a gs:// bucket")
        return self

    def release(self):
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._object is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=30)
            if not self.lost:
                self._object.delete(self._generation)
            self._object = None

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
            raise _refusal(self.workdir, holder if isinstance(holder, dict) else {}, path) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self._fd = fd

    # ---------------------------------------------------------------- gs://: generation preconditions

    def _acquire_object(self):
        where = f"{self.workdir.rstrip('/')}/{LOCK_OBJECT}"
        lock, body = _GcsObject(where), json.dumps(self.holder).encode()
        watched = None  # (generation, holder, monotonic time first seen)
        while True:
            try:
                self._generation = lock.write(body, if_generation="0")  # only if there is none
                break
            except FileExistsError:
                pass
            found = lock.read()
            if found is None:
                continue  # released meanwhile
            generation, holder = found
            if holder.get("token") == self.holder["token"]:  # our own create, answered after a retry
                self._generation = generation
                break
            alive = holder_alive_here(holder)
            if alive:
                raise _refusal(self.workdir, holder, where)
            if watched and generation != watched[0]:
                raise _refusal(self.workdir, holder, where, ", whose heartbeat is current")
            if watched is None:
                watched = (generation, holder, time.monotonic())
                if alive is None:
                    _say(
                        f"workdir lock {where} is held by host {holder.get('host', '?')}, pid "
                        f"{holder.get('pid', '?')}: watching its heartbeat for up to {STALE_S:.0f} s"
                    )
            if alive is False or time.monotonic() - watched[2] >= STALE_S:
                try:  # the holder is dead: take it over, unless another run did first
                    self._generation = lock.write(body, if_generation=generation)
                    what = "has ended" if alive is False else f"showed no heartbeat for {STALE_S:.0f} s"
                    _say(f"took over the workdir lock of host {holder.get('host', '?')}, pid "
                         f"{holder.get('pid', '?')}, which {what}")  # fmt: skip
                    break
                except FileExistsError:
                    watched = None  # someone else wrote it: watch the new holder
                    continue
            time.sleep(POLL_S)
        self._object = lock
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="dmt-workdir-lock")
        self._thread.start()

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            self.holder["heartbeat"] = time.time()
            try:
                body = json.dumps(self.holder).encode()
                self._generation = self._object.write(body, if_generation=self._generation)
            except FileExistsError:
                self.lost = True
                _say(
                    f"warning: the workdir lock of {self.workdir} was taken over by another run (this run's "
                    f"heartbeats failed for {STALE_S:.0f} s); stop one of the two runs"
                )
                return
            except Exception:  # noqa: BLE001 - a failed heartbeat is retried at the next one
                continue


def _say(msg: str):
    print(msg, flush=True)


class _GcsObject:
    """One GCS object read and written under generation preconditions (the JSON API, through gcsfs, which
    honours STORAGE_EMULATOR_HOST and the machine's credentials). A failed precondition: FileExistsError."""

    def __init__(self, url: str):
        import fsspec

        self.fs = fsspec.filesystem("gs")
        self.bucket, self.key = url.removeprefix("gs://").split("/", 1)

    def read(self) -> tuple[str, dict] | None:
        """(generation, holder) or None when absent; content that is not a holder reads as {}."""
        try:
            meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            _, body = self.fs.call(
                "GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=meta["generation"]
            )
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(body)
        except ValueError:
            holder = {}
        return str(meta["generation"]), holder if isinstance(holder, dict) else {}

    def write(self, body: bytes, if_generation: str) -> str:
        """Writes the object if its generation is `if_generation` ('0': if it does not exist); the new one."""
        out = self.fs.call(
            "POST",
            f"{self.fs._location}/upload/storage/v1/b/{{}}/o",
            self.bucket,
            uploadType="media",
            name=self.key,
            ifGenerationMatch=if_generation,
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            json_out=True,
        )
        return str(out["generation"])

    def delete(self, if_generation: str):
        with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=if_generation)
