"""The fine-tuning loop: lock, build, resume, train, evaluate, export (the step loop and everything
around it, shared with the distillation, is runner.py's). Everything it reads and writes goes through
the storage layer, so the workdir and the init may be in a bucket."""

from __future__ import annotations

import json
import os

import jax

from dmt_jax import data, evaluate, parallel, runner, storage, summary
from dmt_jax.errors import UserError
from dmt_jax.finetune.build import FinetuneSetup, build
from dmt_jax.finetune.model import EXPORT_NAME, export_classifier
from dmt_jax.runner import say

EVAL_FILE = "eval.jsonl"
TOP5_MIN_CLASSES = 6  # with 5 classes or fewer every image is in its top 5: top-5 says nothing


def finetune(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) a fine-tuning in workdir; returns the final evaluation (and the best top-1), or {}
    when stopped early. As the distillation (runner.py): the workdir is locked, a resume must continue the
    same run (same init, same training fields), a stop request is honoured after any step, while waiting
    for input, during an evaluation and while the first step compiles."""
    workdir = storage.resolve(workdir, "--workdir")  # one form for every reader and writer (storage.py)
    return runner.with_workdir_lock(workdir, _finetune_locked, config, workdir)


def _finetune_locked(config, workdir: str) -> dict[str, float]:
    with runner.Session(config, workdir) as run:
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        train_source = data.make_source(config.data, "train")
        eval_sources = {"knn_eval": data.make_source(config.data, "knn_eval")}  # a missing split fails early
        num_classes = classes_of(config, train_source, eval_sources["knn_eval"])
        setup = build(config, mesh, len(train_source), num_classes)
        parallel.local_batch_size(config.batch_size)
        return _finetune(run, setup, train_source, eval_sources, workdir)


def classes_of(config, train_source, eval_source) -> int:
    """The classifier's classes: num_classes, or the training set's (-1); fewer than the labels need is
    refused. Classes of the validation split that training never shows are named (their top-1 is 0)."""
    found = train_source.num_classes
    if 0 < config.num_classes < found:
        raise UserError(
            f"--config.num_classes={config.num_classes} but the training data has {found} classes (labels up "
            f"to {found - 1}): set --config.num_classes={found}, or -1 for the data's"
        )
    train_labels, eval_labels = getattr(train_source, "labels", None), getattr(eval_source, "labels", None)
    if train_labels is not None and eval_labels is not None:
        unseen = sorted(set(eval_labels.tolist()) - set(train_labels.tolist()))
        if unseen:
            names = [eval_source.class_names[i] for i in unseen]
            say(
                f"warning: the validation split has {len(unseen)} class(es) with no training image: "
                f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''} (their images count as misses)"
            )
    return config.num_classes if config.num_classes > 0 else found


def describe_run(setup: FinetuneSetup, train_source) -> str:
    """Data, classes, model, where its weights come from, schedule, devices (summary.py's lines)."""
    c, enc = setup.config, setup.model.encoder
    grid = c.img_size // enc.patch_size
    pool = "mean of patch tokens + fc_norm" if c.model.global_pool == "avg" else "CLS token"
    if setup.pretrained:
        init = f"init: {c.init} ({setup.pretrained.source})"
    else:
        init = "init: random (--config.init is empty)"
    return "\n".join(
        [
            summary.data_line(c, train_source),
            f"model: ViT {c.model.variant} at {c.img_size} px, {grid}x{grid} grid, {pool}, "
            f"{setup.num_classes} classes",
            init,
            summary.describe_schedule(summary.schedule(setup, len(train_source))),
            summary.devices_line(setup.mesh),
        ]
    )


def _finetune(run, setup, train_source, eval_sources, workdir) -> dict[str, float]:
    config, mesh = setup.config, setup.mesh
    # The init is a config field: a resume from another one is refused, named (init: 'a' -> 'b').
    state, train_input = run.start(
        setup,
        train_source,
        kind="fine-tuning",
        flops_per_image=setup.flops_per_image,
        resolved={"num_classes": setup.num_classes},
        describe=lambda: describe_run(setup, train_source),
    )
    start = int(state.step)
    evals = _Evaluations(setup, run.writer, workdir, eval_sources, start)
    say(f"training from step {start}; the first step compiles, then a line every {config.log_every} steps")

    def train_step(state, batch):
        return setup.step(state, parallel.global_batch({k: batch[k] for k in ("image", "label")}, mesh))

    state, finished = run.steps(
        state,
        train_input,
        start=start,
        total=setup.steps,
        train_step=train_step,
        evaluate=evals.run,
        eval_every=config.eval_every,
    )
    if not finished:
        return {}
    final, stopped = run.evaluate(evals.run, state, int(state.step))
    if stopped:  # the last checkpoint is saved: a run again evaluates and exports
        return {}
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
    """On the validation split (runner.eval_batches' role 'knn_eval'; `sources` caches its source); top-5
    only with more than 5 classes."""
    batches = runner.eval_batches(setup.config, sources, "knn_eval")
    top5, labels = evaluate.collect(setup.predict, batches, setup.mesh, params)
    hits = top5 == labels[:, None]
    out = {"top1": 100.0 * float(hits[:, 0].mean())}
    if setup.num_classes >= TOP5_MIN_CLASSES:
        out["top5"] = 100.0 * float(hits.any(axis=1).mean())
    return out


def read_evaluations(path, upto: int) -> tuple[list[dict], bool]:
    """(the evaluations of eval.jsonl up to step `upto`, whether anything else was in it). A line a kill
    cut short, a line that is no evaluation, and evaluations past `upto` (steps a resume trains again)
    are left out."""
    if not path.exists():
        return [], False
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        evaluation = isinstance(entry, dict) and isinstance(entry.get("top1"), int | float)
        if evaluation and type(entry.get("step")) is int and entry["step"] <= upto:
            kept.append(entry)
    return kept, len(kept) != len(lines)


def _format(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


class _Evaluations:
    """top-1/top-5 on the validation split (and of the EMA weights), to TensorBoard and eval.jsonl; the
    best top-1 so far and its step are kept in eval.jsonl's lines (read back on resume, torn or later
    lines dropped and the file rewritten without them)."""

    def __init__(self, setup, writer, workdir: str, sources: dict, start: int):
        self.setup, self.writer, self.sources = setup, writer, sources
        self.path = storage.path(workdir) / EVAL_FILE
        kept, dropped = read_evaluations(self.path, upto=start)
        if dropped and jax.process_index() == 0:
            storage.write_text(self.path, "".join(json.dumps(e) + "\n" for e in kept))
        self.best = max(((e["top1"], e["step"]) for e in kept), default=(-1.0, 0))

    def run(self, state, step: int) -> dict:
        out = top1_top5(self.setup, state.params, self.sources)
        if self.setup.config.ema_decay > 0:
            out.update({f"ema_{k}": v for k, v in top1_top5(self.setup, state.ema, self.sources).items()})
        self.best = max(self.best, (out["top1"], step))
        out["best_top1"], out["best_step"] = self.best
        self.writer.write_scalars(step, out)
        if jax.process_index() == 0:
            storage.append_line(self.path, json.dumps({"step": step, **out}))
            say(f"eval at step {step}: " + ", ".join(f"{k} {_format(v)}" for k, v in out.items()))
        return out
