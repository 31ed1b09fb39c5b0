"""Orbax checkpoints of the whole run: train state (step, params, optimizer, rng) + input position.

Saves are atomic (orbax writes a temporary directory and renames it), so a save that fails, a full
disk say, leaves the previous checkpoints intact. Restore takes an abstract state carrying the
current mesh's shardings, so a checkpoint restores onto any mesh or process count. A checkpoint
that cannot be read is reported and the previous one is tried.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


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
        """Every process calls this. Returns False (and says why) when the save failed."""
        # Each process has its own input position; all of them go into the one JSON item.
        local = np.asarray([input_state["next_index"], input_state["bad_images"]], np.int64)
        gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2)
        data = {
            "process_count": jax.process_count(),
            "global_batch": int(input_state["global_batch"]),
            "next_index": [int(x) for x in gathered[:, 0]],
            "bad_images": [int(x) for x in gathered[:, 1]],
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
        try:
            self.manager.save(step, args=args, force=True)
            self.manager.wait_until_finished()
        except (OSError, ValueError, RuntimeError) as e:
            logging.error("checkpoint at step %d NOT saved (%s); the previous checkpoints are intact", step, e)
            print(f"checkpoint at step {step} not saved: {e}; previous checkpoints are intact", flush=True)
            return False
        return True

    def restore_latest(self, abstract_state):
        """(state, data) from the newest readable checkpoint, or None if there is none."""
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # orbax raises many kinds for a damaged directory
                msg = f"checkpoint at step {step} in {self.directory} is unreadable ({type(e).__name__}: {e}"
                print(msg.splitlines()[0][:300] + "); falling back to the previous one", flush=True)
                continue
            return restored["state"], restored["data"]
        return None

    def close(self):
        self.manager.close()


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
