"""The fine-tuning loop: lock, build, resume, train, evaluate, export (the step loop and everything
around it, shared with the distillation, is runner.py's)."""

from __future__ import annotations

import json
import os

import jax
from etils import epath

from dmt_jax import checkpoint, data, evaluate, parallel, runner
from dmt_jax.finetune.build import FinetuneSetup, build
from dmt_jax.finetune.model import EXPORT_NAME, export_classifier
from dmt_jax.runner import say


def finetune(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) a fine-tuning in workdir; returns the final evaluation (and the best top-1), or {}
    when stopped early. As the distillation (runner.py): the workdir is locked, a resume must continue the
    same run (same init, same training fields), a stop request is honoured while waiting for input."""
    return runner.with_workdir_lock(workdir, _finetune_locked, config, workdir)


def _finetune_locked(config, workdir: str) -> dict[str, float]:
    from clu import metric_writers

    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    train_source = data.make_source(config.data, "train")
    eval_sources = {"knn_eval": data.make_source(config.data, "knn_eval")}  # a missing split fails early
    num_classes = config.num_classes if config.num_classes > 0 else train_source.num_classes
    setup = build(config, mesh, len(train_source), num_classes)
    parallel.local_batch_size(config.batch_size)
    ckpt = checkpoint.for_run(workdir, config)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    preemption = runner.Preemption(agree_every=config.log_every)
    try:
        return _finetune(setup, ckpt, writer, preemption, train_source, eval_sources, workdir)
    finally:
        preemption.close()
        writer.flush()
        ckpt.close()


def _finetune(setup, ckpt, writer, preemption, train_source, eval_sources, workdir) -> dict[str, float]:
    config, mesh = setup.config, setup.mesh
    # The init is a config field: a resume from another one is refused, named (init: 'a' -> 'b').
    state, train_input, record = runner.resume_or_start(setup, ckpt, train_source, workdir)
    start = int(state.step)
    if start == 0 and config.init:
        say(f"fine-tuning from {config.init}")
    progress = runner.StepProgress(setup.steps, start, config.batch_size, setup.flops_per_image)
    books = runner.Books(config, ckpt, writer, progress, train_input)
    books.record = record
    preemption.watch_input(train_input)
    evals = _Evaluations(setup, writer, workdir, eval_sources)

    def train_step(state, batch):
        return setup.step(state, parallel.global_batch({k: batch[k] for k in ("image", "label")}, mesh))

    state, finished = runner.run_steps(
        state,
        iter(train_input),
        books,
        preemption,
        start=start,
        total=setup.steps,
        train_step=train_step,
        evaluate=evals.run,
        eval_every=config.eval_every,
        workdir=workdir,
    )
    if not finished:
        return {}
    final = evals.run(state, int(state.step))
    if config.export_at_end:
        params = parallel.to_host(state.params)
        if jax.process_index() == 0:
            path = os.path.join(workdir, EXPORT_NAME)
            export_classifier(
                setup.model,
                params,
                path,
                img_size=config.img_size,
                mean=setup.mean,
                std=setup.std,
                crop_pct=config.data.eval_crop_fraction,
            )
            print(f"classifier exported for timm/PyTorch: {path}", flush=True)
    return final


def top1_top5(setup: FinetuneSetup, params, sources: dict) -> dict[str, float]:
    """On the validation split (runner.eval_batches' role 'knn_eval'; `sources` caches its source)."""
    batches = runner.eval_batches(setup.config, sources, "knn_eval")
    top5, labels = evaluate.collect(setup.predict, batches, setup.mesh, params)
    hits = top5 == labels[:, None]
    return {"top1": 100.0 * float(hits[:, 0].mean()), "top5": 100.0 * float(hits.any(axis=1).mean())}


class _Evaluations:
    """top-1/top-5 on the validation split (and of the EMA weights), to TensorBoard and eval.jsonl; the
    best top-1 so far and its step are kept in eval.jsonl's lines (read back on resume)."""

    def __init__(self, setup, writer, workdir: str, sources: dict):
        self.setup, self.writer, self.sources = setup, writer, sources
        self.path = os.path.join(workdir, "eval.jsonl")
        self.best = (-1.0, 0)
        if os.path.exists(self.path):
            for line in epath.Path(self.path).read_text().splitlines():
                entry = json.loads(line)
                self.best = max(self.best, (entry["top1"], entry["step"]))

    def run(self, state, step: int) -> dict[str, float]:
        out = top1_top5(self.setup, state.params, self.sources)
        if self.setup.config.ema_decay > 0:
            out.update({f"ema_{k}": v for k, v in top1_top5(self.setup, state.ema, self.sources).items()})
        self.best = max(self.best, (out["top1"], step))
        out["best_top1"], out["best_step"] = self.best
        self.writer.write_scalars(step, out)
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **out}) + "\n")
            print(f"eval at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
        return out
