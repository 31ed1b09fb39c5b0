"""The workdir lock (dmt_jax/workdir_lock.py, runner.with_workdir_lock) on a local path and in an emulated
bucket (tests/gcs_emulator.py, which honours GCS's generation preconditions): atomic, agreed by every
process of a run (two processes, tests/lock_child.py), free again at once after a crash, never taken
from a live run."""

import json
import signal
import threading
import time

import pytest
from gcs_emulator import child_env, emulated_bucket
from helpers_run import Run, free_port

from dmt_jax import storage, workdir_lock
from dmt_jax.workdir_lock import WorkdirLock, WorkdirLocked


@pytest.fixture(scope="module")
def bucket():
    with emulated_bucket() as root:
        yield root


def _plant(url: str, holder, generation: str = "0") -> str:
    """Writes a lock object as another run would; returns its generation."""
    body = holder if isinstance(holder, bytes) else json.dumps(holder).encode()
    return workdir_lock._GcsObject(url).write(body, if_generation=generation)


@pytest.fixture
def fast_heartbeats(monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.3)
    monkeypatch.setattr(workdir_lock, "STALE_S", 1.5)
    monkeypatch.setattr(workdir_lock, "POLL_S", 0.1)


def test_bucket_lock_is_created_once_whoever_races(bucket):
    workdir, results = f"{bucket}/race", []

    def take():
        try:
            results.append(WorkdirLock(workdir).acquire())
        except WorkdirLocked as e:
            results.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [r for r in results if isinstance(r, WorkdirLock)]
    assert len(held) == 1, results
    refused = [r for r in results if r is not held[0]]
    assert all(f"is in use by another run (host {held[0].holder['host']}" in r for r in refused)
    held[0].release()
    assert not storage.path(f"{workdir}/{workdir_lock.LOCK_OBJECT}").exists()
    WorkdirLock(workdir).acquire().release()  # free again


def test_bucket_lock_of_another_host_is_watched_then_refused_or_taken(bucket, fast_heartbeats, capsys):
    url = f"{bucket}/watched/{workdir_lock.LOCK_OBJECT}"
    other = dict(workdir_lock._holder(), host="another-host", pid=4242)
    # A live holder elsewhere: its heartbeat moves the generation; refused once it is seen to move.
    generation = _plant(url, other)
    stop = threading.Event()

    def heartbeat(generation=generation):
        while not stop.wait(0.3):
            generation = _plant(url, dict(other, heartbeat=time.time()), generation)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(WorkdirLocked, match="host another-host, pid 4242, .*whose heartbeat is current"):
            WorkdirLock(f"{bucket}/watched").acquire()
    finally:
        stop.set()
        beating.join()
    # Its heartbeat stopped (SIGKILL, a lost host): taken over after STALE_S of stillness.
    start = time.monotonic()
    lock = WorkdirLock(f"{bucket}/watched").acquire()
    assert workdir_lock.STALE_S <= time.monotonic() - start < workdir_lock.STALE_S + 5
    assert "took over the workdir lock of host another-host, pid 4242" in capsys.readouterr().out
    lock.release()
    # Unreadable content (a torn or foreign object) is watched the same way, never trusted or fatal.
    _plant(url, b"\x00 not a holder")
    WorkdirLock(f"{bucket}/watched").acquire().release()
    # Unreadable content that something keeps rewriting: refused, with how to remove it.
    generation, stop = _plant(url, b"\x00 not a holder"), threading.Event()

    def rewriting(generation=generation):
        while not stop.wait(0.3):
            generation = _plant(url, b"\x00 not a holder", generation)

    beating = threading.Thread(target=rewriting)
    beating.start()
    try:
        with pytest.raises(WorkdirLocked, match=f"remove the lock: gcloud storage rm {url}$"):
            WorkdirLock(f"{bucket}/watched").acquire()
    finally:
        stop.set()
        beating.join()


def test_a_holder_that_lost_its_lock_says_so(bucket, fast_heartbeats, capsys):
    lock = WorkdirLock(f"{bucket}/lost").acquire()
    url = f"{bucket}/lost/{workdir_lock.LOCK_OBJECT}"
    generation, _ = workdir_lock._GcsObject(url).read()
    _plant(url, dict(workdir_lock._holder(), host="another-host"), generation)  # taken over meanwhile
    deadline = time.monotonic() + 10
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lock.lost and "was taken over by another run" in capsys.readouterr().out
    lock.release()  # leaves the other run's lock alone
    assert workdir_lock._GcsObject(url).read()[1]["host"] == "another-host"


def _pair(workdir, hold_s: float, env=None) -> list[Run]:
    port = free_port()
    return [Run([port, i, workdir, hold_s], devices=1, module="tests.lock_child", env=env) for i in range(2)]


def _ran(workdir) -> set[str]:
    return {p.name for p in storage.path(workdir).iterdir() if p.name.startswith("ran.")}


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_two_process_runs_agree_refuse_a_second_run_and_restart_at_once(where, tmp_path, request):
    workdir = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('bucket')}/pair"
    env = child_env() if where == "bucket" else None
    holders = _pair(workdir, 300, env)
    for run in holders:
        run.wait_for("^locked in ", timeout=240)
    assert _ran(workdir) == {f"ran.{r.proc.pid}" for r in holders}

    # A second two-process run while the first lives: every process refused with the same line.
    second = _pair(workdir, 0, env)
    assert [r.finish(timeout=240) for r in second] == [2, 2], [r.output for r in second]
    refusals = [[line for line in r.lines if line.startswith("error:")] for r in second]
    assert refusals[0] == refusals[1] and len(refusals[0]) == 1, [r.output for r in second]
    assert f"workdir {workdir} is in use by another run (host" in refusals[0][0]
    assert f"pid {holders[0].proc.pid}" in refusals[0][0]
    assert _ran(workdir) == {f"ran.{r.proc.pid}" for r in holders}  # the refused processes wrote nothing

    # The first run crashes (SIGKILL on both processes): the same command restarts at once.
    for run in holders:
        run.send(signal.SIGKILL)
        run.finish()
    restart = _pair(workdir, 0, env)
    assert [r.finish(timeout=240) for r in restart] == [0, 0], [r.output for r in restart]
    for run in restart:  # at once: no wait for a stale heartbeat
        (line,) = [line for line in run.lines if line.startswith("locked in ")]
        assert float(line.split()[2]) < 10, run.output
    if where == "bucket":
        assert "took over the workdir lock of host" in restart[0].output
        assert "which has ended" in restart[0].output
