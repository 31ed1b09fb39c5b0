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
import stat
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
    if unreachable := _unless_fields_are_bad(bucket_problems, config, problems, workdir):
        raise UserError(*problems, *unreachable)  # the checks of files there would wait on it too
    problems += _unless_fields_are_bad(dataset_problems, config, problems)
    problems += _unless_fields_are_bad(teacher_problems, config, problems)
    problems += workdir_problems(workdir)
    if problems:
        raise UserError(*problems)


def _unless_fields_are_bad(check, config, problems: list[str], *args) -> list[str]:
    """check(config, *args); a check that trips over a value of the wrong type (`--config.teachers=(1,2)`)
    says nothing more when that field's own problem is already reported."""
    try:
        return check(config, *args)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        if not problems:
            raise  # sound fields: a bug in a check
        return []


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


def bucket_problems(
    config, workdir: str, fields=("teachers", "data.tfds_data_dir", "init"), timeout: float | None = None
) -> list[str]:
    """Every bucket the run names (workdir, teachers, tfds data, a fine-tuning's init) answers within
    storage.REACH_TIMEOUT_S, or one line each naming it and what to check."""
    paths = {"--workdir": workdir}
    for name in fields:
        node = config
        for part in name.split("."):
            node = node.get(part) if node is not None and part in node else None
        values = node if isinstance(node, list | tuple) else [node]
        for i, value in enumerate(v for v in values if isinstance(v, str) and v):
            paths[f"--config.{name}" + (f"[{i}]" if isinstance(node, list | tuple) else "")] = value
    return storage.unreachable_buckets(paths, storage.REACH_TIMEOUT_S if timeout is None else timeout)


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


# What a run writes in its workdir (README, "The workdir"): none of them may be a symbolic link.
WORKDIR_ENTRIES = (
    ".dmt_lock", "checkpoints", "checkpoints_unreadable", "config.json", "schedule.json", "eval.jsonl",
    "pictures", "profile", "report.html", "student_timm.safetensors", "classifier_timm.safetensors",
)  # fmt: skip


def workdir_problems(workdir: str) -> list[str]:
    """The workdir's name is usable, it is a directory (or can be made one) that this process can write,
    and so are its checkpoints (checked by creating and removing a temporary file); nothing a run writes
    there is a symbolic link or a special file (local paths; a gs:// bucket is checked by its first write)."""
    try:
        resolved = storage.resolve(workdir, "--workdir")
    except UserError as e:
        return e.problems
    if storage.is_remote(resolved):
        return []
    path = epath.Path(resolved)
    if path.exists() and not path.is_dir():
        return [f"--workdir={workdir} is a file, not a directory: choose another --workdir"]
    if in_the_way := _links_or_special_files(resolved, WORKDIR_ENTRIES):
        return [
            f"--workdir={workdir} holds symbolic links or special files where the run writes "
            f"({', '.join(in_the_way[:3])}): runs never write through a link (it may point out of the "
            "workdir) nor into a FIFO or device; remove them"
        ]
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"--workdir={workdir} cannot be created: {existing} is a file"]
    problems = [_not_writable(existing, workdir)]
    if (path / "checkpoints").is_dir():
        problems.append(_not_writable(path / "checkpoints", workdir))
    return [p for p in problems if p]


def _links_or_special_files(folder: str, names) -> list[str]:
    found = []
    for name in names:
        try:
            mode = os.lstat(os.path.join(folder, name)).st_mode
        except OSError:  # absent (or the folder is): nothing in the way
            continue
        if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            found.append(os.path.join(folder, name))
    return found


def _not_writable(folder: epath.Path, workdir: str) -> str:
    try:
        fd, probe = tempfile.mkstemp(prefix=".dmt_write_probe-", dir=os.fspath(folder))
        os.close(fd)
        os.remove(probe)
        return ""
    except OSError as e:
        from dmt_jax.errors import os_error_message

        return f"--workdir={workdir} is not writable ({os_error_message(e)})"
