"""What a run will do, said in a few lines before it starts (printed by process 0)."""

from __future__ import annotations

import jax

from dmt_jax import train


def describe_run(setup, train_source) -> str:
    """Dataset, teachers, student, schedule (steps, epochs, warmup, peak lr), devices and mesh."""
    c, d = setup.config, setup.config.data
    images = len(train_source)
    where = {
        "demo": f"demo dataset in {d.demo_root}",
        "tfds": f"tfds {d.tfds_name}, split {d.train_split}",
        "folder": f"image folder {d.folder_train}",
    }[d.source]
    lines = [f"data: {where}: {images:,} images, {train_source.num_classes} classes"]
    entries = [e for e in c.teachers if e]
    for k, (entry, spec) in enumerate(zip(entries, setup.stack.specs, strict=True)):
        lines.append(
            f"teacher {k}: {spec.format} {spec.variant} at {spec.img_size} px, {spec.grid}x{spec.grid} grid "
            f"({entry})"
        )
    grid = c.img_size // setup.student.encoder.patch_size
    lines.append(
        f"student: {c.student.variant} at {c.img_size} px, {grid}x{grid} grid, mask ratio {c.mask_ratio}"
    )
    if setup.targets:  # agglomerative: what each teacher is distilled into
        for t in setup.targets:
            summary = f"summary {t.summary_head} x{t.summary_weight:g}" if t.summary_dim else "no summary"
            dense = f"dense {t.dense_head} x{t.dense_weight:g}" if t.dense_dim else "no dense target"
            lines.append(f"target {t.name}: {summary}, {dense}, norm {t.norm}")
        stages = ", ".join(f"{px} px from step {start}" for start, px in c.stages) or f"{c.img_size} px"
        lines.append(f"agglomerative: views of {setup.view_size} px; student at {stages}")
    steps_per_epoch = images / c.batch_size
    warmup = train.warmup_steps(c, setup.steps, steps_per_epoch)
    peak, epochs = c.base_lr * c.batch_size / 256, setup.steps / steps_per_epoch
    lines.append(
        f"schedule: {setup.steps:,} steps of batch {c.batch_size} = {epochs:.4g} epochs; warmup "
        f"{warmup:,} step{'' if warmup == 1 else 's'}, then cosine from peak lr {peak:.3g} to {c.min_lr:g}"
    )
    mesh = dict(setup.mesh.shape)
    kind = jax.devices()[0].device_kind
    lines.append(
        f"devices: {jax.device_count()} x {kind} in {jax.process_count()} process(es); "
        f"mesh data={mesh['data']} x fsdp={mesh['fsdp']}"
    )
    return "\n".join(lines)
