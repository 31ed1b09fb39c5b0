"""Entry point: `python -m dmt_jax.main --config=configs/vit_s.py --workdir=DIR [--config.FIELD=VALUE ...]`.

Without --config it runs the demo (configs/demo.py). A run started on a workdir that holds
checkpoints resumes from the newest readable one. Multi-process runs start the same command on every
host (see parallel.initialize_distributed).

Exit codes: 0 done or stopped by SIGTERM/SIGINT after a checkpoint; 1 the run failed (a non-finite
loss under nonfinite='stop', a checkpoint that could not be written at the end, or a bug, with its
traceback); 2 a mistake in the command, the config or the files it names, said in one line.
"""

from __future__ import annotations

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (input pipeline only) stays quiet

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_REPO_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_CONFIG_ARG = re.compile(r"^--?config(=|$)")

# Mistakes a user can fix get one line and exit code 2; anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError)

_flags = {}  # defined by run(), not at import: config_flags reads the recipe as soon as it is defined


def main(argv):
    if len(argv) > 1:
        _user_error(
            f"unexpected arguments: {' '.join(argv[1:])} (config fields are set as --config.FIELD=VALUE)"
        )
    workdir, config = _flags["workdir"].value, _flags["config"].value
    if not workdir:
        _user_error("--workdir is required: the directory for checkpoints, logs and exports")
    from dmt_jax import loop, parallel  # after flag parsing: keeps --help fast

    logging.set_verbosity(logging.WARNING)
    try:
        parallel.initialize_distributed(config.distributed)
        loop.train_and_evaluate(config, workdir)
    except USER_ERRORS as e:
        _user_error(e.args[0] if e.args else str(e))


def run(argv=None):
    argv = list(sys.argv if argv is None else argv)
    # Name the demo explicitly when --config is absent: config_flags then reads the recipe inside
    # FLAGS(argv), where _parse_flags catches its errors, instead of at definition.
    if not any(_CONFIG_ARG.match(a) for a in argv[1:]):
        argv.insert(1, f"--config={_REPO_DEMO}")
    if not _flags:
        _flags["config"] = config_flags.DEFINE_config_file(
            "config", _REPO_DEMO, "Recipe file (configs/*.py).", lock_config=True, sys_argv=argv
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
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        _user_error(_explain_flag_error(argv, e))
    _check_schema(_flags["config"].value, config_file)
    return rest


def _explain_flag_error(argv, error) -> str:
    """The nearest valid name for a misspelt --config.FIELD; else the first line of the parser's error."""
    from dmt_jax.config import unknown_field_message

    config = _load_recipe(_config_file(argv))
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
        found = unknown_fields(config, base_config())
    except OSError as e:  # config_flags defers a recipe that failed to load to its first use
        _user_error(str(e).strip())  # several lines: they say where the file went wrong
    for msg in found:
        _user_error(f"{msg} (set in {config_file})")


def _config_file(argv) -> str:
    for i, arg in enumerate(argv[1:], 1):
        if _CONFIG_ARG.match(arg):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            return value.split(":", 1)[0]
    return _REPO_DEMO


def _load_recipe(path: str):
    """The recipe's config without overrides, or None if the file itself does not load."""
    import runpy

    try:
        return runpy.run_path(path)["get_config"]()
    except Exception:  # the parser's own error then says what is wrong with the file
        return None


def _user_error(msg: str):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    run()
