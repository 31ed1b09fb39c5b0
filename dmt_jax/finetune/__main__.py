"""`python -m dmt_jax.finetune --config=RECIPE --workdir=DIR [--config.FIELD=VALUE ...]`."""

from dmt_jax.finetune.cli import run

if __name__ == "__main__":
    run()
