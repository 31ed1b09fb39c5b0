"""One of two processes of a run taking its workdir lock through runner.with_workdir_lock, as both loops
do (tests/test_workdir_lock.py).

    python -m tests.lock_child PORT PROCESS_ID WORKDIR HOLD_S

Prints 'locked in S s' once every process knows the lock is held, writes WORKDIR/ran.<pid> (only a run holding
the lock writes), then holds it HOLD_S seconds. A refusal: one `error:` line and exit 2, as dmt_jax.main.
"""

import os
import sys
import time

import jax

from dmt_jax import runner, storage
from dmt_jax.errors import UserError


def hold(workdir: str, seconds: float, asked: float):
    took = time.monotonic() - asked
    (storage.path(workdir) / f"ran.{os.getpid()}").write_text("ran")
    print(f"locked in {took:.1f} s", flush=True)
    time.sleep(seconds)


def main(port: str, process_id: int, workdir: str, seconds: float):
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    try:
        runner.with_workdir_lock(workdir, hold, workdir, seconds, time.monotonic())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
