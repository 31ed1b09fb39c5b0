"""One of two processes saving asynchronous checkpoints 1, 2, 3 (tests/test_async_checkpoints.py); the
writes of checkpoint 2 fail on disk (ENOSPC) on process FAILING only. Prints each save's result.

python -m tests.async_saves_child PORT PROCESS_ID FAILING DIRECTORY
"""

import builtins
import errno
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from dmt_jax import checkpoint


def main(port: str, process_id: int, failing: int, directory: str):
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    shorten_orbax_timeout(seconds=5)
    if process_id == failing:
        fail_writes(f"{directory}/2{checkpoint.TMP_MARKER}")
    mesh = jax.make_mesh((2,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    state = {"w": jax.make_array_from_callback((8,), sharding, lambda index: np.arange(8.0)[index])}
    position = {"next_index": process_id, "bad_images": 0, "global_batch": 8}
    ckpt = checkpoint.Checkpointer(directory, keep=10, asynchronous=True)
    for step in (1, 2, 3):
        print(f"save {step}: {ckpt.save(step, state, position, wait=step == 3)}", flush=True)
    ckpt.close()


def shorten_orbax_timeout(seconds: int):
    """The process whose save failed never reaches the barrier of orbax's background thread on the other:
    that one waits out orbax's timeout (20 minutes by default), then both agree the save failed."""
    options = ocp.CheckpointManagerOptions.__init__

    def with_short_timeout(self, *args, **kwargs):
        options(self, *args, **kwargs, async_options=ocp.AsyncOptions(timeout_secs=seconds))

    ocp.CheckpointManagerOptions.__init__ = with_short_timeout


def fail_writes(prefix: str):
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if isinstance(file, str | os.PathLike) and str(file).startswith(prefix) and set(mode) & set("wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = full_disk_open


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
