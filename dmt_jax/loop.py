"""The distillation loop: resume, train, log, evaluate, checkpoint, stop cleanly on preemption.

Flat on purpose (big_vision style): read it top to bottom to know what a run does. What every loop
needs around its step (lock, resume, preemption, books, the step loop) is in runner.py.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dmt_jax import data, errors, evaluate, parallel, pictures, runner, storage, summary, train
from dmt_jax.runner import eval_batches, say


def _open_ids_log(workdir: str):
    """workdir/example_ids.p{process}.jsonl (a local workdir: a bucket object cannot be appended to line by
    line), appended to; a line cut short by a kill is dropped first.

    Line-buffered, so every step up to a checkpoint is on disk when the checkpoint is; a resumed
    run writes its steps again after it (the later line wins).
    """
    path = os.path.join(workdir, f"example_ids.p{jax.process_index()}.jsonl")
    fd = storage.open_local(path, os.O_RDWR | os.O_CREAT)  # never through a link, never a FIFO
    f = os.fdopen(fd, "r+b", buffering=0)
    text = f.read()
    if text and not text.endswith(b"\n"):
        f.truncate(text.rfind(b"\n") + 1)
    f.close()
    return os.fdopen(storage.open_local(path, os.O_WRONLY | os.O_APPEND), "a", buffering=1)


def run_eval(setup, state, fns, cache: dict, step: int) -> dict[str, float]:
    """k-NN and linear-probe top-1 of the student (and of each teacher, once), per-teacher alignment.
    The features stay sharded over the mesh (evaluate.Bank): no host or device holds a whole split."""
    cfg, mesh = setup.config, setup.mesh

    def batches(role):
        return eval_batches(cfg, cache, role)

    def banks(model, role, params):  # model: 'student' or 'teachers'
        what = f"{'k-NN bank' if role == 'knn_train' else 'k-NN queries'} ({model})"
        return evaluate.collect_banks(fns[model], batches(role), mesh, params, what=what)

    def scores(bank, queries, model):
        knn = evaluate.knn_top1(bank, queries, cfg.knn_k, cfg.knn_temperature, what=f"k-NN ({model})")
        out = {"knn_top1": knn}
        if cfg.linear_probe_epochs > 0:
            out["linear_probe_top1"] = evaluate.linear_probe_top1(
                bank,
                queries,
                cfg.linear_probe_epochs,
                cfg.linear_probe_batch_size,
                seed=cfg.seed,
                what=f"linear probe ({model})",
            )
        return out

    out = {}
    (bank,) = banks("student", "knn_train", state.params)
    (queries,) = banks("student", "knn_eval", state.params)
    out.update({f"{k}/student": v for k, v in scores(bank, queries, "student").items()})
    del bank, queries  # the device memory goes back before the teachers' banks are made
    if "teachers" not in cache:  # frozen: their scores never change
        cache["teachers"] = {}
        teacher_banks = banks("teachers", "knn_train", setup.teacher_params)
        teacher_queries = banks("teachers", "knn_eval", setup.teacher_params)
        for t, (bank, queries) in enumerate(zip(teacher_banks, teacher_queries, strict=True)):
            scored = scores(bank, queries, f"teacher_{t}")
            cache["teachers"].update({f"{k}/teacher_{t}": v for k, v in scored.items()})
        del teacher_banks, teacher_queries
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
    workdir = storage.resolve(workdir, "--workdir")  # one form for every reader and writer (storage.py)
    return runner.with_workdir_lock(workdir, _train_and_evaluate_locked, config, workdir)


def _use_compilation_cache(directory: str):
    """JAX's persistent compilation cache in `directory` ('' leaves JAX's setting alone). Set before the
    first compile: the demo's compiles (its teachers, step and evaluation) are then free on a rerun."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _train_and_evaluate_locked(config, workdir: str) -> dict[str, float]:
    if config.log_example_ids and storage.is_remote(workdir):  # before anything is built or written
        raise errors.UserError(
            f"--config.log_example_ids=True needs a local --workdir (got {workdir}); turn it off for a bucket"
        )
    with runner.Session(config, workdir) as run:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        train_source = data.make_source(config.data, "train")
        setup = train.build(config, mesh, num_train_examples=len(train_source))
        parallel.local_batch_size(config.batch_size)  # fails early, with a message, on an indivisible batch
        return _train(run, setup, train_source, workdir)


def _train(run, setup, train_source, workdir) -> dict[str, float]:
    config = setup.config
    # A resume must continue the same run: same teachers (by content), same training fields.
    state, train_input = run.start(
        setup,
        train_source,
        kind="distillation",
        fingerprints=setup.teacher_fingerprints,
        flops_per_image=setup.flops_per_image(),
        describe=lambda: summary.describe_run(setup, train_source),
    )
    ids_file = _open_ids_log(workdir) if config.log_example_ids else None  # once the resume is accepted
    try:
        return _train_steps(run, setup, state, train_input, ids_file, workdir)
    finally:
        if ids_file:
            ids_file.close()


def _train_steps(run, setup, state, train_input, ids_file, workdir) -> dict[str, float]:
    config, mesh = setup.config, setup.mesh
    start = int(state.step)

    final, eval_every = {}, config.eval_every if config.evaluate else 0
    evaluations = _evaluations(setup)(setup, run.writer, workdir) if config.evaluate else None
    if start == 0 and evaluations and run.evaluate(evaluations.run, state, 0)[1]:
        return final
    # The first step compiles (seconds to minutes) before the first progress line: say so.
    say(f"training from step {start}; the first step compiles, then a line every {config.log_every} steps")

    def train_step(state, batch):
        global_batch = parallel.global_batch({"image": batch["image"]}, mesh)
        return setup.step(state, setup.teacher_params, global_batch)

    def log_ids(done, batch):
        ids_file.write(json.dumps({"step": done, "ids": [int(i) for i in batch["id"]]}) + "\n")

    state, finished = run.steps(
        state,
        train_input,
        start=start,
        total=setup.steps,
        train_step=train_step,
        evaluate=evaluations.run if evaluations else None,
        eval_every=eval_every,
        on_batch=log_ids if ids_file else None,
    )
    if not finished:
        return final
    if evaluations:
        final, stopped = run.evaluate(evaluations.run, state, int(state.step))
        if stopped:
            return {}
    if config.export_at_end:
        from dmt_jax import export

        export.export_run(setup, state, workdir)
    return final


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
            say(f"evaluating at step {step}: k-NN, linear probe, alignment, CKA, PCA pictures")
        out = run_eval(self.setup, state, self.fns, self.cache, step)
        cka, patches = self._tokens(state)
        out.update({f"cka/teacher_{k}": float(v) for k, v in enumerate(cka)})
        say(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(out.items())))
        self._record(step, out, patches, pictures.column_titles(len(patches) - 1))
        return out

    def _record(self, step: int, out: dict, patches, titles: list[str]):
        """The PCA pictures (PNG and TensorBoard), the scalars, and eval.jsonl's line of this evaluation."""
        if len(self.sample["pixels"]) and jax.process_index() == 0:
            grid = pictures.pca_grid(self.sample["pixels"], patches, titles)
            pictures.save_png(grid, os.path.join(self.workdir, "pictures", f"step_{step}.png"))
            self.writer.write_images(step, {"pca_feature_maps": grid[None]})
        self.writer.write_scalars(step, out)
        if jax.process_index() == 0:
            storage.append_line(self.path, json.dumps({"step": step, **out}))

    def _batches(self, role: str):
        """An evaluation pass over a split role at the student's size."""
        return eval_batches(self.setup.config, self.cache, role)

    def _picture_sample(self) -> dict:
        """The first evaluation batch (for CKA) and the images of its pictures: the same at every
        evaluation, chosen at the first."""
        if self.sample is None:
            first = next(iter(self._batches("knn_eval")))
            batch = parallel.global_batch({k: first[k] for k in ("image", "label", "valid")}, self.setup.mesh)
            pixels, labels, valid = parallel.to_host((batch["image"], batch["label"], batch["valid"]))
            rows = np.flatnonzero(valid)
            picked = rows[pictures.pick_images(labels[rows], self.setup.config.pca_pictures)]
            self.sample = dict(batch, picked=picked, pixels=pixels[picked])
        return self.sample

    def _tokens(self, state):
        """CKA per teacher on the first evaluation batch, and the patch tokens of its picture images."""
        s = self._picture_sample()
        args = (state.params, self.setup.teacher_params, s["image"], s["valid"], s["picked"])
        return parallel.to_host(self.token_fn(*args))


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
            say(f"evaluating at step {step}: per teacher summary and dense cosine, k-NN, linear probe, CKA, "
                 "PCA pictures")  # fmt: skip
        out = self._scores(state)
        cka, patches = self._tokens(state)
        for name, (encoder, adapted) in zip(self.names, cka, strict=True):
            if np.isfinite(encoder):
                out[f"cka/{name}"], out[f"cka_adapted/{name}"] = float(encoder), float(adapted)
        say("\n".join(agglomerative_table(out, self.names, step)))
        if step == self.setup.steps and (first := self._first_evaluation()) and first["step"] < step:
            say("\n".join(agglomerative_before_after(first, out, self.names, step)))
        titles = ["input"]
        for t in self.setup.targets:
            titles += [t.name, f"S>{t.name}"] if t.dense_dim else [t.name]
        self._record(step, out, patches, [*titles, "student"])
        return out

    def _batches(self, role: str):
        """An evaluation pass at the training views' size (each teacher resizes to its own, the student
        to its img_size)."""
        return eval_batches(self.setup.config, self.cache, role, self.setup.view_size)

    def _scores(self, state) -> dict[str, float]:
        """k-NN and probe per summary token (features kept sharded: evaluate.Bank), summary and dense
        cosine per teacher; the teachers' own k-NN and probe once (frozen)."""
        cfg, mesh, fns, setup = self.setup.config, self.setup.mesh, self.fns, self.setup

        def scores(bank, queries, who: str) -> dict[str, float]:
            knn = evaluate.knn_top1(bank, queries, cfg.knn_k, cfg.knn_temperature, what=f"k-NN ({who})")
            out = {f"knn_top1/{who}": knn}
            if cfg.linear_probe_epochs > 0:
                out[f"linear_probe_top1/{who}"] = evaluate.linear_probe_top1(
                    bank,
                    queries,
                    cfg.linear_probe_epochs,
                    cfg.linear_probe_batch_size,
                    seed=cfg.seed,
                    what=f"linear probe ({who})",
                )
            return out

        def banks(fn, role: str, model: str, *args):
            what = f"{'k-NN bank' if role == 'knn_train' else 'k-NN queries'} ({model})"
            return evaluate.collect_banks(fn, self._batches(role), mesh, *args, what=what)

        out = {}
        s_banks = banks(fns["student"], "knn_train", "student", state.params)
        s_queries = banks(fns["student"], "knn_eval", "student", state.params)
        for name, bank, queries in zip(fns["summary_names"], s_banks, s_queries, strict=True):
            out.update(scores(bank, queries, f"student_{name}"))
        del s_banks, s_queries  # the device memory goes back before the teachers' banks are made
        args = (state.params, state.stats, setup.teacher_params)
        (summary, dense), _ = evaluate.collect(fns["agreement"], self._batches("knn_eval"), mesh, *args)
        for k, name in enumerate(self.names):
            if not np.isnan(summary[:, k]).all():
                out[f"summary_cosine/{name}"] = float(np.mean(summary[:, k]))
            if not np.isnan(dense[:, k]).all():
                out[f"dense_cosine/{name}"] = float(np.mean(dense[:, k]))
        if "teachers" not in self.cache:  # frozen: their scores never change
            t_banks = banks(fns["teachers"], "knn_train", "teachers", setup.teacher_params)
            t_queries = banks(fns["teachers"], "knn_eval", "teachers", setup.teacher_params)
            self.cache["teachers"] = {}
            for name, bank, queries in zip(self.names, t_banks, t_queries, strict=True):
                self.cache["teachers"].update(scores(bank, queries, f"teacher_{name}"))
            del t_banks, t_queries
        out.update(self.cache["teachers"])
        return out

    def _tokens(self, state):
        """CKA per teacher on the first evaluation batch, and the tokens of its pictures' images."""
        s = self._picture_sample()
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
