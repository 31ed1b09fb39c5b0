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

from dmt_jax import (
    checkpoint,
    data,
    errors,
    evaluate,
    flops,
    parallel,
    pictures,
    run_record,
    storage,
    summary,
    train,
    workdir_lock,
)


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

    def watch_input(self, train_input):
        """A wait for input ends in data.StopRequested once a stop is requested (see next_batch). Not with
        several processes: they must stop at one agreed step, so they wait for input."""
        if not self.multi:
            train_input.stop_requested = lambda: self.requested

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
    if storage.is_remote(workdir):  # a bucket object cannot be appended to line by line
        raise errors.UserError(
            f"--config.log_example_ids=True needs a local --workdir (got {workdir}); turn it off for a bucket"
        )
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


def eval_batches(cfg, cache: dict, role: str):
    """One evaluation pass over a split role ('knn_train', 'knn_eval'); its source is made once, in cache."""
    if role not in cache:
        cache[role] = data.make_source(cfg.data, role)
    return data.make_eval_input(
        cfg.data,
        cache[role],
        global_batch=evaluate.eval_batch_size(cfg.eval_batch_size, jax.device_count()),
        img_size=cfg.img_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def run_eval(setup, state, fns, cache: dict, step: int) -> dict[str, float]:
    """k-NN and linear-probe top-1 of the student (and of each teacher, once), per-teacher alignment."""
    cfg, mesh = setup.config, setup.mesh

    def batches(role):
        return eval_batches(cfg, cache, role)

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
    align, _ = evaluate.collect(fns["alignment"], batches("knn_eval"), mesh, state, setup.teacher_params)
    for k, v in enumerate(np.asarray(align).mean(0)):
        out[f"alignment/teacher_{k}"] = float(v)
    return out


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) a distillation in workdir; returns the final evaluation metrics.

    Exits with code 1 (one line on stderr) on a non-finite loss under nonfinite='stop', and when the
    final or the preemption checkpoint cannot be written; a failed periodic save is reported and
    training goes on (the next save retries).
    """
    _use_compilation_cache(config.compilation_cache_dir)
    return with_workdir_lock(workdir, _train_and_evaluate_locked, config, workdir)


def with_workdir_lock(workdir: str, run, *args):
    """run(*args) holding the workdir's lock (process 0 takes it, the others share it), taken before
    anything else is written: a second run on this workdir would replace this one's files."""
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    lock = workdir_lock.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return run(*args)
    finally:
        if lock:
            lock.release()


def _use_compilation_cache(directory: str):
    """JAX's persistent compilation cache in `directory` ('' leaves JAX's setting alone). Set before the
    first compile: the demo's compiles (its teachers, step and evaluation) are then free on a rerun."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _train_and_evaluate_locked(config, workdir: str) -> dict[str, float]:
    from clu import metric_writers  # imports TensorFlow's summary writer: kept out of the step's path

    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    train_source = data.make_source(config.data, "train")
    setup = train.build(config, mesh, num_train_examples=len(train_source))
    _say(summary.describe_run(setup, train_source))
    parallel.local_batch_size(config.batch_size)  # fails early, with a message, on an indivisible batch
    ckpt = checkpoint.for_run(workdir, config)
    events = storage.EventsDir(workdir)  # TensorFlow's writer reaches a bucket, but not an emulated one
    writer = metric_writers.create_default_writer(events.local, just_logging=jax.process_index() > 0)
    preemption = Preemption(agree_every=config.log_every)
    ids_file = _open_ids_log(workdir) if config.log_example_ids else None
    try:
        return _train(setup, ckpt, writer, preemption, ids_file, train_source, workdir)
    finally:
        if ids_file:
            ids_file.close()
        preemption.close()
        writer.flush()
        events.close()
        ckpt.close()


def _train(setup, ckpt, writer, preemption, ids_file, train_source, workdir) -> dict[str, float]:
    config, mesh = setup.config, setup.mesh
    # A resume must continue the same run: same teachers (by content), same training fields.
    fingerprints = setup.teacher_fingerprints
    state, train_input, record = resume_or_start(setup, ckpt, train_source, workdir, fingerprints)
    start = int(state.step)

    final, eval_every = {}, config.eval_every if config.evaluate else 0
    evaluations = _evaluations(setup)(setup, writer, workdir) if config.evaluate else None
    if start == 0 and evaluations:
        evaluations.run(state, 0)
    progress = Progress(setup.steps, start, config.batch_size, setup.flops_per_image())
    books = Books(config, ckpt, writer, progress, train_input)
    books.record = record
    preemption.watch_input(train_input)
    pending, profile = [], tuple(config.profile_steps)
    batches = iter(train_input)
    # The first step compiles (seconds to minutes) before the first progress line: say so.
    _say(f"training from step {start}; the first step compiles, then a line every {config.log_every} steps")

    for step in range(start, setup.steps):
        if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = next_batch(batches, books, step, state)
        if batch is None:
            break
        global_batch = parallel.global_batch({"image": batch["image"]}, mesh)
        state, metrics = setup.step(state, setup.teacher_params, global_batch)
        pending.append(metrics)
        done = step + 1
        if ids_file:
            ids_file.write(json.dumps({"step": done, "ids": [int(i) for i in batch["id"]]}) + "\n")
        if profile and done == profile[1]:
            jax.profiler.stop_trace()

        last = done == setup.steps
        if log_save_or_stop(books, preemption, state, done, last, pending):
            break
        if eval_every > 0 and done % eval_every == 0 and not last:
            evaluations.run(state, done)
    else:
        if evaluations:
            final = evaluations.run(state, int(state.step))
        if config.export_at_end:
            from dmt_jax import export

            path = os.path.join(workdir, "student_timm.safetensors")
            encoder = parallel.to_host(state.params["encoder"])  # every process: shards may span hosts
            if jax.process_index() == 0:
                heads = setup.student.encoder.num_heads
                cfg = export.timm_pretrained_cfg(config.img_size, crop_pct=config.data.eval_crop_fraction)
                export.export_timm(encoder, path, num_heads=heads, overwrite=True, pretrained_cfg=cfg)
                print(f"student exported for timm/PyTorch: {path}", flush=True)
    return final


def resume_or_start(setup, ckpt, train_source, workdir: str, fingerprints=()):
    """(state, train_input, record) of the newest checkpoint (its state and input position) or of a fresh
    start. A resume must continue the same run: run_record.check_resume refuses other `fingerprints`
    (content hashes of what the run reads, e.g. teachers) or changed training fields. config.json is
    written only after that check: a refused resume leaves the one of its checkpoints. The record is
    what every checkpoint stores (Books.record)."""
    config = setup.config
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored:
        state, data_item = restored
        _say(f"resuming from the checkpoint at step {int(state.step)} in {ckpt.directory}")
    else:
        state, data_item = setup.init_state(jax.random.PRNGKey(config.seed)), None
    start, num_examples = int(state.step), len(train_source)
    saved_record = (data_item or {}).get("record")
    changes = run_record.check_resume(saved_record, config, fingerprints, start, num_examples, ckpt.directory)
    if changes:
        _say(f"resuming with changed config fields: {'; '.join(changes)}")
    if jax.process_index() == 0:
        storage.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    train_input = data.make_train_input(
        config.data,
        train_source,
        global_batch=config.batch_size,
        img_size=setup.view_size or config.img_size,  # the largest teacher's or stage's size, agglomerative
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        step=start,
        saved_state=checkpoint.saved_input_state(data_item),
    )
    return state, train_input, run_record.make_record(config, fingerprints, num_examples)


def next_batch(batches, books, step: int, state):
    """The next training batch, or None when a stop was requested while waiting for it (SIGTERM / Ctrl-C
    while the input was slow or stuck; Preemption.watch_input): a checkpoint at `step` is then saved."""
    try:
        return next(batches)
    except data.StopRequested:
        books.save(step, state, must_succeed=True)
        _say(f"stop requested while waiting for input: checkpoint at step {step}; run again to resume")
        return None


def log_save_or_stop(books, preemption, state, done: int, last: bool, pending: list) -> bool:
    """After step `done`: logs (and empties) `pending` at a log step, checkpoints at a checkpoint step, the
    last step or a stop request; True when a stop was requested (its checkpoint saved, and said)."""
    config = books.config
    if done % config.log_every == 0 or last:
        books.log(done, jax.device_get(pending))  # the only host sync, once per log interval
        pending.clear()
    stop = preemption.should_stop(done)
    if done % config.checkpoint_every == 0 or last or stop:
        books.save(done, state, must_succeed=last or stop)
    if stop:
        _say(f"stop requested: checkpoint at step {done} saved; run again with the same workdir to resume")
    return stop


class _Evaluations:
    """run_eval and CKA at a step, to the console, TensorBoard and (one JSON line each) eval.jsonl; the
    PCA feature maps to TensorBoard's images and workdir/pictures/step_<N>.png."""

    def __init__(self, setup, writer, workdir: str):
        self.setup, self.writer, self.workdir = setup, writer, workdir
        self.path = os.path.join(workdir, "eval.jsonl")
        self.fns, self.cache = evaluate.make_eval_fns(setup), {}
        self.token_fn, self.sample = evaluate.make_token_fn(setup), None

    def run(self, state, step: int) -> dict[str, float]:
        if self.sample is None:  # the first evaluation also compiles its functions: say why it takes a while
            _say(f"evaluating at step {step}: k-NN, linear probe, alignment, CKA, PCA pictures")
        out = run_eval(self.setup, state, self.fns, self.cache, step)
        cka, patches = self._tokens(state)
        out.update({f"cka/teacher_{k}": float(v) for k, v in enumerate(cka)})
        _say(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(out.items())))
        if len(self.sample["pixels"]) and jax.process_index() == 0:
            titles = pictures.column_titles(len(patches) - 1)
            grid = pictures.pca_grid(self.sample["pixels"], patches, titles)
            pictures.save_png(grid, os.path.join(self.workdir, "pictures", f"step_{step}.png"))
            self.writer.write_images(step, {"pca_feature_maps": grid[None]})
        self.writer.write_scalars(step, out)
        if jax.process_index() == 0:
            storage.append_line(self.path, json.dumps({"step": step, **out}))
        return out

    def _tokens(self, state):
        """CKA per teacher on the first evaluation batch, and the patch tokens of its picture images."""
        cfg = self.setup.config
        if self.sample is None:  # the same images at every evaluation
            first = next(iter(eval_batches(cfg, self.cache, "knn_eval")))
            batch = parallel.global_batch({k: first[k] for k in ("image", "label", "valid")}, self.setup.mesh)
            pixels, labels, valid = parallel.to_host((batch["image"], batch["label"], batch["valid"]))
            rows = np.flatnonzero(valid)
            picked = rows[pictures.pick_images(labels[rows], cfg.pca_pictures)]
            self.sample = dict(batch, picked=picked, pixels=pixels[picked])
        s = self.sample
        args = (state.params, self.setup.teacher_params, s["image"], s["valid"], s["picked"])
        return parallel.to_host(self.token_fn(*args))


class Books:
    """What the loop writes down at log and checkpoint steps, and what it must remember between them."""

    def __init__(self, config, ckpt, writer, progress, train_input):
        self.config, self.ckpt, self.writer = config, ckpt, writer
        self.progress, self.input = progress, train_input
        self.skipped = 0  # non-finite steps so far (this session)
        self.record = None  # run_record.make_record: stored in every checkpoint

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
        """A periodic save is written in the background (async_checkpoints) while training goes on; if it
        fails, the next save says so and training goes on (that save retries). The last save, or a
        preemption's, is waited for and has no later one to retry: if it fails, the run stops with exit
        code 1."""
        if done in self.ckpt.steps():  # saved, or being saved, already: a stop right after a checkpoint
            saved = self.ckpt.finish() if must_succeed else True
        else:
            saved = self.ckpt.save(done, state, self.input.state(), self.record, wait=must_succeed)
        if not saved and must_succeed:
            # What to do depends on why (a full disk, a read-only directory), not on where it failed.
            error = self.ckpt.last_error
            fix = (errors.remedy(error) if error else "") or "fix the cause above"
            _fail(
                f"the checkpoint at step {done} could not be written (see above); newest checkpoint: "
                f"{self._newest()}. {fix[0].upper()}{fix[1:]} and run again to continue from it"
            )

    def _newest(self) -> str:
        self.ckpt.finish()  # a save still in flight counts once it is written
        steps = self.ckpt.steps()
        return f"step {steps[-1]} in {self.ckpt.directory}" if steps else "none yet"


def _evaluations(setup):
    """The evaluations of the run's objective: DMT's (teachers by index) or agglomerative (by name)."""
    return _AgglomerativeEvaluations if setup.targets is not None else _Evaluations


class _AgglomerativeEvaluations(_Evaluations):
    """An agglomerative run's evaluations, per teacher by name (evaluate.make_agglomerative_fns): the
    cosine of the student's summary and dense heads with the teacher's targets, k-NN and linear-probe
    top-1 on each of the student's summary tokens (and on each teacher's summary, once), the linear CKA
    with each teacher's dense targets of the student's adapted features and of its encoder, and the PCA
    pictures of every teacher and of the student's adapted features. A table at each evaluation; at the
    last, each figure before -> after."""

    def __init__(self, setup, writer, workdir: str):
        self.setup, self.writer, self.workdir = setup, writer, workdir
        self.path = os.path.join(workdir, "eval.jsonl")
        self.fns, self.cache, self.sample = evaluate.make_agglomerative_fns(setup), {}, None
        self.names = [t.name for t in setup.targets]

    def run(self, state, step: int) -> dict[str, float]:
        if self.sample is None:  # the first evaluation also compiles its functions: say why it takes a while
            _say(f"evaluating at step {step}: per teacher summary and dense cosine, k-NN, linear probe, CKA, "
                 "PCA pictures")  # fmt: skip
        out = self._scores(state)
        cka, patches = self._tokens(state)
        for name, (encoder, adapted) in zip(self.names, cka, strict=True):
            if np.isfinite(encoder):
                out[f"cka/{name}"], out[f"cka_adapted/{name}"] = float(encoder), float(adapted)
        _say("\n".join(agglomerative_table(out, self.names, step)))
        if step == self.setup.steps and (first := self._first_evaluation()) and first["step"] < step:
            _say("\n".join(agglomerative_before_after(first, out, self.names, step)))
        if len(self.sample["pixels"]) and jax.process_index() == 0:
            titles = ["input"]
            for t in self.setup.targets:
                titles += [t.name, f"S>{t.name}"] if t.dense_dim else [t.name]
            grid = pictures.pca_grid(self.sample["pixels"], patches, [*titles, "student"])
            pictures.save_png(grid, os.path.join(self.workdir, "pictures", f"step_{step}.png"))
            self.writer.write_images(step, {"pca_feature_maps": grid[None]})
        self.writer.write_scalars(step, out)
        if jax.process_index() == 0:
            storage.append_line(self.path, json.dumps({"step": step, **out}))
        return out

    def _batches(self, role: str):
        """An evaluation pass at the training views' size (each teacher resizes to its own, the student
        to its img_size), its source made once."""
        cfg = self.setup.config
        if role not in self.cache:
            self.cache[role] = data.make_source(cfg.data, role)
        return data.make_eval_input(
            cfg.data,
            self.cache[role],
            global_batch=evaluate.eval_batch_size(cfg.eval_batch_size, jax.device_count()),
            img_size=self.setup.view_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def _scores(self, state) -> dict[str, float]:
        cfg, mesh, fns, setup = self.setup.config, self.setup.mesh, self.fns, self.setup

        def scores(train_x, train_y, test_x, test_y, who: str) -> dict[str, float]:
            knn = evaluate.knn_top1(train_x, train_y, test_x, test_y, cfg.knn_k, cfg.knn_temperature)
            out = {f"knn_top1/{who}": knn}
            if cfg.linear_probe_steps > 0:
                top1 = evaluate.linear_probe_top1(train_x, train_y, test_x, test_y, cfg.linear_probe_steps)
                out[f"linear_probe_top1/{who}"] = top1
            return out

        def listed(x):
            return x if isinstance(x, list) else [x]

        out = {}
        s_train, y_train = evaluate.collect(fns["student"], self._batches("knn_train"), mesh, state.params)
        s_test, y_test = evaluate.collect(fns["student"], self._batches("knn_eval"), mesh, state.params)
        for name, a, b in zip(fns["summary_names"], listed(s_train), listed(s_test), strict=True):
            out.update(scores(a, y_train, b, y_test, f"student_{name}"))
        args = (state.params, state.stats, setup.teacher_params)
        (summary, dense, *t_test), _ = evaluate.collect(
            fns["agreement"], self._batches("knn_eval"), mesh, *args
        )
        for k, name in enumerate(self.names):
            if not np.isnan(summary[:, k]).all():
                out[f"summary_cosine/{name}"] = float(np.mean(summary[:, k]))
            if not np.isnan(dense[:, k]).all():
                out[f"dense_cosine/{name}"] = float(np.mean(dense[:, k]))
        if "teachers" not in self.cache:  # frozen: their scores never change
            (_, _, *t_train), _ = evaluate.collect(fns["agreement"], self._batches("knn_train"), mesh, *args)
            self.cache["teachers"] = {}
            for name, a, b in zip(self.names, t_train, t_test, strict=True):
                self.cache["teachers"].update(scores(a, y_train, b, y_test, f"teacher_{name}"))
        out.update(self.cache["teachers"])
        return out

    def _tokens(self, state):
        """CKA per teacher on the first evaluation batch, and the tokens of its pictures' images."""
        if self.sample is None:  # the same images at every evaluation
            first = next(iter(self._batches("knn_eval")))
            batch = parallel.global_batch({k: first[k] for k in ("image", "label", "valid")}, self.setup.mesh)
            pixels, labels, valid = parallel.to_host((batch["image"], batch["label"], batch["valid"]))
            rows = np.flatnonzero(valid)
            picked = rows[pictures.pick_images(labels[rows], self.setup.config.pca_pictures)]
            self.sample = dict(batch, picked=picked, pixels=pixels[picked])
        s = self.sample
        args = (state.params, state.stats, self.setup.teacher_params, s["image"], s["valid"], s["picked"])
        return parallel.to_host(self.fns["tokens"](*args))

    def _first_evaluation(self) -> dict | None:
        """The run's first evaluation (eval.jsonl's first line: step 0 unless evaluation was off then)."""
        path = storage.path(self.path)
        if jax.process_index() != 0 or not path.exists():
            return None
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        try:
            return json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            return None


def _figure(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# The columns of the agglomerative evaluation, per teacher NAME: (heading, metric, digits).
AGGLOMERATIVE_COLUMNS = (
    ("summary cos", "summary_cosine/{}", 3),
    ("dense cos", "dense_cosine/{}", 3),
    ("CKA heads", "cka_adapted/{}", 3),
    ("CKA encoder", "cka/{}", 3),
    ("k-NN", "knn_top1/student_{}", 1),
    ("probe", "linear_probe_top1/student_{}", 1),
)


def agglomerative_table(out: dict, names, step: int) -> list[str]:
    """An evaluation's figures, one row per teacher (see _AgglomerativeEvaluations); k-NN and probe as
    'student | teacher'."""
    lines = [
        f"eval at step {step}, per teacher: cosine of the student's summary and dense heads with the "
        "teacher's targets; linear CKA with its dense targets of the student's adapted features (heads) "
        "and of its encoder; k-NN and linear-probe top-1 % of the student's summary token for the teacher "
        "| of the teacher's summary (SAM: its mean token)",
        "  " + f"{'teacher':<10}" + "".join(f"{h:>13}" for h, _, _ in AGGLOMERATIVE_COLUMNS[:4])
        + f"{'k-NN':>16}{'probe':>16}",
    ]  # fmt: skip
    for n in names:
        row = f"  {n:<10}"
        for _, key, digits in AGGLOMERATIVE_COLUMNS[:4]:
            row += f"{_figure(out.get(key.format(n)), digits):>13}"
        for kind in ("knn_top1", "linear_probe_top1"):
            student, teacher = out.get(f"{kind}/student_{n}"), out.get(f"{kind}/teacher_{n}")
            pair = f"{_figure(student, 1)} | {_figure(teacher, 1)}"
            row += f"{pair:>16}"
        lines.append(row)
    return lines


def agglomerative_before_after(first: dict, last: dict, names, step: int) -> list[str]:
    """Each teacher's figures at the first evaluation -> the last: did the student come closer?"""
    lines = [f"agglomerative distillation, step {first['step']} -> {step}, per teacher (the student's):"]
    for n in names:
        parts = [
            f"{heading} {_figure(first.get(key.format(n)), digits)} -> {_figure(last[key.format(n)], digits)}"
            for heading, key, digits in AGGLOMERATIVE_COLUMNS
            if key.format(n) in last
        ]
        lines.append(f"  {n:<10} " + " | ".join(parts))
    return lines
