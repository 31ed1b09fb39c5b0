"""What a training loop needs around its step, written once for the distillation (loop.py) and the
fine-tuning (finetune/loop.py): the workdir lock, the resume (or fresh start) with its run-record
check, preemption (SIGTERM / Ctrl-C), the books kept at log and checkpoint steps, the progress line,
and the step loop itself (run_steps).

A loop built on it reads: lock the workdir, build the setup, resume_or_start, then
`run_steps(state, batches, books, preemption, train_step=..., evaluate=...)`, then its final
evaluation and export. Everything a stop request, a failed save or a resume does is here.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
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
    run_record,
    storage,
    summary,
    workdir_lock,
)


class StopRequested(Exception):
    """A stop was requested between two batches of an evaluation (Stoppable): the loop checkpoints, ends."""


class Preemption:
    """SIGTERM / SIGINT ask the loop to checkpoint at the current step and exit 0.

    One process: the signal sets a flag that the loop reads after each step. Several processes must
    stop at the same step. JAX's preemption service (started by jax.distributed.initialize) catches
    SIGTERM on any process and agrees on a step through the coordination service, with no host sync
    per step; a SIGINT is handed to it as a SIGTERM. Should that service be off, the flags are
    all-gathered every `agree_every` steps instead (a tiny collective at the log interval, where the
    loop waits for the device anyway).

    Between steps, where a stop must not wait for the next step (the batches of an evaluation), every
    process looks at its flag or, under JAX's service, at the notice the service posts in the
    coordination service's key-value store, and the processes agree (stop_now).
    """

    active: Preemption | None = None  # the one whose handlers are installed (signals are per process)

    def __init__(self, agree_every: int):
        self.multi = jax.process_count() > 1
        self.jax_service = self.multi and parallel.preemption_service_running()
        self.agree_every = max(1, agree_every)
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGTERM and self.jax_service:
                continue  # JAX's notifier owns SIGTERM
            self._previous[sig] = signal.signal(sig, self._handler)
        Preemption.active = self

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

    def stop_now(self) -> bool:
        """Whether a stop was requested on any process, agreed now (every process calls it at the same
        point: a collective when there are several)."""
        local = self.requested or (self.jax_service and _jax_preemption_notice())
        return _on_any_process(local) if self.multi else local

    def watch_input(self, train_input):
        """A wait for input ends in data.StopRequested once a stop is requested (see next_batch). Not with
        several processes: they must stop at one agreed step, so they wait for input."""
        if not self.multi:
            train_input.stop_requested = lambda: self.requested

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if Preemption.active is self:
            Preemption.active = None


# The key JAX's preemption service sets in the coordination service when any process got SIGTERM (TSL's
# preemption_sync_manager.cc, kPreemptionNoticeKey).
_JAX_PREEMPTION_NOTICE = "RECEIVED_PREEMPTION_NOTICE"


def _jax_preemption_notice() -> bool:
    try:
        from jax._src import distributed

        client = distributed.global_state.client
        return client is not None and client.key_value_try_get(_JAX_PREEMPTION_NOTICE) is not None
    except Exception:  # noqa: BLE001 - not set (NOT_FOUND), or a jax without this API: no notice
        return False


def _on_any_process(flag: bool) -> bool:
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).sum())


def say(msg: str):
    """One line on the console, from process 0."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def fail(msg: str):
    """Stops the run with exit code 1 and one line; every process reaches this at the same step."""
    if jax.process_index() == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


class StepProgress:
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


def eval_batches(cfg, cache: dict, role: str, img_size: int = 0):
    """One evaluation pass over a split role ('knn_train', 'knn_eval') at img_size (0: the student's;
    an agglomerative run's views are its training views' size); its source is made once, in cache.
    A stop request ends it between two batches (Stoppable)."""
    if role not in cache:
        cache[role] = data.make_source(cfg.data, role)
    return Stoppable(_eval_input(cfg, cache[role], img_size or cfg.img_size))


class Stoppable:
    """Batches that end in StopRequested once a stop is requested (Preemption.stop_now, checked before
    each batch, agreed by every process): an evaluation then stops within a batch of the request."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            preemption = Preemption.active
            if preemption is not None and preemption.stop_now():
                raise StopRequested
            yield batch


def _eval_input(cfg, source, img_size: int):
    return data.make_eval_input(
        cfg.data,
        source,
        global_batch=evaluate.eval_batch_size(cfg.eval_batch_size, jax.device_count()),
        img_size=img_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def with_workdir_lock(workdir: str, run, *args):
    """run(*args) holding the workdir's lock, taken before anything else is written: a second run on this
    workdir would replace this one's files. Process 0 takes it (workdir_lock.py) and every process learns
    the outcome, so a refusal stops every process with the same line (exit 2) and none writes a file."""
    lock, refusal = None, ""
    if jax.process_index() == 0:
        try:
            lock = workdir_lock.WorkdirLock(storage.path(workdir)).acquire()
        except errors.UserError as e:
            refusal = str(e)
    refusal = _from_process_0(refusal)
    if refusal:
        raise workdir_lock.WorkdirLocked(refusal)
    try:
        return run(*args)
    finally:
        if lock:
            lock.release()


def _from_process_0(text: str, size: int = 4096) -> str:
    """Process 0's `text` on every process (a collective; every process calls it)."""
    if jax.process_count() == 1:
        return text
    buffer = np.zeros(size, np.uint8)
    encoded = text.encode()[:size]
    buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
    return bytes(received).rstrip(b"\0").decode(errors="replace")


class Session:
    """What a run holds while it trains, opened once its workdir is locked and closed however it ends: the
    preemption handler (first, so that a stop request during the setup is honoured), the checkpoints,
    and, once a resume is accepted, the TensorBoard writer (a refused resume leaves no events file) and
    the books. Both loops:

        with runner.Session(config, workdir) as run:
            state, train_input = run.start(setup, train_source, kind=..., describe=...)
            state, finished = run.steps(state, train_input, total=..., train_step=..., evaluate=...)
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.preemption = Preemption(agree_every=config.log_every)
        self.ckpt = checkpoint.for_run(workdir, config)
        self.events = self.writer = self.books = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, error, traceback):
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        if interrupted:  # a second Ctrl-C: end now, without waiting for a save in flight
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.preemption.close()
        if self.writer is not None:
            self.writer.flush()
            self.events.close()
        if interrupted:
            self.ckpt.abort()
        else:
            self.ckpt.close()

    def evaluate(self, evaluate, state, step: int):
        """An evaluation outside the step loop (at step 0, or the final one): (its result, stopped); stopped
        when a stop was requested during it (the checkpoint at `step` saved, and said)."""
        return evaluate_or_stop(evaluate, state, step, self.books)

    def start(self, setup, train_source, *, kind: str, flops_per_image: float, fingerprints=(), describe=None,
              resolved=None):  # fmt: skip
        """resume_or_start, then the writer, the books and the progress line; (state, train_input)."""
        from clu import metric_writers  # imports TensorFlow's summary writer: kept out of the step's path

        state, train_input, record = resume_or_start(
            setup, self.ckpt, train_source, self.workdir, fingerprints, kind=kind, describe=describe,
            resolved=resolved,
        )  # fmt: skip
        self.events = storage.EventsDir(self.workdir)  # TensorFlow reaches a bucket, but not an emulated one
        self.writer = metric_writers.create_default_writer(
            self.events.local, just_logging=jax.process_index() > 0
        )
        progress = StepProgress(setup.steps, int(state.step), self.config.batch_size, flops_per_image)
        self.books = Books(self.config, self.ckpt, self.writer, progress, train_input)
        self.books.record = record
        self.preemption.watch_input(train_input)
        return state, train_input

    def steps(self, state, train_input, **kwargs):
        """run_steps with this session's books and preemption; (state, finished)."""
        return run_steps(
            state, iter(train_input), self.books, self.preemption, workdir=self.workdir, **kwargs
        )


def resume_or_start(
    setup, ckpt, train_source, workdir: str, fingerprints=(), *, kind: str, describe=None, resolved=None
):
    """(state, train_input, record) of the newest checkpoint (its state and input position) or of a fresh
    start. A resume must continue the same run: before any array is read, run_record.check_resume refuses
    a run of another kind, other `fingerprints` (content hashes of what the run reads, e.g. teachers) or
    changed training fields, `resolved` values (from the data) included. `describe()` (the run's summary)
    is said once the run is accepted. config.json is written only after that check: a refused resume
    leaves the one of its checkpoints. The record is what every checkpoint stores (Books.record)."""
    config = setup.config
    num_examples = len(train_source)
    record = run_record.make_record(config, fingerprints, num_examples, kind, **(resolved or {}))
    changes, said = [], []

    def accept(step: int, data: dict):
        changes[:] = run_record.check_resume((data or {}).get("record"), record, config, step, ckpt.directory)
        if describe and not said:
            say(describe())
            said.append(True)

    try:
        restored = ckpt.restore_latest(setup.abstract_state, check=accept)
    except checkpoint.RestoreFailed as e:
        if not changes:
            raise
        raise run_record.ResumeRefused(
            f"{e}: the changed fields ({'; '.join(changes)}) do not fit its arrays; use another --workdir"
        ) from None
    if restored:
        state, data_item = restored
        say(f"resuming from the checkpoint at step {int(state.step)} in {ckpt.directory}")
        if changes:
            say(f"resuming with changed config fields: {'; '.join(changes)}")
    else:
        accept(0, {})
        state, data_item = setup.init_state(jax.random.PRNGKey(config.seed)), None
    start = int(state.step)
    if jax.process_index() == 0:
        storage.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        resolved = dict(summary.schedule(setup, num_examples), started_at_step=start)  # for dmt-report
        storage.write_text(os.path.join(workdir, "schedule.json"), json.dumps(resolved, indent=2))
    view_size = getattr(setup, "view_size", None)  # agglomerative: the largest teacher's or stage's size
    train_input = data.make_train_input(
        config.data,
        train_source,
        global_batch=config.batch_size,
        img_size=view_size or config.img_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        step=start,
        saved_state=checkpoint.saved_input_state(data_item),
    )
    return state, train_input, record


def next_batch(batches, books, step: int, state):
    """The next training batch, or None when a stop was requested while waiting for it (SIGTERM / Ctrl-C
    while the input was slow or stuck; Preemption.watch_input): a checkpoint at `step` is then saved."""
    try:
        return next(batches)
    except data.StopRequested:
        books.save(step, state, must_succeed=True)
        say(f"stop requested while waiting for input: checkpoint at step {step}; run again to resume")
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
        say(f"stop requested: checkpoint at step {done} saved; run again with the same workdir to resume")
    return stop


def run_steps(
    state,
    batches,
    books,
    preemption,
    *,
    start: int,
    total: int,
    train_step,
    evaluate=None,
    eval_every: int = 0,
    on_batch=None,
    workdir: str = "",
):
    """Trains steps start..total: `train_step(state, batch) -> (state, metrics)` on each host batch, the
    books at log and checkpoint steps, `evaluate(state, done)` every `eval_every` steps (not at the last:
    the loop's final evaluation follows), `on_batch(done, batch)` after each step, a profile of the
    config's profile_steps. Returns (state, finished): finished is False when a stop was requested (its
    checkpoint saved and said). A stop is honoured after any step, while waiting for input, between the
    batches of an evaluation and, on one process, while the first step compiles."""
    profile, pending = tuple(books.config.profile_steps), []
    for step in range(start, total):
        if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = next_batch(batches, books, step, state)
        if batch is None:
            return state, False
        if step == start:
            outcome = first_step(train_step, state, batch, preemption)
            if outcome is None:
                where = f"the checkpoint at step {start}" if start in books.ckpt.steps() else "the start"
                say(f"stop requested while the first step compiled: nothing to save (resumes from {where})")
                return state, False
            state, metrics = outcome
        else:
            state, metrics = train_step(state, batch)
        pending.append(metrics)
        done = step + 1
        if on_batch:
            on_batch(done, batch)
        if profile and done == profile[1]:
            jax.profiler.stop_trace()
        last = done == total
        if log_save_or_stop(books, preemption, state, done, last, pending):
            return state, False
        due = evaluate and eval_every > 0 and done % eval_every == 0 and not last
        if due and evaluate_or_stop(evaluate, state, done, books)[1]:
            return state, False
    return state, True


_abandoned: list[threading.Thread] = []  # first steps left compiling by a stop: the process must end at once


def must_exit_now() -> bool:
    """True when a stop left a compile running in a thread: the process then ends with os._exit, since a
    normal exit would tear XLA down under it (dmt_jax.main does)."""
    return any(t.is_alive() for t in _abandoned)


def first_step(train_step, state, batch, preemption):
    """train_step(state, batch), or None when a stop was requested before it finished: it compiles (seconds
    on the demo, minutes on a pod) in a thread while the main thread watches for the request. Nothing was
    learned since the session's first state (its checkpoint, or the seed's init): nothing to save. With
    several processes the step runs as any other (they must stop at one agreed step)."""
    if preemption.multi:
        return train_step(state, batch)
    if preemption.requested:
        return None
    result: list = []

    def work():
        try:
            result.append((True, train_step(state, batch)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            result.append((False, e))

    thread = threading.Thread(target=work, daemon=True, name="dmt-first-step")
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if preemption.requested and thread.is_alive():
            _abandoned.append(thread)
            return None
    ok, value = result[0]
    if not ok:
        raise value
    return value


def evaluate_or_stop(evaluate, state, step: int, books):
    """(evaluate(state, step), False), or (None, True) when a stop was requested during it: the checkpoint
    at `step` is then saved (it may be already) and said."""
    try:
        return evaluate(state, step), False
    except StopRequested:
        books.save(step, state, must_succeed=True)
        say(
            f"stop requested during the evaluation at step {step}: checkpoint at step {step} saved; run again"
        )
        return None, True


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
            fail(
                f"non-finite loss at step {bad_steps[0]} (its update was not applied); last good checkpoint: "
                f"{self._newest()}. Lower base_lr, set grad_clip, or pass --config.nonfinite=skip to skip "
                "such steps"
            )
        self.skipped += len(bad_steps)
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        scalars["nonfinite_steps"] = float(len(bad_steps))
        scalars["nonfinite_steps_total"] = float(self.skipped)
        scalars["bad_images"] = float(sum_over_processes(self.input.state()["bad_images"]))
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
            fail(
                f"the checkpoint at step {done} could not be written (see above); newest checkpoint: "
                f"{self._newest()}. {fix[0].upper()}{fix[1:]} and run again to continue from it"
            )

    def _newest(self) -> str:
        self.ckpt.finish()  # a save still in flight counts once it is written
        steps = self.ckpt.steps()
        return f"step {steps[-1]} in {self.ckpt.directory}" if steps else "none yet"
