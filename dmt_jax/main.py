"""Entry point: `python -m dmt_jax.main --config=configs/vit_s.py --workdir=DIR [--config.FIELD=VALUE ...]`.

Without --config it runs the demo (configs/demo.py). A run started on a workdir that holds
checkpoints resumes from the newest readable one.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_REPO_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _REPO_DEMO, "Recipe file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and exports.")

# Mistakes a user can fix get one line and exit code 2; anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required: the directory for checkpoints and logs")
    config = _CONFIG.value
    from dmt_jax import loop, parallel  # after flag parsing: keeps --help fast

    logging.set_verbosity(logging.WARNING)
    try:
        parallel.initialize_distributed(config.distributed)
        loop.train_and_evaluate(config, _WORKDIR.value)
    except USER_ERRORS as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr, flush=True)
        sys.exit(2)


def run():
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's parser, with a one-line message for a config field that does not exist."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {_explain_flag_error(argv, e)}", file=sys.stderr)
        sys.exit(2)


def _explain_flag_error(argv, error) -> str:
    from dmt_jax.config import unknown_field_message

    try:
        config = _CONFIG.value
    except Exception:  # the config file itself failed to load
        return str(error).splitlines()[0]
    for arg in argv[1:]:
        if arg.startswith("--config."):
            field = arg[len("--config.") :].split("=", 1)[0]
            msg = unknown_field_message(config, field)
            if msg:
                return msg
    return str(error).splitlines()[0]


if __name__ == "__main__":
    run()
