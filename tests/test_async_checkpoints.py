"""Asynchronous checkpoints (async_checkpoints): training goes on while a save is written, and a save
that fails in the background is reported at the next one, its partial directory removed, as a failed
synchronous save is. The writes are held (or failed) by a patched `open`: orbax's background threads
write each checkpoint's metadata through it, after the array data."""

import builtins
import errno
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_run import Run, checkpoint_steps, fill_disk_under, free_port, tiny_config

from dmt_jax import checkpoint, loop, runner

POSITION = {"next_index": 0, "bad_images": 0, "global_batch": 8}


class HeldWrites:
    """Files opened for writing inside the temporary directory of `step`'s save, by a background thread,
    wait until release() (at most `patience` seconds: a save that blocks the main thread would never
    let the test release them)."""

    def __init__(self, monkeypatch, checkpoints: Path, step: int, patience: float = 30.0):
        self.prefix, self.patience = f"{checkpoints}/{step}{checkpoint.TMP_MARKER}", patience
        self.released, self.held, self.timed_out = threading.Event(), 0, False
        real_open = builtins.open

        def held_open(file, mode="r", *args, **kwargs):
            writing = isinstance(file, str | os.PathLike) and set(mode) & set("wax+")
            if (
                writing
                and str(file).startswith(self.prefix)
                and threading.current_thread() is not (threading.main_thread())
            ):
                self.held += 1
                self.timed_out |= not self.released.wait(self.patience)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", held_open)


def fail_writes(monkeypatch, checkpoints: Path, steps):
    """Every file opened for writing inside the temporary directory of these steps' saves: ENOSPC."""
    fill_disk_under(monkeypatch, tuple(f"{checkpoints}/{step}{checkpoint.TMP_MARKER}" for step in steps))


def test_save_returns_while_the_checkpoint_is_written(tmp_path, monkeypatch):
    writes = HeldWrites(monkeypatch, tmp_path / "checkpoints", step=1)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), asynchronous=True)
    state = {"w": jnp.arange(64.0)}
    assert ckpt.save(1, state, POSITION, wait=False)
    # Returned with its writers held: nothing is on disk yet; the next step may take (donate) the arrays.
    assert ckpt.in_flight == 1 and checkpoint_steps(tmp_path) == []
    state["w"].delete()
    assert writes.held >= 1
    writes.released.set()
    assert ckpt.finish() and not writes.timed_out
    assert checkpoint_steps(tmp_path) == [1] and ckpt.in_flight is None
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored, _ = ckpt.restore_latest({"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=one_device)})
    assert np.array_equal(restored["w"], np.arange(64.0))
    ckpt.close()


# tensorstore calls back into an asyncio loop that orbax has closed after the failed write: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_a_failed_save_is_reported_removed_and_the_next_works(tmp_path, monkeypatch, capsys, asynchronous):
    directory = tmp_path / "checkpoints"
    fail_writes(monkeypatch, directory, steps=(2, 4))
    ckpt = checkpoint.Checkpointer(str(directory), keep=10, asynchronous=asynchronous)
    state = {"w": jnp.arange(64.0)}
    for step in (1, 2, 3):
        ckpt.save(step, state, POSITION, wait=False)
    assert not ckpt.save(4, state, POSITION, wait=True)  # the last save of a run: waited for, it fails
    assert ckpt.save(5, state, POSITION, wait=True)  # no later error from the failed ones
    ckpt.close()
    out = capsys.readouterr().out.splitlines()
    failed = [line for line in out if "NOT saved" in line]
    assert len(failed) == 2, out
    assert failed[0].startswith("checkpoint at step 2 NOT saved (OSError: [Errno 28] No space left on device")
    assert failed[0].endswith("newest intact checkpoint: step 1")
    assert failed[1].startswith("checkpoint at step 4 NOT saved (OSError: [Errno 28]")
    assert failed[1].endswith("newest intact checkpoint: step 3")
    assert isinstance(ckpt.last_error, OSError) and ckpt.last_error.errno == errno.ENOSPC
    assert checkpoint_steps(tmp_path) == [1, 3, 5]
    assert sorted(p.name for p in directory.iterdir()) == ["1", "3", "5"]  # no partial directory left


def test_the_loop_trains_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    """Checkpoint 4's writes are held until the loop has logged step 6: a save that stalled training
    would hold them until the patience runs out."""
    config = tiny_config(tmp_path / "demo", total_steps=8)
    workdir = tmp_path / "work"
    writes = HeldWrites(monkeypatch, workdir / "checkpoints", step=4)
    log = runner.Books.log

    def log_and_release(books, done, host):
        log(books, done, host)
        if done >= 6:
            writes.released.set()

    monkeypatch.setattr(runner.Books, "log", log_and_release)
    loop.train_and_evaluate(config, str(workdir))
    assert writes.held >= 1 and not writes.timed_out
    assert checkpoint_steps(workdir) == [4, 8]


def test_processes_agree_when_a_background_save_fails_on_one(tmp_path):
    """Two processes (tests/async_saves_child.py); checkpoint 2's writes fail on process 1 only. Both say
    it was not saved, remove it, and go on to save checkpoint 3."""
    directory, port = tmp_path / "checkpoints", free_port()
    runs = [Run([port, i, 1, directory], devices=1, module="tests.async_saves_child") for i in range(2)]
    assert [run.finish() for run in runs] == [0, 0], [run.output for run in runs]
    for run in runs:
        failed = [line for line in run.lines if line.startswith("checkpoint at step 2 NOT saved")]
        assert len(failed) == 1 and failed[0].endswith("newest intact checkpoint: step 1"), run.output
        assert "save 2: True" in run.lines and "save 3: True" in run.lines, run.output  # 2 started; 3 saved
    assert "No space left on device" in failed[0]  # process 1 names its own failure, not a barrier timeout
    assert sorted(p.name for p in directory.iterdir()) == ["1", "3"]
