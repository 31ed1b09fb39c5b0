"""Entry point: `python -m dmt_jax.main --config=configs/vit_s.py --workdir=DIR [--config.FIELD=VALUE ...]`.

Without --config it runs the demo (configs/demo.py). A run started on a workdir that holds
checkpoints resumes from the newest readable one. Multi-process runs start the same command on every
host (see parallel.initialize_distributed).

Before anything is built or written, one validation pass (dmt_jax/validate.py) checks every config
field, the devices, the dataset, the teachers and the workdir, and reports every problem at once.
`--help` lists every config field with its default and meaning (from the schema, dmt_jax/config.py).

Exit codes: 0 done or stopped by SIGTERM/SIGINT after a checkpoint; 1 the run failed (a non-finite
loss under nonfinite='stop', a checkpoint that could not be written at the end, a full or read-only
disk, each said in one line; or a bug, with its traceback); 2 a mistake in the command, the config or
the files it names (a dmt_jax.errors.UserError), one line per problem; 130 a second Ctrl-C (one line,
the partial checkpoint removed, no new checkpoint).
"""

from __future__ import annotations

import errno
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dmt_jax.errors import UserError, os_error_message  # importing dmt_jax quiets TensorFlow's start-up

_REPO_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_CONFIG_ARG = re.compile(r"^--?config(=|$)")

_HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
# A failed write for one of these reasons is the machine's state, not a bug: one line, exit 1.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)

_flags = {}  # defined by run(), not at import: config_flags reads the recipe as soon as it is defined
# What run() starts: the distillation by default; finetune/cli.py passes its own recipe, schema and loop.
_entry = {"default_config": _REPO_DEMO, "schema": None, "train": None, "fields": None, "check": None}


def main(argv):
    if len(argv) > 1:
        _user_error(
            f"unexpected arguments: {' '.join(argv[1:])} (config fields are set as --config.FIELD=VALUE)"
        )
    workdir, config = _flags["workdir"].value, _flags["config"].value
    if not workdir:
        _user_error("--workdir is required: the directory for checkpoints, logs and exports")
    from dmt_jax import loop, parallel, storage, validate  # after flag parsing: keeps --help fast

    logging.set_verbosity(logging.WARNING)
    # Only mistakes a user can fix (UserError) become one line and exit 2; any other exception is a bug
    # and keeps its traceback (exit 1), except a write that failed for the machine's state (a full disk).
    try:
        # One form of the workdir (~, links, .. resolved) for every reader and writer: the lock included.
        workdir = storage.resolve(workdir, "--workdir")
        check = _entry["check"] or (validate.check_run if _entry["train"] is None else None)
        if check:  # validates everything, then joins the multi-process run (the device count needs it)
            check(config, workdir)
        else:
            parallel.initialize_distributed(config.distributed)
        (_entry["train"] or loop.train_and_evaluate)(config, workdir)
    except KeyboardInterrupt:  # a second Ctrl-C: the run has removed its partial checkpoint
        print(
            "interrupted: stopped without a new checkpoint; run again to resume from the newest",
            file=sys.stderr,
        )
        _exit_now(130)
    except UserError as e:
        _user_error(*e.problems)
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {os_error_message(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    from dmt_jax import runner

    if runner.must_exit_now():  # a stop left a compile running: a normal exit would abort under it
        _exit_now(0)


def _exit_now(code: int):
    """Ends the process at once (no interpreter teardown: background threads may be inside XLA or orbax)."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv=None, *, default_config: str = _REPO_DEMO, schema=None, train=None, fields=None, check=None):
    """Parses the flags and runs `train(config, workdir)` (default: the distillation), the recipe's
    fields checked against `schema()` (default: config.base_config); `fields` (a Field schema, default
    config.BASE_SCHEMA) gives --help, and `check(config, workdir)` (default: validate.check_run for
    the distillation) validates the run and joins a multi-process run before `train`."""
    _entry.update(default_config=default_config, schema=schema, train=train, fields=fields, check=check)
    argv = list(sys.argv if argv is None else argv)
    if any(a in _HELP_ARGS for a in argv[1:]):
        _print_help(full="--helpfull" in argv[1:])
        sys.exit(0)
    # Name the demo explicitly when --config is absent: config_flags then reads the recipe inside
    # FLAGS(argv), where _parse_flags catches its errors, instead of at definition.
    if not any(_CONFIG_ARG.match(a) for a in argv[1:]):
        argv.insert(1, f"--config={default_config}")
    if not _flags:
        _flags["config"] = config_flags.DEFINE_config_file(
            "config", default_config, "Recipe file (configs/*.py).", lock_config=True, sys_argv=argv
        )
        _flags["workdir"] = flags.DEFINE_string(
            "workdir", None, "Directory for checkpoints, TensorBoard events and exports."
        )
    app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's parser, with one line and exit code 2 for a config field that does not exist."""
    config_file = _config_file(argv)
    if not os.path.isfile(config_file):
        _user_error(f"config file {config_file} does not exist")
    if problem := _recipe_problem(config_file, _config_argument(argv)):
        _user_error(problem)
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _user_error(_explain_flag_error(argv, e))
    _check_schema(_flags["config"].value, config_file)
    return rest


def _explain_flag_error(argv, error) -> str:
    """The nearest valid name for a misspelt --config.FIELD; else the first line of the parser's error."""
    from dmt_jax.config import unknown_field_message

    config = _load_recipe(_config_file(argv), _config_argument(argv))
    if config is not None:
        for arg in argv[1:]:
            if arg.startswith(("--config.", "-config.", "--noconfig.")):
                field = arg.split(".", 1)[1].split("=", 1)[0]
                msg = unknown_field_message(config, field)
                if msg:
                    return msg
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_schema(config, config_file: str):
    """A field the recipe file sets that no recipe has (a typo in the file) is an error, not a new field."""
    from dmt_jax.config import base_config, unknown_fields

    try:
        found = unknown_fields(config, (_entry["schema"] or base_config)())
    except OSError as e:  # config_flags defers a recipe that failed to load to its first use
        _user_error(str(e).strip())  # several lines: they say where the file went wrong
    if found:  # every typo of the file at once
        _user_error(*[f"{msg} (set in {config_file})" for msg in found])


def _config_value(argv) -> str:
    """The value of the last --config (absl's rule: a flag given twice takes its last value)."""
    value = _entry["default_config"]
    for i, arg in enumerate(argv[1:], 1):
        if _CONFIG_ARG.match(arg):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
    return value


def _config_file(argv) -> str:
    return _config_value(argv).split(":", 1)[0]


def _config_argument(argv) -> tuple[str, ...]:
    """`--config=recipe.py:ARG` passes ARG to get_config, as config_flags does."""
    value = _config_value(argv)
    return (value.split(":", 1)[1],) if ":" in value else ()


def _load_recipe(path: str, args: tuple[str, ...] = ()):
    """The recipe's config without overrides, or None if the file itself does not load."""
    import runpy

    try:
        return runpy.run_path(path)["get_config"](*args)
    except Exception:  # _recipe_problem says what is wrong with the file
        return None


def _recipe_problem(path: str, args: tuple[str, ...] = ()) -> str:
    """One line for a recipe file that cannot give a config: not Python, raises when run, has no
    get_config(), or returns something else than a ConfigDict; '' for a sound one."""
    import runpy

    import ml_collections

    def first_line(e: BaseException) -> str:
        text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    try:
        recipe = runpy.run_path(path)
    except SyntaxError as e:
        where = f" (line {e.lineno})" if e.lineno else ""
        return f"config file {path} is not Python: {e.msg}{where}: give a recipe like configs/demo.py"
    except (Exception, SystemExit) as e:
        if isinstance(e, ValueError) and "null bytes" in str(e):  # Python < 3.11.4: not a SyntaxError
            return f"config file {path} is not Python: {e}: give a recipe like configs/demo.py"
        return f"config file {path} raised {first_line(e)} while loading: fix the recipe"
    if not callable(get_config := recipe.get("get_config")):
        return (
            f"config file {path} defines no get_config(): a recipe returns its ConfigDict from get_config()"
        )
    try:
        config = get_config(*args)
    except (Exception, SystemExit) as e:
        return f"config file {path}: get_config({', '.join(map(repr, args))}) raised {first_line(e)}"
    if not isinstance(config, ml_collections.ConfigDict):
        kind = type(config).__name__
        return f"config file {path}: get_config() returned a {kind}, not an ml_collections.ConfigDict"
    return ""


def _print_help(full: bool):
    """Usage, the two flags and every config field with its default and meaning, from the schema."""
    from dmt_jax import config as config_lib

    spec = getattr(sys.modules["__main__"], "__spec__", None)
    module = spec.name.removesuffix(".__main__") if spec else "dmt_jax.main"
    default = os.path.relpath(_entry["default_config"])
    lines = [
        f"usage: python -m {module} --config=RECIPE --workdir=DIR [--config.FIELD=VALUE ...]",
        "",
        "flags:",
        f"  --config   recipe file, configs/*.py (default: {default})",
        "  --workdir  directory for checkpoints, TensorBoard events, config.json and exports (required)",
        "",
        "config fields (--config.FIELD=VALUE; defaults of dmt_jax/config.py, which a recipe may change):",
        *config_lib.help_lines(_entry["fields"] or config_lib.BASE_SCHEMA),
    ]
    print("\n".join(lines))
    if full:
        print("\nabsl flags:\n" + flags.FLAGS.get_help())


def _user_error(*problems: str):
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    run()
