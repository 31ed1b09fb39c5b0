"""`python -m dmt_jax.main` (or `dmt_jax.finetune`) with one patch that lets a test land a signal at a
precise moment (tests/test_resilience.py):

    python -m tests.patched_run held-saves FROM_STEP MODULE ARGS...
        every file opened for writing in the temporary folder of a checkpoint save from step FROM_STEP on
        waits forever ('held' is printed at the first): such a save never finishes;
    python -m tests.patched_run first-step MODULE ARGS...
        'first step compiling' is printed when the session's first step starts (its compile).
"""

import builtins
import os
import re
import sys
import threading

from dmt_jax import checkpoint, runner

_TMP = re.compile(rf"/checkpoints/(\d+){re.escape(checkpoint.TMP_MARKER)}")


def hold_saves_from(step: int):
    real_open, forever, said = builtins.open, threading.Event(), []

    def held_open(file, mode="r", *args, **kwargs):
        found = _TMP.search(str(file)) if isinstance(file, str | os.PathLike) else None
        if found and int(found.group(1)) >= step and set(mode) & set("wax+"):
            if not said:
                said.append(True)
                print("held", flush=True)
            forever.wait()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = held_open


def announce_first_step():
    real = runner.first_step

    def announced(train_step, state, batch, preemption):
        def step(*args):
            print("first step compiling", flush=True)
            return train_step(*args)

        return real(step, state, batch, preemption)

    runner.first_step = announced


if __name__ == "__main__":
    if sys.argv[1] == "held-saves":
        hold_saves_from(int(sys.argv[2]))
        module, args = sys.argv[3], sys.argv[4:]
    else:
        announce_first_step()
        module, args = sys.argv[2], sys.argv[3:]
    if module == "dmt_jax.finetune":
        from dmt_jax.finetune import cli

        cli.run([module, *args])
    else:
        from dmt_jax import main

        main.run([module, *args])
