"""The one validation pass: every bad value is named before anything is built or written, all problems
at once, exit code 2; --help lists every field from the schema; only UserError becomes one line."""

import errno
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers_run import REPO, Run, cli_args, run_env

from dmt_jax import config as config_lib
from dmt_jax import errors, main, validate
from dmt_jax.errors import UserError
from dmt_jax.teachers import make_random_teacher, save_teacher


def good_config(**overrides):
    """A valid tiny config; overrides use '__' for '.' (data__source=...)."""
    c = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]()
    c.teachers = ("random:mu/4@32:1", "random:mu/8@64:2")
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# One bad value of every kind of check: (field, value, words of the message).
BAD_VALUES = [
    ("batch_size", 0, "> 0"),
    ("batch_size", -64, "> 0"),
    ("log_every", 0, "> 0"),
    ("checkpoint_every", 0, "> 0"),
    ("eval_batch_size", 0, "> 0"),
    ("keep_checkpoints", 0, ">= 1"),
    ("knn_k", 0, ">= 1"),
    ("knn_temperature", 0.0, "> 0"),
    ("linear_probe_epochs", -1, ">= 0"),
    ("loss", "l1", "one of"),
    ("head", "conv", "one of"),
    ("nonfinite", "ignore", "one of"),
    ("attention", "flash", "one of"),
    ("dtype", "float64", "one of"),
    ("teacher_dtype", "int8", "one of"),
    ("mask_ratio", 1.0, "[0, 1)"),
    ("mask_ratio", -0.1, "[0, 1)"),
    ("mask_ratio", float("nan"), "[0, 1)"),
    ("teacher_weights", (1.0, -1.0), "non-negative"),
    ("teacher_weights", (0.0, 0.0), "sum to 0"),
    ("teacher_weights", (1.0, float("inf")), "non-negative finite"),
    ("teacher_weights", (1.0,), "one per teacher"),
    ("base_lr", 0.0, "> 0"),
    ("base_lr", float("inf"), "> 0"),
    ("min_lr", -1.0, ">= 0"),
    ("min_lr", 1.0, "above the peak lr"),
    ("b2", 1.0, "[0, 1)"),
    ("weight_decay", -0.1, ">= 0"),
    ("epochs", 0.0, "> 0"),
    ("total_steps", 0, ">= 1 or -1"),
    ("warmup_steps", -2, ">= 0 or -1"),
    ("img_size", 30, "multiple of the student's patch size"),
    ("img_size", 0, "> 0"),
    ("student__variant", "XL/16", "NAME/PATCH"),
    ("student__drop_path", 1.0, "[0, 1)"),
    ("student__pos_embed", "rope", "one of"),
    ("cls_weight", 2.0, "< 0, or in [0, 1]"),
    ("smooth_l1_beta", 0.0, "> 0"),
    ("head_mlp_ratio", 0.0, "> 0"),
    ("mesh__data", 0, ">= 1 or -1"),
    ("fsdp_min_size", -1, ">= 0"),
    ("profile_steps", (5, 3), "first < last"),
    ("profile_steps", (1, 2, 3), "first < last"),
    ("profile_steps", (1700, 1900), "ends after total_steps"),
    ("teachers", ("",), "names no teacher"),
    ("distributed__coordinator_address", "localhost:1234", "num_processes >= 1"),
    ("distributed__num_processes", 0, ">= 1 or -1"),
    ("data__source", "s3", "one of"),
    ("data__source", "folder", "needs data.folder_train and data.folder_eval"),
    ("data__crop_scale", (0.5, 0.2), "a <= b"),
    ("data__crop_scale", (0.0, 1.0), "0 < a"),
    ("data__crop_ratio", (1.0,), "(a, b)"),
    ("data__eval_crop_fraction", 0.0, "(0, 1]"),
    ("data__prefetch", -1, ">= 0"),
    ("data__num_parallel", 0, ">= 1 or -1"),
    ("data__demo_num_classes", 0, ">= 1"),
    ("data__tfds_name", "", "non-empty"),
]


@pytest.mark.parametrize("field, value, words", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_every_bad_value_is_named(field, value, words):
    problems = validate.config_problems(good_config(**{field: value}))
    name = field.replace("__", ".")
    assert len(problems) == 1 and name in problems[0] and words in problems[0], problems


def test_problems_of_fields_and_between_fields_come_together():
    config = good_config(batch_size=0, teacher_weights=(1.0, 2.0, 3.0), mesh__data=0)
    problems = validate.config_problems(config) + validate.device_problems(config)
    # mesh.data=0 once, not again as a mesh that misses the devices
    assert [p.split(":")[0] for p in problems] == [
        "--config.batch_size=0",
        "--config.mesh.data=0",
        "--config.teacher_weights has 3 entries for 2 teachers",
    ], problems


def test_good_configs_and_recipes_pass():
    assert validate.config_problems(good_config()) == []
    for recipe in sorted((REPO / "configs").glob("*.py")):  # the recipes' own values are in range
        config = runpy.run_path(str(recipe))["get_config"]()
        schema = config_lib.BASE_SCHEMA if "teachers" in config else config_lib.FINETUNE_SCHEMA
        assert config_lib.field_problems(config, schema) == [], recipe


def test_devices_dataset_teachers_workdir(tmp_path):
    """The checks outside the config: 8 devices (conftest), the files named, the workdir."""
    teacher, random_teacher = tmp_path / "teacher16", make_random_teacher("mu/4", 64, seed=0)
    save_teacher(teacher, random_teacher.spec, random_teacher.params)  # a 16x16 grid
    broken = tmp_path / "broken"  # a spec.json that claims a depth of "two"
    save_teacher(broken, random_teacher.spec, random_teacher.params)
    (broken / "spec.json").write_text(
        (broken / "spec.json").read_text().replace('"depth": 2', '"depth": "two"')
    )
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    config = good_config(
        batch_size=12,  # not a multiple of the 8 devices
        mesh__data=3,
        teachers=(
            "random:mu/4@32:1",
            str(teacher),
            "random:mu/4@48:2",
            "random:mu@32:3",
            f"{tmp_path}/no",
            str(broken),
        ),
        data__source="folder",
        data__folder_train=str(tmp_path / "missing"),
        data__folder_eval=str(tmp_path / "empty"),
    )
    with pytest.raises(UserError) as error:
        validate.check_run(config, str(tmp_path / "afile" / "work"), start_distributed=False)
    problems = error.value.problems
    expected = [
        "mesh.data=3 x mesh.fsdp=1 does not use the 8 devices",
        "batch_size=12 is not divisible by the 8 devices",
        f"image folder {tmp_path / 'missing'} does not exist",
        f"image folder {tmp_path / 'empty'} has no class folders",
        f"teacher '{teacher}' has a 16x16 patch grid but the student has 8x8",
        "teacher 'random:mu/4@48:2' gives a 12x12 patch grid",
        "teacher 'random:mu@32:3': the variant must be NAME/PATCH",
        f"teacher '{tmp_path / 'no'}' does not exist: convert",
        f"teacher '{broken}': spec.json is not valid",
        "cannot be created",
    ]
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected, strict=True):
        assert words in problem, (words, problems)
    afile = str(tmp_path / "afile")
    assert validate.workdir_problems(afile) == [
        f"--workdir={afile} is a file, not a directory: choose another --workdir"
    ]
    assert validate.workdir_problems(str(tmp_path / "new" / "work")) == []
    assert not (tmp_path / "new").exists()


def test_all_problems_at_once_exit_2_and_nothing_written(tmp_path, monkeypatch):
    """Bad values, a missing dataset and a missing teacher: every one reported, one line each, exit 2."""
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)  # the entry point itself must quiet TF
    workdir = tmp_path / "work"
    args = cli_args(workdir, tmp_path / "demo", batch_size=0, loss="l1", mask_ratio=1.0)
    args += ["--config.teachers=('/nonexistent/mae',)", "--config.data.source=tfds"]
    args += [f"--config.data.tfds_data_dir={tmp_path / 'tfds'}"]
    run = Run(args)
    assert run.finish() == 2, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 5, run.output
    for words in ("batch_size=0", "loss='l1'", "mask_ratio=1.0", "tfds dataset imagenet2012 is not prepared",
                  "teacher '/nonexistent/mae' does not exist"):  # fmt: skip
        assert any(words in line for line in errors), (words, run.output)
    assert "Traceback" not in run.output
    assert not [
        line for line in run.lines if "oneDNN" in line or "absl::InitializeLog" in line
    ]  # TF is quiet
    assert not workdir.exists() and not (tmp_path / "demo").exists()  # nothing built or written


def test_help_lists_every_field_from_the_schema():
    fields = list(config_lib.schema_fields(config_lib.BASE_SCHEMA))
    assert all(spec.help.strip() and "\n" not in spec.help for _, spec in fields)
    out = subprocess.run(
        [sys.executable, "-m", "dmt_jax.main", "--help"], capture_output=True, text=True, env=run_env()
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name, spec in fields:
        line = next((x for x in lines if x.strip().startswith(f"{name} = ")), None)
        assert line and spec.help in line and repr(spec.default)[:8] in line, name


@pytest.mark.parametrize(
    "raised, code, words",
    [
        (UserError("first problem", "second problem"), 2, ["error: first problem", "error: second problem"]),
        (
            OSError(errno.ENOSPC, "No space left on device", "/w/x"),
            1,
            ["error: No space left on device: /w/x; free space"],
        ),
        (OSError(errno.EROFS, "Read-only file system", "/w"), 1, ["error: Read-only file system: /w; use a"]),
    ],  # fmt: skip
)
def test_entry_point_maps_user_errors_and_failed_writes_to_one_line(monkeypatch, capsys, raised, code, words):
    _entry_point_raising(monkeypatch, raised)
    with pytest.raises(SystemExit) as stopped:
        main.main(["prog"])
    assert stopped.value.code == code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(words) and all(line.startswith(w) for line, w in zip(lines, words, strict=True))


@pytest.mark.parametrize("raised", [KeyError("x"), ValueError("deep in jax"), OSError(errno.ENOENT, "x")])
def test_entry_point_keeps_other_exceptions(monkeypatch, raised):
    _entry_point_raising(monkeypatch, raised)
    with pytest.raises(type(raised)):
        main.main(["prog"])


def _entry_point_raising(monkeypatch, error: BaseException):
    """dmt_jax.main.main with flags already parsed, no validation, and a run that raises `error`."""

    def train(config, workdir):
        raise error

    flags = {"workdir": SimpleNamespace(value="/w"), "config": SimpleNamespace(value=None)}
    monkeypatch.setattr(main, "_flags", flags)
    monkeypatch.setitem(main._entry, "train", train)
    monkeypatch.setitem(main._entry, "check", lambda config, workdir: None)


def test_a_bug_keeps_its_traceback_and_exit_1(tmp_path):
    """A KeyError from inside the run is a bug: traceback, exit code 1, not an `error:` line."""
    recipe = tmp_path / "buggy.py"
    recipe.write_text(
        "import runpy\nimport dmt_jax.loop\n\n\ndef boom(config, workdir):\n    raise KeyError('internal')\n"
        "\n\ndmt_jax.loop.train_and_evaluate = boom\n\n\ndef get_config():\n"
        f"    return runpy.run_path({str(REPO / 'configs' / 'demo.py')!r})['get_config']()\n"
    )
    args = cli_args(tmp_path / "work", tmp_path / "demo")
    args[0] = f"--config={recipe}"
    run = Run(args)
    assert run.finish() == 1, run.output
    assert "Traceback" in run.output and "KeyError: 'internal'" in run.output
    assert not [line for line in run.output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "error, fix",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "free space"),
        (OSError(errno.EACCES, "Permission denied"), "make the directory writable by this user"),
        (OSError(errno.EROFS, "Read-only file system"), "use a directory on a writable filesystem"),
        (
            ValueError("tensorstore: [Errno 30] Read-only file system"),
            "use a directory on a writable filesystem",
        ),
        (RuntimeError("something else"), ""),
    ],
)
def test_what_to_do_about_a_failed_write_depends_on_its_cause(error, fix):
    """A read-only checkpoints folder is not told to free space (the final-save message uses this)."""
    assert errors.remedy(error) == fix


def test_a_workdir_that_cannot_be_written(tmp_path, monkeypatch):
    """A read-only (or foreign) workdir is found by a write probe (root ignores permission bits)."""

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(validate.tempfile, "mkstemp", refuse)
    workdir = tmp_path / "run"
    assert validate.workdir_problems(str(workdir)) == [
        f"--workdir={workdir} is not writable (Permission denied: {tmp_path}; make the directory writable "
        "by this user)"
    ]
