"""The distillation loop: resume, train, log, evaluate, checkpoint, stop cleanly on preemption.

Flat on purpose (big_vision style): read it top to bottom to know what a run does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from dmt_jax import checkpoint, data, evaluate, flops, parallel, train


class Preemption:
    """SIGTERM / SIGINT ask the loop to checkpoint at the current step and exit 0.

    One process: the signal sets a flag that the loop reads after each step. Several processes must
    stop at the same step. JAX's preemption service (started by jax.distributed.initialize) catches
    SIGTERM on any process and agrees on a step through the coordination service, with no host sync
    per step; a SIGINT is handed to it as a SIGTERM. Should that service be off, the flags are
    all-gathered every `agree_every` steps instead (a tiny collective at the log interval, where the
    loop waits for the device anyway).
    """

    def __init__(self, agree_every: int):
        self.multi = jax.process_count() > 1
        self.jax_service = self.multi and _preemption_service_running()
        self.agree_every = max(1, agree_every)
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGTERM and self.jax_service:
                continue  # JAX's notifier owns SIGTERM
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        # No print here: printing while the interrupted main thread prints raises a reentrant-call error.
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
        if self.jax_service:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def should_stop(self, step: int) -> bool:
        if self.jax_service:
            return multihost_utils.reached_preemption_sync_point(step)
        if self.multi:
            return step % self.agree_every == 0 and _on_any_process(self.requested)
        return self.requested

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _preemption_service_running() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def _on_any_process(flag: bool) -> bool:
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def _sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).sum())


def _say(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


def _fail(msg: str):
    """Stops the run with exit code 1 and one line; every process reaches this at the same step."""
    if jax.process_index() == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _open_ids_log(workdir: str):
    """workdir/example_ids.p{process}.jsonl, appended to; a line cut short by a kill is dropped first.

    Line-buffered, so every step up to a checkpoint is on disk when the checkpoint is; a resumed
    run writes its steps again after it (the later line wins).
    """
    path = os.path.join(workdir, f"example_ids.p{jax.process_index()}.jsonl")
    if os.path.exists(path):
        with open(path, "rb+") as f:
            text = f.read()
            if text and not text.endswith(b"\n"):
                f.truncate(text.rfind(b"\n") + 1)
    return open(path, "a", buffering=1)


class Progress:
    """Console progress line with throughput, MFU and ETA (process 0 only)."""

    def __init__(self, total: int, start: int, batch: int, flops_per_image: float):
        self.total, self.batch, self.flops = total, batch, flops_per_image
        self.peak = flops.peak_flops(jax.devices()[0].device_kind)
        self.t0, self.s0 = time.perf_counter(), start

    def update(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        dt, ds = now - self.t0, step - self.s0
        self.t0, self.s0 = now, step
        if ds <= 0 or dt <= 0:
            return {}
        img_s = ds * self.batch / dt
        out = {"img_per_s": img_s, "step_ms": 1e3 * dt / ds}
        line = f"step {step}/{self.total} | loss {scalars['loss']:.4f} | {img_s:,.0f} img/s"
        if self.peak:
            out["mfu"] = img_s * self.flops / (self.peak * jax.device_count())
            line += f" | MFU {100 * out['mfu']:.1f}%"
        eta = (self.total - step) * dt / ds
        line += f" | ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s"
        # Faults the run survived stay visible on the console, not only in TensorBoard.
        if scalars.get("nonfinite_steps_total"):
            line += f" | {int(scalars['nonfinite_steps_total'])} non-finite steps skipped"
        if scalars.get("bad_images"):
            line += f" | {int(scalars['bad_images'])} unreadable images skipped so far"
        if jax.process_index() == 0:
            print(line, flush=True)
        return out


def run_eval(setup, state, fns, cache: dict, step: int) -> dict[str, float]:
    """k-NN and linear-probe top-1 of the student (and of each teacher, once), per-teacher alignment."""
    cfg, mesh = setup.config, setup.mesh

    def batches(role):
        if role not in cache:
            cache[role] = data.make_source(cfg.data, role)
        return data.make_eval_input(
            cfg.data,
            cache[role],
            global_batch=cfg.eval_batch_size,
            img_size=cfg.img_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    out = {}
    s_train, y_train = evaluate.collect(fns["student"], batches("knn_train"), mesh, state.params)
    s_test, y_test = evaluate.collect(fns["student"], batches("knn_eval"), mesh, state.params)
    out["knn_top1/student"] = evaluate.knn_top1(
        s_train, y_train, s_test, y_test, cfg.knn_k, cfg.knn_temperature
    )
    if cfg.linear_probe_steps > 0:
        out["linear_probe_top1/student"] = evaluate.linear_probe_top1(
            s_train, y_train, s_test, y_test, cfg.linear_probe_steps
        )
    if "teachers" not in cache:  # frozen: their k-NN never changes
        t_train, _ = evaluate.collect(fns["teachers"], batches("knn_train"), mesh, setup.teacher_params)
        t_test, _ = evaluate.collect(fns["teachers"], batches("knn_eval"), mesh, setup.teacher_params)
        t_train = t_train if isinstance(t_train, list) else [t_train]
        t_test = t_test if isinstance(t_test, list) else [t_test]
        cache["teachers"] = {}
        for k, (a, b) in enumerate(zip(t_train, t_test, strict=True)):
            top1 = evaluate.knn_top1(a, y_train, b, y_test, cfg.knn_k, cfg.knn_temperature)
            cache["teachers"][f"knn_top1/teacher_{k}"] = top1
            if cfg.linear_probe_steps > 0:
                top1 = evaluate.linear_probe_top1(a, y_train, b, y_test, cfg.linear_probe_steps)
                cache["teachers"][f"linear_probe_top1/teacher_{k}"] = top1
    out.update(cache["teachers"])
    align, _ = evaluate.collect(
        fns["alignment"], batches("knn_eval"), mesh, state.params, setup.teacher_params
    )
    for k, v in enumerate(np.asarray(align).mean(0)):
        out[f"alignment/teacher_{k}"] = float(v)
    if jax.process_index() == 0:
        print(
            f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(out.items())), flush=True
        )
    return out


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) a distillation in workdir; returns the final evaluation metrics.

    Exits with code 1 (one line on stderr) on a non-finite loss under nonfinite='stop', and when the
    final or the preemption checkpoint cannot be written; a failed periodic save is reported and
    training goes on (the next save retries).
    """
    from clu import metric_writers  # imports TensorFlow's summary writer: kept out of the step's path

    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    train_source = data.make_source(config.data, "train")
    setup = train.build(config, mesh, num_train_examples=len(train_source))
    parallel.local_batch_size(config.batch_size)  # fails early, with a message, on an indivisible batch
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    preemption = Preemption(agree_every=config.log_every)
    ids_file = _open_ids_log(workdir) if config.log_example_ids else None
    try:
        return _train(setup, ckpt, writer, preemption, ids_file, train_source, workdir)
    finally:
        if ids_file:
            ids_file.close()
        preemption.close()
        writer.flush()
        ckpt.close()


def _train(setup, ckpt, writer, preemption, ids_file, train_source, workdir) -> dict[str, float]:
    config, mesh = setup.config, setup.mesh
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored:
        state, data_item = restored
        _say(f"resuming from the checkpoint at step {int(state.step)} in {ckpt.directory}")
    else:
        state, data_item = setup.init_state(jax.random.PRNGKey(config.seed)), None
    start = int(state.step)
    train_input = data.make_train_input(
        config.data,
        train_source,
        global_batch=config.batch_size,
        img_size=config.img_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        step=start,
        saved_state=checkpoint.saved_input_state(data_item),
    )

    final, eval_every = {}, config.eval_every if config.evaluate else 0
    evaluations = _Evaluations(setup, writer, workdir) if config.evaluate else None
    if start == 0 and evaluations:
        evaluations.run(state, 0)
    progress = Progress(setup.steps, start, config.batch_size, setup.flops_per_image())
    books = _Books(config, ckpt, writer, progress, train_input)
    pending, profile = [], tuple(config.profile_steps)
    batches = iter(train_input)

    for step in range(start, setup.steps):
        if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = next(batches)
        global_batch = parallel.global_batch({"image": batch["image"]}, mesh)
        state, metrics = setup.step(state, setup.teacher_params, global_batch)
        pending.append(metrics)
        done = step + 1
        if ids_file:
            ids_file.write(json.dumps({"step": done, "ids": [int(i) for i in batch["id"]]}) + "\n")
        if profile and done == profile[1]:
            jax.profiler.stop_trace()

        last = done == setup.steps
        if done % config.log_every == 0 or last:
            books.log(done, jax.device_get(pending))  # the only host sync, once per log interval
            pending = []
        stop = preemption.should_stop(done)
        if done % config.checkpoint_every == 0 or last or stop:
            books.save(done, state, must_succeed=last or stop)
        if stop:
            _say(
                f"stop requested: checkpoint at step {done} saved; run again with the same workdir to resume"
            )
            break
        if eval_every > 0 and done % eval_every == 0 and not last:
            evaluations.run(state, done)
    else:
        if evaluations:
            final = evaluations.run(state, int(state.step))
        if config.export_at_end and jax.process_index() == 0:
            from dmt_jax import export

            path = os.path.join(workdir, "student_timm.safetensors")
            encoder = jax.device_get(state.params["encoder"])
            export.export_timm(encoder, path, num_heads=setup.student.encoder.num_heads, overwrite=True)
            print(f"student exported for timm/PyTorch: {path}", flush=True)
    return final


class _Evaluations:
    """run_eval at a step, its metrics to TensorBoard and, one JSON line per evaluation, to eval.jsonl."""

    def __init__(self, setup, writer, workdir: str):
        self.setup, self.writer = setup, writer
        self.path = os.path.join(workdir, "eval.jsonl")
        self.fns, self.cache = evaluate.make_eval_fns(setup), {}

    def run(self, state, step: int) -> dict[str, float]:
        out = run_eval(self.setup, state, self.fns, self.cache, step)
        self.writer.write_scalars(step, out)
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **out}) + "\n")
        return out


class _Books:
    """What the loop writes down at log and checkpoint steps, and what it must remember between them."""

    def __init__(self, config, ckpt, writer, progress, train_input):
        self.config, self.ckpt, self.writer = config, ckpt, writer
        self.progress, self.input = progress, train_input
        self.last_saved = (ckpt.steps() or [0])[-1]
        self.skipped = 0  # non-finite steps so far (this session)

    def log(self, done: int, host: list[dict]):
        bad_steps = [done - len(host) + i + 1 for i, m in enumerate(host) if m["nonfinite"]]
        if bad_steps and self.config.nonfinite == "stop":
            _fail(
                f"non-finite loss at step {bad_steps[0]} (its update was not applied); last good checkpoint: "
                f"{self._newest()}. Lower base_lr, set grad_clip, or pass --config.nonfinite=skip to skip "
                "such steps"
            )
        self.skipped += len(bad_steps)
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        scalars["nonfinite_steps"] = float(len(bad_steps))
        scalars["nonfinite_steps_total"] = float(self.skipped)
        scalars["bad_images"] = float(_sum_over_processes(self.input.state()["bad_images"]))
        scalars.update(self.progress.update(done, scalars))
        self.writer.write_scalars(done, scalars)

    def save(self, done: int, state, must_succeed: bool):
        """A failed periodic save is reported and training goes on (the next save retries); the last save,
        or a preemption's, has no later one to retry: the run stops with exit code 1."""
        if self.ckpt.save(done, state, self.input.state()):
            self.last_saved = done
        elif must_succeed:
            _fail(
                f"the checkpoint at step {done} could not be written (see above); newest checkpoint: "
                f"{self._newest()}. Free space and run again to continue from it"
            )

    def _newest(self) -> str:
        return f"step {self.last_saved} in {self.ckpt.directory}" if self.last_saved else "none yet"
