"""`python -m dmt_jax.finetune`: the fine-tuning's validation pass and command line (main.run's flags,
its own recipe, schema and loop)."""

from __future__ import annotations

import os

from dmt_jax import data, parallel, storage
from dmt_jax.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REPO_CONFIG = os.path.join(_REPO, "configs")


def check_run(config, workdir: str) -> None:
    """The validation pass of a fine-tuning (validate.py's checks that apply), before anything is built:
    every field in its range and the fields against each other, the devices, the buckets it names (each
    answers within a bound), the training and validation data, the init (it exists and is not the workdir
    itself), the workdir. What needs the files read (the init's tensors, the data's classes) is checked
    when they are read, before anything is written."""
    from dmt_jax import config as config_lib
    from dmt_jax import validate

    problems = validate.config_problems(
        config, config_lib.FINETUNE_SCHEMA, consistency=config_lib.finetune_consistency_problems
    )
    if not any(p.startswith("--config.distributed.") for p in problems):
        parallel.initialize_distributed(config.distributed)
        problems += validate.device_problems(config)
    fields = ("init", "data.tfds_data_dir")
    if unreachable := validate.bucket_problems(config, workdir, fields=fields):
        raise UserError(*problems, *unreachable)  # the checks of files there would wait on it too
    problems += data.dataset_problems(config.data, ("train", "knn_eval"))
    init = _init_path(config.init)
    if config.init and init == _init_path(workdir):
        problems.append(
            f"--config.init is the --workdir ({workdir}): a fine-tuning writes its own checkpoints there; "
            "choose another --workdir"
        )
    elif config.init and not (init and init.exists()):
        problems.append(
            f"--config.init={config.init!r} does not exist: name a distillation workdir (e.g. the demo's, "
            "after `python -m dmt_jax.main --config=configs/demo.py --workdir=/tmp/dmt_demo`), a "
            "student_timm.safetensors or a converted teacher directory; --config.init= for random init"
        )
    problems += validate.workdir_problems(workdir)
    if problems:
        raise UserError(*problems)


def _init_path(text: str):
    """The resolved path (storage.py's one form), or None for a name no path can have (blank, too long)."""
    try:
        return storage.path(text, "--config.init") if text else None
    except UserError:
        return None


def run(argv=None):
    from dmt_jax import config as config_lib
    from dmt_jax import main
    from dmt_jax.finetune.loop import finetune

    main.run(
        argv,
        default_config=os.path.join(_REPO_CONFIG, "finetune_demo.py"),
        schema=config_lib.finetune_base_config,
        fields=config_lib.FINETUNE_SCHEMA,
        train=finetune,
        check=check_run,
    )
