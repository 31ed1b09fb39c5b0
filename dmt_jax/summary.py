"""What a run will do, said in a few lines before it starts (printed by process 0)."""

from __future__ import annotations

# jax and train are imported where they are used: dmt-report reads describe_schedule without them.


def schedule(setup, train_images: int) -> dict:
    """The schedule as the run resolves it (epochs or total_steps, warmup_epochs or warmup_steps): what
    the start-up summary says and schedule.json records for dmt-report."""
    from dmt_jax import train

    c = setup.config
    steps_per_epoch = train_images / c.batch_size
    return {
        "steps": int(setup.steps),
        "batch_size": int(c.batch_size),
        "train_images": int(train_images),
        "epochs": setup.steps / steps_per_epoch,
        "warmup_steps": int(train.warmup_steps(c, setup.steps, steps_per_epoch)),
        "peak_lr": c.base_lr * c.batch_size / 256,
        "min_lr": float(c.min_lr),
    }


def describe_schedule(s: dict) -> str:
    warmup = s["warmup_steps"]
    return (
        f"schedule: {s['steps']:,} steps of batch {s['batch_size']} = {s['epochs']:.4g} epochs; warmup "
        f"{warmup:,} step{'' if warmup == 1 else 's'}, then cosine from peak lr {s['peak_lr']:.3g} to "
        f"{s['min_lr']:g}"
    )


def describe_run(setup, train_source) -> str:
    """Dataset, teachers, student, schedule (steps, epochs, warmup, peak lr), devices and mesh."""
    c = setup.config
    lines = [data_line(c, train_source)]
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
    lines += [describe_schedule(schedule(setup, len(train_source))), devices_line(setup.mesh)]
    return "\n".join(lines)


def data_line(c, train_source) -> str:
    """'data: WHERE: N images, K classes' (both entry points' summaries)."""
    d = c.data
    where = {
        "demo": f"demo dataset in {d.demo_root}",
        "tfds": f"tfds {d.tfds_name}, split {d.train_split}",
        "folder": f"image folder {d.folder_train}",
    }[d.source]
    return f"data: {where}: {len(train_source):,} images, {train_source.num_classes} classes"


def devices_line(mesh) -> str:
    """'devices: N x KIND in P process(es); mesh data=D x fsdp=F' (both entry points' summaries)."""
    import jax

    shape = dict(mesh.shape)
    kind = jax.devices()[0].device_kind
    return (
        f"devices: {jax.device_count()} x {kind} in {jax.process_count()} process(es); "
        f"mesh data={shape['data']} x fsdp={shape['fsdp']}"
    )
