"""What a checkpoint was trained with, and the check that a resume continues the same run.

Every checkpoint stores a record (in its JSON data item, dmt_jax/checkpoint.py): the kind of run
(distillation or fine-tuning), the content hash of each teacher (teachers.fingerprint: spec +
parameters), the resolved config and the values resolved from the data (the fine-tuning's classes).
On resume the current run is compared with it, before any array is read (runner.resume_or_start):
- a run of the other kind (a fine-tuning pointed at a distillation's workdir, or the reverse) is
  refused in one line;
- other teachers (by content, wherever their folders are), or a changed field that shapes training
  (model, objective, data, optimizer, schedule) is refused with every difference named, unless
  --config.resume_allow_changes=True; a changed schedule also names the lr jump at the resumed step;
  a change of the arrays' shapes (STRUCTURAL: the model, the classes, the heads) cannot be resumed
  even then;
- fields that only change bookkeeping (HARMLESS: logging, evaluation, checkpoint cadence, parallel
  layout, input threads, where files live) are allowed and listed.
"""

from __future__ import annotations

import json

from dmt_jax.errors import UserError

# Fields (or groups, ending in '.') whose change leaves the trained model and its data stream alone.
HARMLESS = (
    "log_every", "eval_every", "evaluate", "knn_k", "knn_temperature", "linear_probe_epochs",
    "linear_probe_batch_size", "eval_batch_size", "log_example_ids", "export_at_end", "profile_steps",
    "checkpoint_every",
    "keep_checkpoints", "async_checkpoints", "resume_allow_changes", "mesh.", "distributed.",
    "fsdp_min_size", "remat", "attention",
    "teachers",  # teacher folders may move: their content is compared by hash instead
    "allow_duplicate_teachers",  # the teachers themselves are compared by hash
    "data.threads", "data.num_parallel", "data.prefetch", "data.folder_eval", "data.folder_knn_train",
    "data.knn_train_split", "data.knn_eval_split", "data.eval_crop_fraction", "data.demo_per_class_val",
    "data.tfds_data_dir", "data.demo_root", "data.max_image_pixels", "data.max_unreadable_in_a_row",
    "compilation_cache_dir",
)  # fmt: skip
# Fields (or groups) whose change gives the train state other arrays: no checkpoint of the old run restores.
STRUCTURAL = (
    "img_size", "student.variant", "student.pos_embed", "student.num_reg_tokens", "student.layerscale_init",
    "head", "head_mlp_ratio", "model.variant", "model.pos_embed", "model.num_reg_tokens",
    "model.layerscale_init", "model.global_pool", "num_classes", "ema_decay", "grad_clip",
)  # fmt: skip
KINDS = {"distillation": "python -m dmt_jax.main", "fine-tuning": "python -m dmt_jax.finetune"}
# Fields of the learning-rate schedule: a change is named with the lr it makes at the resumed step.
SCHEDULE = ("base_lr", "batch_size", "min_lr", "epochs", "total_steps", "warmup_epochs", "warmup_steps")


class ResumeRefused(UserError):
    """The workdir's checkpoint was trained with other teachers or another config."""


def make_record(
    config,
    teacher_fingerprints,
    num_train_examples: int | None = None,
    kind: str = "distillation",
    **resolved,
) -> dict:
    """`resolved`: values the run derives from its data (e.g. num_classes=10), compared as fields."""
    return {
        "kind": kind,
        "teachers": list(teacher_fingerprints),
        "config": json.loads(config.to_json_best_effort()),
        "num_train_examples": num_train_examples,  # a dataset that grew changes the example stream
        "resolved": resolved,
    }


def kind_of(record: dict) -> str:
    """The kind of run a record describes (records written before kinds existed: by their fields)."""
    if record.get("kind") in KINDS:
        return record["kind"]
    return "fine-tuning" if "init" in record.get("config", {}) else "distillation"


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _matches(name: str, names) -> bool:
    return any(name == h or (h.endswith(".") and name.startswith(h)) for h in names)


def _harmless(name: str) -> bool:
    return _matches(name, HARMLESS)


def structural(line: str) -> bool:
    """True for a difference line (of `differences`) that changes the train state's arrays."""
    name = line.split(":", 1)[0]
    return _matches(name, STRUCTURAL) or name == "teachers"  # their number: one head each


def differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(changes that alter training, harmless changes), one 'what: old -> new' line each."""
    blocking, harmless = [], []
    old_t, new_t = saved.get("teachers", []), current["teachers"]
    if len(old_t) != len(new_t):
        blocking.append(f"teachers: {len(old_t)} in the checkpoint, {len(new_t)} now")
    else:
        blocking += [
            f"teacher {k}: other weights or spec (content hash {a[:12]} in the checkpoint, {b[:12]} now)"
            for k, (a, b) in enumerate(zip(old_t, new_t, strict=True))
            if a != b
        ]
    old_n, new_n = saved.get("num_train_examples"), current.get("num_train_examples")
    if old_n is not None and new_n is not None and old_n != new_n:
        blocking.append(f"training images: {old_n} -> {new_n}")
    old_c, new_c = _flat(saved.get("config", {})), _flat(current["config"])
    # Values resolved from the data (num_classes when the config says -1) count as the fields they resolve.
    old_c.update(saved.get("resolved") or {})
    new_c.update(current.get("resolved") or {})
    for name in sorted(set(old_c) | set(new_c)):
        if old_c.get(name, "(absent)") != new_c.get(name, "(absent)"):
            line = f"{name}: {old_c.get(name, '(absent)')!r} -> {new_c.get(name, '(absent)')!r}"
            # A field only one side has: the code's schema changed between the runs, not the run.
            schema_change = name not in old_c or name not in new_c
            (harmless if _harmless(name) or schema_change else blocking).append(line)
    return blocking, harmless


def lr_jump(saved_config: dict, config, step: int, num_examples: int | None) -> str:
    """'lr at step S: a -> b' when the schedule fields changed, else ''."""
    import ml_collections as mc

    from dmt_jax import train

    if all(saved_config.get(f) == config[f] for f in SCHEDULE):
        return ""

    def lr(c) -> float:
        steps = train.total_steps(c, num_examples)
        per_epoch = num_examples / c.batch_size if num_examples else 1.0
        return float(train.lr_schedule(c, steps, per_epoch)(step))

    try:
        old = lr(mc.ConfigDict(saved_config))
    except (KeyError, AttributeError, TypeError, ValueError):  # a record of an older schema
        return ""
    return f"lr at step {step} jumps from {old:.3g} to {lr(config):.3g}"


def check_resume(saved: dict | None, current: dict, config, step: int, where: str) -> list[str]:
    """Raises ResumeRefused naming the differences between the `saved` record and the `current` one
    (make_record); returns the harmless ones (and the allowed ones under resume_allow_changes) for the
    loop to print. A checkpoint without a record passes."""
    if not isinstance(saved, dict) or not saved:  # a checkpoint written before records existed
        return []
    kind, saved_kind = current["kind"], kind_of(saved)
    if saved_kind != kind:
        workdir = str(where).removesuffix("/checkpoints")
        hint = " (to fine-tune its student, pass it as --config.init)" if kind == "fine-tuning" else ""
        raise ResumeRefused(
            f"--workdir={workdir} holds the checkpoints of a {saved_kind} ({KINDS[saved_kind]}), not of a "
            f"{kind}: choose another --workdir{hint}"
        )
    num_examples = current.get("num_train_examples")
    blocking, harmless = differences(saved, current)
    if blocking:
        jump = lr_jump(saved.get("config", {}), config, step, num_examples)
        blocking += [jump] if jump else []
        shapes = [line for line in blocking if structural(line)]
        if shapes or not config.resume_allow_changes:
            allowed = "" if shapes else ", or pass --config.resume_allow_changes=True if the change is meant"
            why = "; its arrays have other shapes, so it cannot be resumed" if shapes else ""
            raise ResumeRefused(
                f"refusing to resume the checkpoint at step {step} in {where}: this run differs from the one "
                f"that wrote it: {'; '.join(blocking)}{why}. Use another --workdir{allowed}"
            )
    return blocking + harmless
