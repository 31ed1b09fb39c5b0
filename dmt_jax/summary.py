"""What a run will do, said in a few lines before it starts (printed by process 0)."""

from __future__ import annotations

import jax

from dmt_jax import train


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
    lines += [schedule_line(c, setup.steps, len(train_source)), devices_line(setup.mesh)]
    return "\n".join(lines)


def data_line(c, train_source) -> str:
    d = c.data
    where = {
        "demo": f"demo dataset in {d.demo_root}",
        "tfds": f"tfds {d.tfds_name}, split {d.train_split}",
        "folder": f"image folder {d.folder_train}",
    }[d.source]
    return f"data: {where}: {len(train_source):,} images, {train_source.num_classes} classes"


def schedule_line(c, steps: int, images: int) -> str:
    steps_per_epoch = images / c.batch_size
    warmup = train.warmup_steps(c, steps, steps_per_epoch)
    peak, epochs = c.base_lr * c.batch_size / 256, steps / steps_per_epoch
    return (
        f"schedule: {steps:,} steps of batch {c.batch_size} = {epochs:.4g} epochs; warmup "
        f"{warmup:,} step{'' if warmup == 1 else 's'}, then cosine from peak lr {peak:.3g} to {c.min_lr:g}"
    )


def devices_line(mesh) -> str:
    shape = dict(mesh.shape)
    kind = jax.devices()[0].device_kind
    return (
        f"devices: {jax.device_count()} x {kind} in {jax.process_count()} process(es); "
        f"mesh data={shape['data']} x fsdp={shape['fsdp']}"
    )
