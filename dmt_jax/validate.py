"""The one validation pass of a run: every problem of the config, the devices, the dataset, the teachers
and the workdir, found before anything is built or written, reported together (UserError, exit 2).

    validate.check_run(config, workdir)   # raises UserError(problem, problem, ...) or returns

The checks of single fields and between fields live with the fields (dmt_jax/config.py); the checks
here look outside the config: the device count, the files the config names and the workdir. They are
cheap (no image is listed or decoded, no teacher weight is read): a run that passes may still meet a
broken file later, which then stops it with its own one-line error.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath

from dmt_jax import config as config_lib
from dmt_jax import storage
from dmt_jax.errors import UserError


def check_run(config, workdir: str, *, start_distributed: bool = True) -> None:
    """Raises UserError listing every problem of a distillation run, or returns.

    With `start_distributed`, joins the multi-process run first (when the distributed fields are sound),
    since the device count is known only then.
    """
    problems = config_problems(config)
    if not any(p.startswith("--config.distributed.") for p in problems):
        if start_distributed:
            from dmt_jax import parallel

            parallel.initialize_distributed(config.distributed)
        problems += device_problems(config)
    problems += dataset_problems(config)
    problems += teacher_problems(config)
    problems += workdir_problems(workdir)
    if problems:
        raise UserError(*problems)


def config_problems(
    config, schema=config_lib.BASE_SCHEMA, consistency=config_lib.consistency_problems
) -> list[str]:
    """Every field against its own range, then the fields against each other (no files, no devices).

    Another entry point passes its own schema and consistency checks (fine-tuning)."""
    problems = config_lib.field_problems(config, schema)
    try:  # reported together with the fields' own problems, which may trip a consistency check
        problems += consistency(config) if consistency else []
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        if not problems:
            raise  # sound fields: a bug in a check
    return problems


def device_problems(config) -> list[str]:
    import jax

    from dmt_jax import parallel

    problems = []
    n, processes = jax.device_count(), jax.process_count()
    mesh_fields_sound = not config_lib.field_problems(config.mesh, config_lib.BASE_SCHEMA["mesh"])
    try:
        if mesh_fields_sound:  # else their own problems are reported
            parallel.mesh_shape(config.mesh.data, config.mesh.fsdp, n)
    except UserError as e:
        problems += e.problems
    batch = config.batch_size
    if isinstance(batch, int) and batch > 0 and (batch % processes or batch % n):
        problems.append(
            f"--config.batch_size={batch} is not divisible by the {n} devices of {processes} process(es): "
            f"use a multiple of {n}"
        )
    return problems


def dataset_problems(config) -> list[str]:
    """The dataset exists (cheap, per source kind): folders hold class folders, tfds splits are prepared."""
    from dmt_jax import data

    roles = ("train", "knn_train", "knn_eval") if config.evaluate else ("train",)
    return data.dataset_problems(config.data, roles)


def teacher_problems(config) -> list[str]:
    """Every teacher entry parses, names a converted teacher (teachers.check_teacher_dir), fits the grid."""
    from dmt_jax import teachers, train

    grid = None
    if config.objective == "dmt" and not config_lib.vit_variant(config.student.variant):  # one grid for all
        from dmt_jax.models.vit import parse_variant

        grid = config.img_size // parse_variant(config.student.variant)["patch_size"]
    problems = []
    for named in (e for e in config.teachers if e):
        entry = config_lib.split_teacher_name(named)[1]
        try:
            generated = train.parse_teacher_entry(entry)
        except UserError as e:
            problems += e.problems
            continue
        if generated is None:  # a converted directory
            problems += teachers.check_teacher_dir(entry, grid=grid)
            continue
        _, _, variant, px, _ = generated
        if why := config_lib.vit_variant(variant):
            problems.append(f"teacher {entry!r}: the variant {why}")
        elif grid is not None:
            from dmt_jax.models.vit import parse_variant

            patch = parse_variant(variant)["patch_size"]
            if px % patch or px // patch != grid:
                problems.append(
                    f"teacher {entry!r} gives a {px / patch:g}x{px / patch:g} patch grid but the student has "
                    f"{grid}x{grid}: use {grid * patch} px"
                )
    return problems


def workdir_problems(workdir: str) -> list[str]:
    """The workdir is a directory (or can be made one) that this process can write, and so are its
    checkpoints; checked by creating and removing a temporary file (local paths; a gs:// bucket is
    checked by its first write)."""
    if storage.is_remote(workdir):
        return []
    path = storage.path(workdir)
    if path.exists() and not path.is_dir():
        return [f"--workdir={workdir} is a file, not a directory: choose another --workdir"]
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"--workdir={workdir} cannot be created: {existing} is a file"]
    problems = [_not_writable(existing, workdir)]
    if (path / "checkpoints").is_dir():
        problems.append(_not_writable(path / "checkpoints", workdir))
    return [p for p in problems if p]


def _not_writable(folder: epath.Path, workdir: str) -> str:
    try:
        fd, probe = tempfile.mkstemp(prefix=".dmt_write_probe-", dir=os.fspath(folder))
        os.close(fd)
        os.remove(probe)
        return ""
    except OSError as e:
        from dmt_jax.errors import os_error_message

        return f"--workdir={workdir} is not writable ({os_error_message(e)})"
