"""Orbax checkpoints of the whole run: train state (step, params, optimizer, rng) + input position.

Every process calls save and restore (each writes and reads its own shards). On a disk saves are
atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it, so a save that fails (a full disk)
or is killed leaves the previous checkpoints intact; the partial directory is removed. In a bucket
(no rename) orbax writes `<step>/` in place and writes COMMIT_FILE last: a step without it is not
listed, never restored, and removed by orbax at the next start. Restore takes
an abstract state carrying the current mesh's shardings, so a checkpoint restores onto any mesh or
process count. A checkpoint that cannot be read is reported, moved aside to
`<directory>_unreadable/` and the previous one is used; if none can be read the run stops rather
than start again from scratch.

Asynchronous saves (async_checkpoints) write in the background while training goes on, one at a time;
the last save of a run, and a preemption's, are waited for, so the run exits only once it is on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import re
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dmt_jax import storage
from dmt_jax.errors import UserError

TMP_MARKER = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"  # what orbax writes last into a step saved in a bucket


class CheckpointError(UserError, ValueError):
    """No checkpoint in a non-empty directory can be restored; the message is one line."""


def for_run(workdir: str, config) -> Checkpointer:
    """The checkpoints of a run: workdir/checkpoints, keep_checkpoints of them, async_checkpoints."""
    directory = storage.path(workdir) / "checkpoints"
    return Checkpointer(str(directory), config.keep_checkpoints, asynchronous=config.async_checkpoints)


class Checkpointer:
    """Saves and restores the run's checkpoints. Asynchronous (the async_checkpoints field): save() returns
    once the arrays are copied to host memory (so the next step may donate them) and orbax writes them in
    background threads while training goes on. At most one save is in flight: its outcome is settled
    (waited for, agreed on by every process, a failure reported and its partial directory removed) by the
    next save, finish() or close()."""

    def __init__(self, directory: str, keep: int = 3, asynchronous: bool = False):
        self.directory = storage.path(directory)  # local (made absolute) or gs://...
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=asynchronous,
        )
        self.asynchronous = asynchronous
        self.in_flight: int | None = None  # the step of the save being written in the background
        self.last_error: BaseException | None = None  # of the newest failed save on this process
        self.failed: set[int] = set()  # steps whose save failed: what they left is removed
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        if asynchronous:  # background writers log each failure with a traceback; _settle says it in one line
            py_logging.getLogger("absl").addFilter(_DROP_ORBAX_RECORDS)

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, and of the one in flight."""
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state, input_state: dict[str, int], record: dict | None = None, wait: bool = True
    ) -> bool:
        """Every process calls this, at the same steps. Returns False (and says why, in one line) when the
        save failed. With wait=False an asynchronous save returns True once it has started; the next save,
        finish() or close() tells how it ended. `record`: what the run was trained with (run_record.py),
        kept in the data item."""
        self.finish()  # at most one save in flight: a failed one is reported before the next starts
        if not self._remove_partial():  # nothing (more) left by earlier failed saves: forget them
            self.failed.clear()
        self.failed.discard(step)  # saved again (a stop at the step whose save failed)
        # Each process has its own input position; all of them go into the one JSON item.
        local = np.asarray([input_state["next_index"], input_state["bad_images"]], np.int64)
        gathered = local[None] if jax.process_count() == 1 else multihost_utils.process_allgather(local)
        gathered = np.asarray(gathered).reshape(-1, 2)
        data = {
            "process_count": jax.process_count(),
            "global_batch": int(input_state["global_batch"]),
            "next_index": [int(x) for x in gathered[:, 0]],
            "bad_images": [int(x) for x in gathered[:, 1]],
        }
        if record is not None:
            data["record"] = record
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        error = self._attempt(lambda: self.manager.save(step, args=args, force=True))
        if wait and not error:
            error = self._attempt(self.manager.wait_until_finished)
        if self.asynchronous and not wait and _everywhere(not error):  # started on every process
            self.in_flight = step
            return True
        return self._settle(step, error)

    def finish(self) -> bool:
        """Every process calls this. Waits for the save in flight, if any; False if it failed (said in
        one line, its partial directory removed)."""
        if self.in_flight is None:
            return True
        step, self.in_flight = self.in_flight, None
        return self._settle(step, self._attempt(self.manager.wait_until_finished))

    def restore_latest(self, abstract_state, check=None):
        """(state, data) from the newest readable checkpoint, or None if the directory holds none.

        `check(step, data)` is called with a checkpoint's data item (its input position and run record)
        before its arrays are read, and may refuse it (raise): a resume of another run stops there, in its
        own words, not in a failed restore of arrays of other shapes.

        Only a damaged checkpoint (missing or truncated files, unreadable metadata) is set aside for
        an older one; any other failure (a storage outage, out of memory, a changed model) raises
        RestoreFailed on every process and moves nothing.
        """
        unreadable = []
        for step in reversed(self.steps()):
            data, error, status = self._try_restore(step, data=ocp.args.JsonRestore())
            worst = _worst_everywhere(status)
            if worst == _OK:
                if check is not None:
                    check(step, data["data"])
                restored, error, status = self._try_restore(
                    step, state=ocp.args.StandardRestore(abstract_state)
                )
                worst = _worst_everywhere(status)
            if worst == _OK:
                self._set_aside(unreadable)
                return restored["state"], data["data"]
            if worst == _FAILED:
                raise RestoreFailed(
                    f"could not restore the checkpoint at step {step} in {self.directory} "
                    f"({_one_line(error) if error else 'failed on another process'}); nothing was moved. "
                    "If the model or optimizer config changed since it was written, use a new --workdir"
                ) from error
            unreadable.append(step)
            why = _one_line(error) if error else "damaged on another process"
            _say(f"checkpoint at step {step} in {self.directory} is unreadable ({why}); trying an older one")
        if unreadable:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (steps {sorted(unreadable)}): "
                "all are damaged"
            )
        return None

    def close(self):
        """Waits for a save still in flight: here only when an exception ends the run, so on this process
        alone (no collective); a failure is said in one line."""
        if self.in_flight is not None:
            step, self.in_flight = self.in_flight, None
            error = self._attempt(self.manager.wait_until_finished)
            if error:
                self._drain()
                self.failed.add(step)
                print(f"checkpoint at step {step} NOT saved ({error})", flush=True)
        self.manager.close()
        self._remove_partial()
        py_logging.getLogger("absl").removeFilter(_DROP_ORBAX_RECORDS)

    def abort(self):
        """Ends without waiting for a save in flight (a second Ctrl-C): what it wrote so far is removed
        (process 0; the process then ends at once): the `<step>.orbax-checkpoint-tmp*` folders on a disk;
        in a bucket, where orbax writes `<step>/` in place and marks it finished last, the steps without
        their COMMIT_FILE."""
        self.in_flight = None
        if jax.process_index() != 0 or not self.directory.exists():
            return
        remote = storage.is_remote(self.directory)
        for _ in range(10):  # writes already under way (tensorstore's) may land after a removal: again
            found = [
                child
                for child in self.directory.iterdir()
                if TMP_MARKER in child.name
                or (remote and child.name.isdigit() and not (child / COMMIT_FILE).exists())
            ]
            for child in found:
                with contextlib.suppress(OSError):
                    child.rmtree()
            if not found:
                break
            time.sleep(0.1)
        py_logging.getLogger("absl").removeFilter(_DROP_ORBAX_RECORDS)

    def _attempt(self, action) -> str:
        """'' if action() succeeded, else its error in one line (kept in last_error: what to do about it
        depends on the cause, errors.remedy)."""
        try:
            with _quiet_orbax():  # orbax logs each failed write with a traceback; one line says it all
                action()
            return ""
        except (OSError, ValueError, RuntimeError) as e:
            self.last_error = _own_failure(e)
            return _one_line(self.last_error)

    def _settle(self, step: int, error: str) -> bool:
        """Agrees with every process on whether the save at `step` was written (a save counts only if every
        process's part of it was); if not, removes what it left and says so in one line."""
        if _everywhere(not error):
            return True
        self._drain()
        self._discard_partial(step)
        kept = f"step {self.steps()[-1]}" if self.steps() else "none yet"
        reason = error or "failed on another process"
        print(f"checkpoint at step {step} NOT saved ({reason}); newest intact checkpoint: {kept}", flush=True)
        return False

    def _drain(self):
        """Waits for every background writer of a failed save and drops the errors they kept. orbax stops
        waiting at the first failed write and keeps errors for its next save: left alone, the other writers
        would go on writing into the directory being removed, and their errors fail the next save."""
        # orbax's AsyncCheckpointer and the writers of its newest save: private, hence getattr (a newer
        # orbax without them is waited for through its public wait_until_finished only).
        inner = getattr(self.manager, "_checkpointer", None)
        writers = getattr(getattr(inner, "_async_manager", None), "_commit_futures", None) or []
        waits = [self.manager.wait_until_finished, *(w.result for w in writers)]
        waits.append(getattr(inner, "wait_until_finished", None))  # joins its thread, takes its error
        for wait in waits:
            if wait is not None:
                with contextlib.suppress(Exception), _quiet_orbax():
                    wait()

    def _try_restore(self, step: int, **items):
        """(restored items or None, the exception or None, _OK / _DAMAGED / _FAILED) on this process."""
        try:
            with _quiet_orbax():
                return self.manager.restore(step, args=ocp.args.Composite(**items)), None, _OK
        except Exception as e:  # noqa: BLE001 - sorted below: damage, or anything else (re-raised)
            return None, e, (_DAMAGED if is_damage(e) else _FAILED)

    def _set_aside(self, steps: list[int]):
        """Moves unreadable checkpoints out of orbax's directory, so their steps can be saved again."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + "_unreadable")
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                storage.move_tree(self.directory / str(step), target)
                _say(f"moved the unreadable checkpoint at step {step} to {target}")
        _sync("dmt_set_aside_unreadable")
        self.manager.reload()

    def _discard_partial(self, step: int):
        """Frees the space a failed save took (orbax would remove it only at the next start)."""
        self.failed.add(step)
        for _ in range(3):  # a failed asynchronous save's last writes (tensorstore's) may still land
            if not self._remove_partial():
                break
            time.sleep(0.1)
        with contextlib.suppress(Exception):  # the manager may still list the failed step
            self.manager.reload()

    def _remove_partial(self) -> bool:
        """Removes what failed saves left (process 0); True if there was something. Also run at each later
        save and at close: orbax cannot wait for every write of a failed save."""
        if jax.process_index() != 0 or not self.failed:
            return False
        partial = tuple(f"{step}{TMP_MARKER}" for step in self.failed)
        found = [child for child in self.directory.iterdir() if child.name.startswith(partial)]
        for child in found:
            with contextlib.suppress(OSError):
                child.rmtree()
        return bool(found)


class _DropOrbaxRecords(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return "orbax" not in record.pathname


_DROP_ORBAX_RECORDS = _DropOrbaxRecords()


def committed_steps(directory: str) -> list[int]:
    """The steps of the finished checkpoints in another run's directory, as orbax tells them (a save still
    being written or finalized, and a step being deleted by its rotation, are not among them)."""
    with _quiet_orbax():
        options = ocp.CheckpointManagerOptions(read_only=True)
        manager = ocp.CheckpointManager(storage.path(directory), options=options)
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()


def _drop_failed_save_echoes():
    """A failed save is said in one line; its echoes are dropped. orbax writes each save under one asyncio
    loop and closes it at the first failed write, while tensorstore's other writes are still in flight:
    each of them, done later, reports RuntimeError('Event loop is closed') through sys.unraisablehook
    (hundreds of tracebacks), and asyncio logs every failed write's task ('Task exception was never
    retrieved') when it is collected."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop = True
    sys.unraisablehook = hook
    py_logging.getLogger("asyncio").addFilter(_UnretrievedOrbaxTask())


class _UnretrievedOrbaxTask(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "orbax" in message)


_drop_failed_save_echoes()


def read_state(directory: str, step: int) -> dict:
    """The train state of the checkpoint at `step` as numpy arrays (no mesh, no abstract state needed):
    for reading another run's weights, e.g. the student a fine-tuning starts from."""
    path = storage.path(directory) / str(step) / "state"
    with _quiet_orbax():
        reader = ocp.PyTreeCheckpointer()
        metadata = reader.metadata(path)
        if metadata is None or getattr(metadata, "item_metadata", None) is None:
            raise FileNotFoundError(f"{path}: its metadata is missing or unreadable")
        tree = metadata.item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


class RestoreFailed(RuntimeError):
    """A checkpoint could not be read for a reason other than damage: the run stops, nothing is moved."""


_OK, _DAMAGED, _FAILED = 0, 1, 2
# tensorstore's status codes for bytes that are missing, cut short or garbled (it raises them as
# ValueError "CODE: ..."); UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...
# are not damage.
_DAMAGE_CODES = ("NOT_FOUND:", "DATA_LOSS:", "OUT_OF_RANGE:")


def is_damage(e: BaseException) -> bool:
    """True when the error says the checkpoint's files are missing, truncated or unreadable."""
    for err in (e, e.__cause__, e.__context__):
        if err is None:
            continue
        if isinstance(err, FileNotFoundError | json.JSONDecodeError | EOFError):
            return True
        if isinstance(err, KeyError) and "was not found in the checkpoint" in str(err):
            return True  # an item's directory is missing
        if isinstance(err, ValueError) and str(err).startswith(_DAMAGE_CODES):
            return True
    return False


def _worst_everywhere(status: int) -> int:
    if jax.process_count() == 1:
        return status
    return int(np.asarray(multihost_utils.process_allgather(np.asarray([status], np.int32))).max())


def saved_input_state(data: dict | None) -> dict | None:
    """This process's input state from a checkpoint's data item, or None if the process layout changed.

    None makes the pipeline start at the position implied by the step (elastic restore onto another
    slice; exact when no image was skipped as unreadable).
    """
    if not data or data.get("process_count") != jax.process_count():
        return None
    i = jax.process_index()
    return {
        "next_index": data["next_index"][i],
        "bad_images": data["bad_images"][i],
        "process_count": data["process_count"],
        "global_batch": data["global_batch"],
    }


def _everywhere(ok: bool) -> bool:
    """True when every process says ok: processes must agree on which checkpoint they restore."""
    if jax.process_count() == 1:
        return ok
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([ok], np.int32))).all())


def _sync(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _say(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


def _own_failure(e: BaseException) -> BaseException:
    """The error a barrier timeout hides: orbax meets the other processes at a barrier after its own
    write failed, they are not there (they wait for this one elsewhere), and the timeout replaces it."""
    while e.__context__ is not None and (isinstance(e, TimeoutError) or "DEADLINE_EXCEEDED" in str(e)):
        e = e.__context__
    return e


# tensorstore appends the whole JSON spec of the store (kilobytes) and C++ source locations to its errors.
_TENSORSTORE_TAIL = re.compile(r"\s*\[(tensorstore_spec|source locations)=.*$")


def _one_line(e: BaseException) -> str:
    """The error's first line, whole (paths are never cut), without tensorstore's spec dump."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {_TENSORSTORE_TAIL.sub('', text[0]) if text else ''}"


@contextlib.contextmanager
def _quiet_orbax():
    logger = py_logging.getLogger("absl")
    level = logger.level
    logger.setLevel(py_logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
