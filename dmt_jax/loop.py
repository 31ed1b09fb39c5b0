"""The distillation loop: resume, train, log, evaluate, checkpoint, stop cleanly on preemption.

Flat on purpose (big_vision style): read it top to bottom to know what a run does.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dmt_jax import checkpoint, data, evaluate, flops, parallel, train


class Preemption:
    """SIGTERM / SIGINT ask the loop to checkpoint at the current step and exit 0.

    Several processes agree on the step through JAX's preemption sync point (its service sees
    SIGTERM on any host); one process watches its own signals.
    """

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        signals = (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the current step", flush=True)

    def should_stop(self, step: int) -> bool:
        if self.multi:
            return multihost_utils.reached_preemption_sync_point(step) or self.requested
        return self.requested


class Progress:
    """Console progress line with throughput, MFU and ETA (process 0 only)."""

    def __init__(self, total: int, start: int, batch: int, flops_per_image: float):
        self.total, self.batch, self.flops = total, batch, flops_per_image
        self.peak = flops.peak_flops(jax.devices()[0].device_kind)
        self.t0, self.s0 = time.perf_counter(), start

    def update(self, step: int, loss: float) -> dict[str, float]:
        now = time.perf_counter()
        dt, ds = now - self.t0, step - self.s0
        self.t0, self.s0 = now, step
        if ds <= 0 or dt <= 0:
            return {}
        img_s = ds * self.batch / dt
        out = {"img_per_s": img_s, "step_ms": 1e3 * dt / ds}
        line = f"step {step}/{self.total} | loss {loss:.4f} | {img_s:,.0f} img/s"
        if self.peak:
            out["mfu"] = img_s * self.flops / (self.peak * jax.device_count())
            line += f" | MFU {100 * out['mfu']:.1f}%"
        eta = (self.total - step) * dt / ds
        line += f" | ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s"
        if jax.process_index() == 0:
            print(line, flush=True)
        return out


def run_eval(setup, state, fns, cache: dict, step: int) -> dict[str, float]:
    """k-NN top-1 of the student (and of each teacher, once), and per-teacher alignment."""
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
    out["knn_top1/student"] = evaluate.knn_top1(s_train, y_train, s_test, y_test, cfg.knn_k, cfg.knn_temperature)
    if "teachers" not in cache:  # frozen: their k-NN never changes
        t_train, _ = evaluate.collect(fns["teachers"], batches("knn_train"), mesh, setup.teacher_params)
        t_test, _ = evaluate.collect(fns["teachers"], batches("knn_eval"), mesh, setup.teacher_params)
        t_train = t_train if isinstance(t_train, list) else [t_train]
        t_test = t_test if isinstance(t_test, list) else [t_test]
        cache["teachers"] = {
            f"knn_top1/teacher_{k}": evaluate.knn_top1(a, y_train, b, y_test, cfg.knn_k, cfg.knn_temperature)
            for k, (a, b) in enumerate(zip(t_train, t_test, strict=True))
        }
    out.update(cache["teachers"])
    align, _ = evaluate.collect(fns["alignment"], batches("knn_eval"), mesh, state.params, setup.teacher_params)
    for k, v in enumerate(np.asarray(align).mean(0)):
        out[f"alignment/teacher_{k}"] = float(v)
    if jax.process_index() == 0:
        print(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(out.items())), flush=True)
    return out


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) a distillation in workdir; returns the final evaluation metrics."""
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

    restored = ckpt.restore_latest(setup.abstract_state)
    if restored:
        state, data_item = restored
        print(f"resuming from the checkpoint at step {int(state.step)} in {ckpt.directory}", flush=True)
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

    fns, eval_cache, final = evaluate.make_eval_fns(setup), {}, {}
    if start == 0:
        writer.write_scalars(0, run_eval(setup, state, fns, eval_cache, 0))
    progress = Progress(setup.steps, start, config.batch_size, setup.flops_per_image())
    preemption = Preemption()
    ids_file = None
    if config.log_example_ids:
        ids_file = open(os.path.join(workdir, f"example_ids.p{jax.process_index()}.jsonl"), "a")
    pending, last_saved = [], (ckpt.steps() or [0])[-1]
    profile = tuple(config.profile_steps)
    batches = iter(train_input)

    for step in range(start, setup.steps):
        if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = next(batches)
        state, metrics = setup.step(state, setup.teacher_params, parallel.global_batch({"image": batch["image"]}, mesh))
        pending.append(metrics)
        done = step + 1
        if ids_file:
            ids_file.write(json.dumps({"step": done, "ids": [int(i) for i in batch["id"]]}) + "\n")
        if profile and done == profile[1]:
            jax.profiler.stop_trace()

        if done % config.log_every == 0 or done == setup.steps:
            host = jax.device_get(pending)  # the only host sync, once per log interval
            pending = []
            bad_steps = [done - len(host) + i + 1 for i, m in enumerate(host) if m["nonfinite"]]
            if bad_steps and config.nonfinite == "stop":
                msg = (
                    f"non-finite loss at step {bad_steps[0]} (the update was not applied); last good checkpoint: "
                    f"step {last_saved} in {ckpt.directory}. Lower base_lr, set grad_clip, or pass "
                    "--config.nonfinite=skip to skip such steps"
                )
                print(msg, flush=True)
                raise SystemExit(1)
            scalars = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
            scalars["nonfinite_steps"] = float(len(bad_steps))
            scalars["bad_images"] = float(train_input.state()["bad_images"])
            scalars.update(progress.update(done, scalars["loss"]))
            writer.write_scalars(done, scalars)

        stop = preemption.should_stop(done)
        if done % config.checkpoint_every == 0 or done == setup.steps or stop:
            if ckpt.save(done, state, train_input.state()):
                last_saved = done
        if stop:
            print(f"preempted: checkpoint at step {done} saved; run again with the same workdir to resume", flush=True)
            break
        if config.eval_every > 0 and done % config.eval_every == 0 and done != setup.steps:
            writer.write_scalars(done, run_eval(setup, state, fns, eval_cache, done))
    else:
        final = run_eval(setup, state, fns, eval_cache, int(state.step))
        writer.write_scalars(int(state.step), final)
        if config.export_at_end and jax.process_index() == 0:
            from dmt_jax import export

            path = os.path.join(workdir, "student_timm.safetensors")
            encoder = jax.device_get(state.params["encoder"])
            export.export_timm(encoder, path, num_heads=setup.student.encoder.num_heads, overwrite=True)
            print(f"student exported for timm/PyTorch: {path}", flush=True)

    if ids_file:
        ids_file.close()
    writer.flush()
    ckpt.close()
    return final
