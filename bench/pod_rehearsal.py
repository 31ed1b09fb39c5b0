"""A pod on localhost: what a multi-host run does, played by processes on this machine, and measured.

Parts (each prints JSON lines, then a table; `--parts` picks them):
  eval   k-NN and linear probe over a synthetic ImageNet-sized bank (default 1,281,167 x 768 features,
         1000 classes), sharded over --devices virtual CPU devices (8): each program's peak memory
         per device from the compiled programs, then seconds for writing the bank, k-NN of --queries
         queries and --probe-epochs probe epochs; the largest lowered program (a baked-in bank >1 MB).
  pod    4 processes x 2 virtual CPU devices (mesh data=4 fsdp=2, fsdp_min_size small enough to split
         real tensors), demo data, random teachers stored in a bucket on a local GCS emulator, the
         workdir in the bucket: trains, evaluates, exports; the export is compared with a 1-process x
         8-device run of the same config; peak RSS per process against that single process.
  resume SIGTERM to one of 4 processes: all stop at one step with a checkpoint in the bucket; the
         same command on 2 processes x 2 devices resumes and finishes; its final state is compared
         with the uninterrupted pod run's (needs `pod` in the same call).

    python bench/pod_rehearsal.py                      # all parts (see bench/RESULTS.md for their time)
    python bench/pod_rehearsal.py --parts eval --queries 1024 --probe-epochs 1

Needs the `emulator` extra (`pip install -e '.[emulator]'`, part of `.[test]`): the bucket is
`python -m dmt_jax.storage_emulator` in a process of its own, started by the tests' helper
(tests/gcs_emulator.py). It prints its results only (JSON lines, then a table); a run that fails
shows the end of its output. The machine may be shared: seconds are wall time of this process and
its children.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """An ImageNet-sized evaluation (default: a 1,281,167 x 768 bank, 1000 classes) on this machine's
    devices (8 virtual CPU devices unless --devices): the peak memory of every program per device,
    from the compiled programs (nothing allocated), then wall time on synthetic class-clustered
    features: the bank written batch by batch as evaluation writes it, k-NN of --queries queries,
    and --probe-epochs epochs of the linear probe (its default epoch count extrapolated)."""
    import jax

    from dmt_jax import config, evaluate, parallel

    mesh = parallel.make_mesh(-1, 1)
    batch = evaluate.eval_batch_size(args.eval_batch, jax.device_count())
    bank_batches, query_batches = -(-args.bank // batch), -(-args.queries // batch)
    probe_epochs = config.BASE_SCHEMA["linear_probe_epochs"].default
    probe_batch = config.BASE_SCHEMA["linear_probe_batch_size"].default
    programs = compiled_programs(mesh, bank_batches, query_batches, batch, args, probe_batch, probe_epochs)
    memory = {name: program_memory(compiled) for name, (_, compiled) in programs.items()}
    largest_program = max(len(lowered.as_text()) for lowered, _ in programs.values())

    timings, top1 = timed_evaluation(mesh, bank_batches, query_batches, batch, args, probe_batch)
    bank_mb = args.bank * args.dim * 4 / MB
    per_epoch = timings["probe_s"] / args.probe_epochs
    emit(
        rows,
        part="eval",
        bank=args.bank,
        dim=args.dim,
        classes=args.classes,
        queries=args.queries,
        devices=jax.device_count(),
        device=jax.devices()[0].device_kind,
        eval_batch=batch,
        bank_mb_total=round(bank_mb),
        bank_mb_per_device=round(bank_mb / jax.device_count()),
        peak_mb_per_device={k: round(v["peak"] / MB, 1) for k, v in memory.items()},
        temp_mb_per_device={k: round(v["temp"] / MB, 1) for k, v in memory.items()},
        peak_mb_per_device_max=round(max(v["peak"] for v in memory.values()) / MB, 1),
        write_bank_s=round(timings["write_s"], 1),
        knn_s=round(timings["knn_s"], 1),
        knn_compile_s=round(timings["knn_compile_s"], 1),
        knn_top1=round(top1["knn"], 2),
        probe_epochs_run=args.probe_epochs,
        probe_s=round(timings["probe_s"], 1),
        probe_compile_s=round(timings["probe_compile_s"], 1),
        probe_top1=round(top1["probe"], 2),
        probe_s_per_epoch=round(per_epoch, 1),
        probe_default_epochs=probe_epochs,
        probe_default_epochs_s_extrapolated=round(per_epoch * probe_epochs + timings["probe_compile_s"]),
        largest_program_bytes=largest_program,
        no_constant_over_1mb=largest_program < MB,
    )


def compiled_programs(mesh, bank_batches, query_batches, batch, args, probe_batch, probe_epochs):
    """name -> (lowered, compiled) of every evaluation program at full size, from ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from dmt_jax import evaluate, parallel

    def spec(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    banked = NamedSharding(mesh, evaluate.BANK_SPEC)
    rows, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def bank(batches):
        return evaluate.Bank(
            spec((batches, batch, args.dim), jnp.float32, banked), spec((batches, batch), jnp.int32, banked)
        )

    bank_, queries = bank(bank_batches), bank(query_batches)
    index = spec((), jnp.int32, replicated)
    params = {
        "w": spec((args.dim, args.classes), jnp.float32, replicated),
        "b": spec((args.classes,), jnp.float32, replicated),
    }
    local_batch = max(1, min(-(-probe_batch // mesh.size), bank_batches * batch // mesh.size))
    steps = probe_epochs * -(-(bank_batches * batch // mesh.size) // local_batch)
    optimizer = evaluate._probe_optimizer(1e-2, 1e-4, steps)
    opt_state = jax.tree.map(
        lambda s: spec(s.shape, s.dtype, replicated), jax.eval_shape(optimizer.init, params)
    )
    stats = {k: spec((args.dim,), jnp.float32, replicated) for k in ("mean", "std")}
    key = spec((2,), jnp.uint32, replicated)
    lowered = {
        "write_batch": evaluate._bank_writer(mesh).lower(
            [bank_],
            index,
            [spec((batch, args.dim), jnp.float32, rows)],
            spec((batch,), jnp.int32, rows),
            spec((batch,), jnp.bool_, rows),
        ),
        "knn_query_batch": evaluate._knn_program(mesh, 20, 0.07, args.classes).lower(bank_, queries, index),
        "probe_statistics": evaluate._stats_program(mesh).lower(bank_),
        "probe_epoch": evaluate._probe_epoch_program(mesh, 1e-2, 1e-4, steps, local_batch).lower(
            params, opt_state, bank_, stats, key
        ),
        "probe_accuracy": evaluate._probe_eval_program(mesh).lower(params, queries, stats),
    }
    return {name: (low, low.compile()) for name, low in lowered.items()}


def program_memory(compiled) -> dict:
    """Per-device bytes of a compiled program: arguments + outputs - donated (aliased) + temporaries."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"peak": peak, "temp": m.temp_size_in_bytes}


def timed_evaluation(mesh, bank_batches, query_batches, batch, args, probe_batch):
    """Seconds of: writing the bank (synthetic features made on the devices), k-NN, the probe."""
    import jax
    import jax.numpy as jnp

    from dmt_jax import evaluate, parallel

    rows = parallel.batch_sharding(mesh)

    @jax.jit
    def synthetic(centers, key, i):  # class-clustered features of batch i, made where they are stored
        k_label, k_noise = jax.random.split(jax.random.fold_in(key, i))
        labels = jax.random.randint(k_label, (batch,), 0, args.classes)
        x = centers[labels] + jax.random.normal(k_noise, (batch, args.dim))
        return jax.lax.with_sharding_constraint(x, rows), jax.lax.with_sharding_constraint(labels, rows)

    centers = jax.random.normal(jax.random.PRNGKey(0), (args.classes, args.dim))

    def fill(num_batches, rows_wanted, key):
        banks, write = (
            [evaluate._empty_bank(mesh, num_batches, (batch, args.dim))],
            evaluate._bank_writer(mesh),
        )
        for i in range(num_batches):
            x, labels = synthetic(centers, key, i)
            valid = jnp.arange(batch) + i * batch < rows_wanted
            banks = write(banks, jnp.int32(i), [x], labels, jax.device_put(valid, rows))
        return jax.block_until_ready(banks[0])

    t0 = time.perf_counter()
    bank = fill(bank_batches, args.bank, jax.random.PRNGKey(1))
    write_s = time.perf_counter() - t0
    queries = fill(query_batches, args.queries, jax.random.PRNGKey(2))
    # Compiled first and timed apart: the calls below reuse these executables (seconds without compiling).
    t0 = time.perf_counter()
    evaluate._knn_program(mesh, 20, 0.07, args.classes).lower(bank, queries, jnp.int32(0)).compile()
    knn_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    knn = evaluate.knn_top1(bank, queries, num_classes=args.classes)
    knn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    local_rows = bank_batches * batch // mesh.size
    local_batch = max(1, min(-(-probe_batch // mesh.size), local_rows))
    steps = args.probe_epochs * -(-local_rows // local_batch)
    params = {"w": jnp.zeros((args.dim, args.classes)), "b": jnp.zeros((args.classes,))}
    opt_state = evaluate._probe_optimizer(1e-2, 1e-4, steps).init(params)
    stats = evaluate._stats_program(mesh).lower(bank).compile()(bank)
    epoch = evaluate._probe_epoch_program(mesh, 1e-2, 1e-4, steps, local_batch)
    epoch.lower(params, opt_state, bank, stats, jax.random.PRNGKey(0)).compile()
    evaluate._probe_eval_program(mesh).lower(params, queries, stats).compile()
    probe_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = evaluate.linear_probe_top1(
        bank, queries, epochs=args.probe_epochs, batch_size=probe_batch, num_classes=args.classes
    )
    probe_s = time.perf_counter() - t0
    times = {"write_s": write_s, "knn_s": knn_s, "knn_compile_s": knn_compile_s}
    times.update(probe_s=probe_s, probe_compile_s=probe_compile_s)
    return times, {"knn": knn, "probe": probe}


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
    """Waits for every run; one that fails or hangs ends them all and shows what each said last."""
    deadline = time.monotonic() + timeout
    try:
        rcs = [r.finish(timeout=max(1.0, deadline - time.monotonic())) for r in runs]
    except AssertionError:  # a run did not end in time
        rcs = None
    if rcs is None or any(rcs):
        for r in runs:
            r.kill()
        said = "\n----\n".join(f"process {i}:\n{r.output[-3000:]}" for i, r in enumerate(runs))
        raise SystemExit(f"a run failed or did not end within {timeout:.0f} s:\n{said}")
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
        linear_probe_epochs=20,
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
    try:
        runs[0].wait_for(rf"^step {args.steps // 2 - 1}/", timeout=args.timeout)
    except AssertionError:
        finish(runs, 0)  # ends them all, shows what each said
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
    parser.add_argument("--bank", type=int, default=1_281_167, help="rows (ImageNet-1K train)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1024, help="k-NN / probe queries timed")
    parser.add_argument("--eval-batch", type=int, default=256, help="evaluation batch (all devices)")
    parser.add_argument("--probe-epochs", type=int, default=1, help="probe epochs timed")
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices of the eval part")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    parts = args.parts.split(",")
    # Before jax is imported: the eval part's devices (the pod parts start their own processes).
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
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
