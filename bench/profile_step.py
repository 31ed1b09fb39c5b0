"""A short profile of the training step: the top device kernels (and XLA ops) by time.

Runs bench/step.py's step (same arguments), traces a few steps with the JAX profiler, reads the
Perfetto trace it writes and prints, per kernel name, total time, share of the traced device time
and calls per step. On a GPU the kernels are the device's stream events; on a CPU (no device
process in the trace) the XLA CPU client's ops stand in, so the script can be checked anywhere.

    python bench/profile_step.py --student s --batch 256 --mask-ratio 0.75 --top 25
"""

from __future__ import annotations

import collections
import gzip
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/step.py

import jax  # noqa: E402
import step  # noqa: E402


def trace_events(trace_dir: Path) -> list[dict]:
    path = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def kernel_times(events: list[dict]) -> tuple[str, dict[str, list[float]]]:
    """(where, {kernel name: durations in us}) from the device's streams, else the CPU client's ops."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    device = {pid for pid, name in processes.items() if name.startswith("/device:")}

    def on_stream(e):  # GPU kernels and copies run on "Stream #N" lines of a /device: process
        return e["pid"] in device and threads.get((e["pid"], e.get("tid")), "").startswith("Stream")

    def cpu_op(e):  # the XLA CPU client's thunks; skip its bookkeeping events
        thread = threads.get((e["pid"], e.get("tid")), "")
        bookkeeping = e["name"].startswith(("end:", "Thread", "Thunk"))
        return thread.startswith("tf_XLAPjRtCpuClient") and not bookkeeping

    where, keep = ("device streams", on_stream) if device else ("CPU client ops (no device)", cpu_op)
    times: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and keep(e):
            times[e["name"]].append(float(e.get("dur", 0.0)))
    return where, times


def profile(setup, state, batches, *, label: str, steps: int = 3, top: int = 25):
    """Traces `steps` steps of an already compiled, warmed-up step; prints the top kernels; returns
    the new state."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for i in range(steps):
                state, _ = setup.step(state, setup.teacher_params, batches[i % len(batches)])
            jax.block_until_ready(state)
        where, times = kernel_times(trace_events(Path(trace_dir)))
    total = sum(sum(d) for d in times.values()) or 1.0
    print(f"\ntop kernels of the {label} step ({where}), {steps} steps, {total / steps / 1e3:.2f} ms/step")
    print(f"{'ms/step':>9}{'share':>8}{'calls/step':>11}  kernel")
    for name, durs in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:top]:
        ms, share, calls = sum(durs) / steps / 1e3, sum(durs) / total, len(durs) / steps
        print(f"{ms:>9.3f}{share:>8.1%}{calls:>11.1f}  {name[:140]}")
    sys.stdout.flush()
    return state


def main(argv=None):
    p = step.parser()
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--profile-steps", type=int, default=3)
    args = step.parse(p, argv)
    setup, state, batches = step.prepare(args)
    for i in range(args.warmup):
        state, _ = setup.step(state, setup.teacher_params, batches[i % 4])
    jax.block_until_ready(state)
    profile(setup, state, batches, label=args.student, steps=args.profile_steps, top=args.top)


if __name__ == "__main__":
    main()
