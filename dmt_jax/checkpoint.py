"""Orbax checkpoints of the whole run: train state (step, params, optimizer, rng) + input position.

Every process calls save and restore (each writes and reads its own shards). Saves are atomic:
orbax writes `<step>.orbax-checkpoint-tmp*` and renames it, so a save that fails (a full disk) or
is killed leaves the previous checkpoints intact; the partial directory is removed. Restore takes
an abstract state carrying the current mesh's shardings, so a checkpoint restores onto any mesh or
process count. A checkpoint that cannot be read is reported, moved aside to
`<directory>_unreadable/` and the previous one is used; if none can be read the run stops rather
than start again from scratch.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """No checkpoint in a non-empty directory can be restored; the message is one line."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, input_state: dict[str, int]) -> bool:
        """Every process calls this. Returns False (and says why, in one line) when the save failed."""
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
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        error = ""
        try:
            with _quiet_orbax():  # orbax logs each failed write with a traceback; one line below says it all
                self.manager.save(step, args=args, force=True)
                self.manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as e:
            error = _one_line(e)
        if _everywhere(not error):  # a save counts only if every process's part of it was written
            return True
        self._discard_partial(step)
        kept = f"step {self.steps()[-1]}" if self.steps() else "none yet"
        reason = error or "failed on another process"
        print(f"checkpoint at step {step} NOT saved ({reason}); newest intact checkpoint: {kept}", flush=True)
        return False

    def restore_latest(self, abstract_state):
        """(state, data) from the newest readable checkpoint, or None if the directory holds none."""
        unreadable = []
        for step in reversed(self.steps()):
            restored, error = self._try_restore(step, abstract_state)
            if _everywhere(restored is not None):
                self._set_aside(unreadable)
                return restored["state"], restored["data"]
            unreadable.append(step)
            _say(
                f"checkpoint at step {step} in {self.directory} is unreadable ({error}); trying an older one"
            )
        if unreadable:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (steps {sorted(unreadable)}); if the "
                "model or optimizer config changed since they were written, use a new --workdir"
            )
        return None

    def close(self):
        self.manager.close()

    def _try_restore(self, step: int, abstract_state):
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        try:
            with _quiet_orbax():
                return self.manager.restore(step, args=args), ""
        except Exception as e:  # orbax and tensorstore raise many kinds for a damaged directory
            return None, _one_line(e)

    def _set_aside(self, steps: list[int]):
        """Moves unreadable checkpoints out of orbax's directory, so their steps can be saved again."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory + "_unreadable"
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(step)), target)
                _say(f"moved the unreadable checkpoint at step {step} to {target}")
        _sync("dmt_set_aside_unreadable")
        self.manager.reload()

    def _discard_partial(self, step: int):
        """Frees the space a failed save took (orbax would remove it only at the next start)."""
        if jax.process_index() == 0:
            for name in os.listdir(self.directory):
                if name.startswith(f"{step}{TMP_MARKER}"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        with contextlib.suppress(Exception):  # the manager may still list the failed step
            self.manager.reload()


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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


@contextlib.contextmanager
def _quiet_orbax():
    logger = py_logging.getLogger("absl")
    level = logger.level
    logger.setLevel(py_logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
