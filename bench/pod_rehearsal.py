"""A pod on localhost: what a multi-host run does, played by processes on this machine, and measured.

Parts (each prints JSON lines, then a table; `--parts` picks them):
  eval   k-NN over a synthetic memory bank (default 128k x 384 features, 1000 classes, 10k queries):
         seconds, and the size of the largest lowered program (a baked-in bank would show as >1 MB).
  pod    4 processes x 2 virtual CPU devices (mesh data=4 fsdp=2, fsdp_min_size small enough to split
         real tensors), demo data, random teachers stored in a bucket on a local GCS emulator, the
         workdir in the bucket: trains, evaluates, exports; the export is compared with a 1-process x
         8-device run of the same config; peak RSS per process against that single process.
  resume SIGTERM to one of 4 processes: all stop at one step with a checkpoint in the bucket; the
         same command on 2 processes x 2 devices resumes and finishes; its final state is compared
         with the uninterrupted pod run's (needs `pod` in the same call).

    python bench/pod_rehearsal.py                      # all parts: about 4.5 minutes on 2 idle cores
    python bench/pod_rehearsal.py --parts eval --bank 131072

Needs the `emulator` extra (`pip install -e '.[emulator]'`, part of `.[test]`): the bucket is
`python -m dmt_jax.storage_emulator` in a process of its own, started by the tests' helper
(tests/gcs_emulator.py). It prints its results only (JSON lines, then a table); a run that fails
shows the end of its output. The machine may be shared: seconds are wall time of this process and
its children.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the run helpers and the emulator fixture the tests use

import numpy as np  # noqa: E402

MB = 1 << 20


def emit(rows: list, **fields):
    rows.append(fields)
    print(json.dumps(fields), flush=True)


# ------------------------------------------------------------------------------------------- eval


def eval_part(args, rows):
    import jax
    import jax.numpy as jnp

    from dmt_jax import evaluate

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    y_bank = rng.integers(0, args.classes, args.bank)
    y_query = rng.integers(0, args.classes, args.queries)
    bank = centers[y_bank] + rng.standard_normal((args.bank, args.dim), np.float32)
    queries = centers[y_query] + rng.standard_normal((args.queries, args.dim), np.float32)

    t0 = time.perf_counter()
    top1 = evaluate.knn_top1(bank, y_bank, queries, y_query)
    seconds = time.perf_counter() - t0
    lowered = evaluate._knn_predict.lower(
        jnp.asarray(bank), jnp.asarray(y_bank, jnp.int32), jnp.zeros((1024, args.dim)), 20, 0.07, args.classes
    )
    program_bytes = len(lowered.as_text())
    emit(
        rows,
        part="eval",
        bank=args.bank,
        dim=args.dim,
        classes=args.classes,
        queries=args.queries,
        knn_top1=round(top1, 2),
        seconds=round(seconds, 2),
        under_10s=seconds < 10,
        largest_program_bytes=program_bytes,
        no_constant_over_1mb=program_bytes < MB,
        device=jax.devices()[0].device_kind,
    )


# -------------------------------------------------------------------------------------- pod, resume


class PeakRSS:
    """Polls /proc/PID/status VmHWM (the process's own high-water mark) until the process ends."""

    def __init__(self, pid: int):
        self.pid, self.peak_kb = pid, 0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        path = Path(f"/proc/{self.pid}/status")
        while True:
            try:
                m = re.search(r"VmHWM:\s+(\d+) kB", path.read_text())
            except OSError:
                return
            if m:
                self.peak_kb = max(self.peak_kb, int(m.group(1)))
            time.sleep(0.1)


def launch(args_list, processes: int, devices: int, env):
    """`processes` runs of dmt_jax.main joined through a coordinator on localhost; each with its RSS poll."""
    from helpers_run import Run, free_port

    port = free_port()
    runs = []
    for i in range(processes):
        extra = []
        if processes > 1:
            extra = [
                f"--config.distributed.coordinator_address=localhost:{port}",
                f"--config.distributed.num_processes={processes}",
                f"--config.distributed.process_id={i}",
            ]
        run = Run(args_list + extra, devices=devices, env=env)
        run.rss = PeakRSS(run.proc.pid)
        runs.append(run)
    return runs


def finish(runs, timeout: float):
    rcs = [r.finish(timeout=timeout) for r in runs]
    if any(rcs):
        raise SystemExit("a run failed:\n" + "\n----\n".join(r.output[-3000:] for r in runs))
    return rcs


def exported(path) -> dict:
    from safetensors.numpy import load

    from dmt_jax import storage

    return load(storage.path(path).read_bytes())


def max_abs_rel(a: dict, b: dict) -> float:
    """Largest per-tensor max|a - b| / max|b| of two timm state dicts, the key bias left out: its true
    gradient is 0 and Adam turns the rounding noise of a different summation order into +-lr steps
    (tests/helpers_run.without_key_bias)."""

    def key_bias_zeroed(name, x):
        if name.endswith("attn.qkv.bias"):
            x = x.copy()
            x[x.shape[0] // 3 : 2 * x.shape[0] // 3] = 0
        return x

    return max(
        float(
            np.abs(key_bias_zeroed(k, a[k]) - key_bias_zeroed(k, b[k])).max() / (np.abs(b[k]).max() + 1e-30)
        )
        for k in b
    )


def pod_args(args, bucket, workdir, demo, **over):
    from helpers_run import cli_args

    fields = dict(
        teachers=f"('{bucket}/teachers/a','{bucket}/teachers/b')",
        total_steps=args.steps,
        warmup_steps=1,
        checkpoint_every=args.steps // 2,
        log_every=1,
        evaluate=True,
        eval_every=10_000,
        linear_probe_steps=20,
        export_at_end=True,
        log_example_ids=False,
        fsdp_min_size=1000,
        mesh__fsdp=2,
        mesh__data=-1,
        batch_size=16,
    )
    fields.update(over)
    return cli_args(workdir, demo, **fields)


def pod_part(args, rows, bucket, tmp: Path, env):
    from dmt_jax.teachers import make_random_teacher, save_teacher

    for name, (variant, px, seed) in {"a": ("mu/4", 32, 1), "b": ("mu/8", 64, 2)}.items():
        teacher = make_random_teacher(variant, px, seed)
        save_teacher(f"{bucket}/teachers/{name}", teacher.spec, teacher.params, overwrite=True)
    demo = tmp / "demo"

    t0 = time.perf_counter()
    single = launch(pod_args(args, bucket, tmp / "single", demo, mesh__data=4), 1, 8, env)
    finish(single, args.timeout)
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pod = launch(pod_args(args, bucket, f"{bucket}/pod", demo, mesh__data=4), 4, 2, env)
    finish(pod, args.timeout)
    pod_s = time.perf_counter() - t0

    a = exported(f"{bucket}/pod/student_timm.safetensors")
    b = exported(tmp / "single" / "student_timm.safetensors")
    err = max_abs_rel(a, b)
    evaluated = any(line.startswith(f"eval at step {args.steps}:") for line in pod[0].lines)
    rss = [r.rss.peak_kb / 1024 for r in pod]
    single_rss = single[0].rss.peak_kb / 1024
    emit(
        rows,
        part="pod",
        layout="4 processes x 2 devices, data=4 fsdp=2",
        steps=args.steps,
        seconds=round(pod_s, 1),
        single_seconds=round(single_s, 1),
        evaluated=evaluated,
        export_max_rel_err_vs_1x8=err,
        export_within_1e5=err < 1e-5,
        peak_rss_mb_per_process=[round(x) for x in rss],
        single_process_peak_rss_mb=round(single_rss),
        rss_ratio=round(max(rss) / single_rss, 2),
        rss_within_1_5x=max(rss) <= 1.5 * single_rss,
    )


def resume_part(args, rows, bucket, tmp: Path, env):
    from helpers_run import max_rel_err

    from dmt_jax import checkpoint

    demo = tmp / "demo"
    workdir = f"{bucket}/resume"
    common = dict(mesh__data=-1)
    runs = launch(pod_args(args, bucket, workdir, demo, **common), 4, 2, env)
    runs[0].wait_for(rf"^step {args.steps // 2 - 1}/", timeout=args.timeout)
    runs[2].send(signal.SIGTERM)  # one process is told; the others learn it from JAX's service
    finish(runs, args.timeout)
    stops = [re.search(r"stop requested: checkpoint at step (\d+)", r.output) for r in runs]
    stop_step = int(stops[0].group(1)) if stops[0] else None
    steps_in_bucket = checkpoint.Checkpointer(f"{workdir}/checkpoints").steps()

    resumed = launch(pod_args(args, bucket, workdir, demo, **common), 2, 2, env)
    finish(resumed, args.timeout)
    final = checkpoint.read_state(f"{workdir}/checkpoints", args.steps)
    reference = checkpoint.read_state(f"{bucket}/pod/checkpoints", args.steps)
    err = max_rel_err(final["params"], reference["params"])
    emit(
        rows,
        part="resume",
        stop_step=stop_step,
        all_exit_0=True,
        checkpoint_in_bucket=stop_step in steps_in_bucket,
        resumed_on="2 processes x 2 devices",
        resumed_from=stop_step
        if any(f"resuming from the checkpoint at step {stop_step}" in line for line in resumed[0].lines)
        else None,
        final_max_rel_err_vs_uninterrupted=err,
        final_within_1e5=err < 1e-5,
    )


def table(rows):
    print()
    for r in rows:
        print(f"[{r['part']}]")
        for k, v in r.items():
            if k != "part":
                print(f"  {k:<38} {v}")


def main():
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--parts", default="eval,pod,resume")
    parser.add_argument("--bank", type=int, default=128 * 1024)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    parts = args.parts.split(",")
    rows: list = []
    if "eval" in parts:
        eval_part(args, rows)
    if "pod" in parts or "resume" in parts:
        import tempfile

        from gcs_emulator import child_env, emulated_bucket

        try:
            import gcp_storage_emulator  # noqa: F401
        except ImportError:
            raise SystemExit("the pod parts need the emulator extra: pip install -e '.[emulator]'") from None
        with emulated_bucket() as bucket, tempfile.TemporaryDirectory() as tmp:
            env = child_env()
            pod_part(args, rows, bucket, Path(tmp), env)
            if "resume" in parts:
                resume_part(args, rows, bucket, Path(tmp), env)
    table(rows)


if __name__ == "__main__":
    main()
