"""`python -m dmt_jax.finetune`: the fine-tuning's validation pass and command line (main.run's flags,
its own recipe, schema and loop)."""

from __future__ import annotations

import os

from etils import epath

from dmt_jax import data, parallel
from dmt_jax.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REPO_CONFIG = os.path.join(_REPO, "configs")


def check_run(config, workdir: str) -> None:
    """The validation pass of a fine-tuning (validate.py's checks that apply), before anything is built:
    every field in its range, the devices, the training and validation data, the init, the workdir."""
    from dmt_jax import config as config_lib
    from dmt_jax import validate

    problems = config_lib.field_problems(config, config_lib.FINETUNE_SCHEMA)
    if not any(p.startswith("--config.distributed.") for p in problems):
        parallel.initialize_distributed(config.distributed)
        problems += validate.device_problems(config)
    problems += data.dataset_problems(config.data, ("train", "knn_eval"))
    if config.init and not epath.Path(config.init).exists():
        problems.append(
            f"--config.init={config.init!r} does not exist: name a distillation workdir (e.g. the demo's, "
            "after `python -m dmt_jax.main --config=configs/demo.py --workdir=/tmp/dmt_demo`), a "
            "student_timm.safetensors or a converted teacher directory; --config.init= for random init"
        )
    problems += validate.workdir_problems(workdir)
    if problems:
        raise UserError(*problems)


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
