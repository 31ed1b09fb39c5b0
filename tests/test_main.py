"""The command line: a mistake in a flag, a recipe file, or the files a config names is one line
`error: ...` and exit code 2; and the multi-host start-up chooses how to initialize from the
environment."""

import jax
import pytest
from helpers_run import REPO, Run, cli_args

from dmt_jax import parallel
from dmt_jax.config import base_config, unknown_field_message, unknown_fields
from dmt_jax.errors import UserError


def _error_line(run: Run) -> str:
    """The run's exit code must be 2 and its output must end with exactly one `error:` line."""
    assert run.finish() == 2, run.output
    errors = [line for line in run.lines if line.startswith("error:")]
    assert len(errors) == 1 and run.output.splitlines()[-1] == errors[0], run.output
    return errors[0]


def test_unknown_config_fields_name_the_nearest_valid_one(tmp_path):
    recipe = tmp_path / "typo.py"
    recipe.write_text(
        "from dmt_jax.config import base_config\n\n\n"
        "def get_config():\n    c = base_config()\n    c.student.varient = 'S/16'\n    return c\n"
    )
    workdir = f"--workdir={tmp_path / 'work'}"
    runs = {
        "flag": Run(["--config.batchsize=3", workdir]),
        "nested": Run([f"--config={REPO / 'configs' / 'demo.py'}", "--config.data.sourc=folder", workdir]),
        "file": Run([f"--config={recipe}", "--config.batch_size=8", workdir]),
    }
    assert (
        _error_line(runs["flag"])
        == "error: config field 'batchsize' does not exist; did you mean 'batch_size'?"
    )
    assert _error_line(runs["nested"]) == (
        "error: config field 'data.sourc' does not exist; did you mean 'data.source'?"
    )
    assert _error_line(runs["file"]) == (
        "error: config field 'student.varient' does not exist; did you mean 'student.variant'? "
        f"(set in {recipe})"
    )
    assert not (tmp_path / "work").exists()  # nothing started


def test_missing_teacher_or_dataset_says_which_command_provides_it(tmp_path):
    demo = tmp_path / "demo"
    teacher = Run(cli_args(tmp_path / "w1", demo, teachers="('/nonexistent/mae_vit_b16',)"))
    tfds = Run(
        cli_args(tmp_path / "w2", demo, data__source="tfds", data__tfds_data_dir=str(tmp_path / "tfds"))
    )
    line = _error_line(teacher)
    assert line.startswith("error: teacher '/nonexistent/mae_vit_b16' does not exist")
    assert "`dmt-convert mae_pretrain_vit_base.pth /nonexistent/mae_vit_b16`" in line
    line = _error_line(tfds)
    assert line.startswith(
        f"error: tfds dataset imagenet2012 is not prepared in {tmp_path / 'tfds'}; run: tfds build"
    )


def test_unknown_field_messages():
    schema = base_config()
    assert unknown_field_message(schema, "batch_size") == ""
    assert unknown_field_message(schema, "dat.source").endswith("did you mean 'data.source'?")
    assert unknown_field_message(schema, "dta.sorce_x_y").endswith("did you mean 'data'?")
    assert unknown_field_message(schema, "qqqq") == "config field 'qqqq' does not exist"
    # A word of the name (PyTorch's lr / learning_rate) finds every field holding it.
    for typed in ("lr", "learning_rate"):
        assert unknown_field_message(schema, typed).endswith("did you mean 'base_lr' or 'min_lr'?")
    assert unknown_field_message(schema, "teacher").endswith("did you mean 'teachers'?")
    assert unknown_field_message(schema, "data.root").endswith("did you mean 'data.demo_root'?")
    recipe = base_config()
    recipe.unlock()
    recipe.batchsize, recipe.mesh.dta = 3, 2
    assert sorted(unknown_fields(recipe, schema)) == [
        "config field 'batchsize' does not exist; did you mean 'batch_size'?",
        "config field 'mesh.dta' does not exist; did you mean 'mesh.data'?",
    ]


SLURM_TWO_TASKS = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, ""),
        (SLURM_TWO_TASKS, "slurm"),
        ({**SLURM_TWO_TASKS, "SLURM_NTASKS": "1"}, ""),  # one task: JAX would pin it to one GPU
        ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
        ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4:5", "OMPI_COMM_WORLD_SIZE": "1"}, ""),
    ],
)
def test_cluster_detection(environ, expected):
    assert parallel.detect_cluster(environ) == expected


def test_explicit_distributed_config_is_checked_before_connecting():
    cfg = base_config().distributed
    cfg.coordinator_address = "localhost:1234"
    with pytest.raises(UserError, match="distributed.num_processes >= 1"):
        parallel.initialize_distributed(cfg)
    assert not jax.distributed.is_initialized()
    cfg.coordinator_address = ""
    assert parallel.initialize_distributed(cfg) == ""  # a lone process (no cluster here) initializes nothing


def test_matplotlib_builds_its_font_cache_quietly(tmp_path):
    """Keras (under TensorFlow) imports matplotlib, which builds its font cache on a new machine and says
    so through the logging that absl shows; importing dmt_jax drops that notice (the control shows it)."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom absl import app\n"
        "if sys.argv[1] == 'dmt':\n    import dmt_jax\n"
        "app.run(lambda argv: __import__('matplotlib.font_manager') and None, argv=sys.argv[:1])\n"
    )

    def output(case: str) -> str:
        env = {"PATH": "/usr/bin:/bin", "MPLCONFIGDIR": str(tmp_path / case), "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", script, case], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    assert "fontManager" in output("control")
    quiet = output("dmt")
    assert "fontManager" not in quiet and "font cache" not in quiet, quiet
