"""bench/step.py: runs the real step, prints torch_reference.py's fields, and imports no TensorFlow."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench" / "step.py"
FIELDS = {
    "impl",
    "student",
    "teachers",
    "batch",
    "mask_ratio",
    "step_ms",
    "img_per_s",
    "model_tflops",
    "mfu_vs_989",
}


def test_step_benchmark_runs_without_tensorflow():
    # Block TensorFlow and torch outright: the GPU machines have no TensorFlow.
    argv = ["step.py", "--student", "ti", "--teacher", "mu/16", "--teachers", "2", "--batch", "8"]
    argv += ["--img-size", "32", "--steps", "1", "--repeats", "1", "--warmup", "1"]
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['torch'] = None; "
        f"sys.argv = {argv!r}; import runpy; runpy.run_path({str(BENCH)!r}, run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and set(rows[0]) >= FIELDS
    assert rows[0]["impl"] == "dmt_jax" and rows[0]["img_per_s"] > 0 and rows[0]["loss"] > 0


def test_recipe_memory_counts_the_step_it_compiles(tmp_path):
    """bench/recipe_memory.py on a tiny agglomerative recipe: its arguments are exactly the train state,
    the teachers' bf16 weights and the batch (nothing allocated, no weights read)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    recipe = tmp_path / "tiny.py"
    recipe.write_text(
        "from dmt_jax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.objective, c.student.variant, c.img_size, c.mask_ratio = 'agglomerative', 'mu/4', 32, 0.0\n"
        "    c.teachers = ('a=random:mu/4@32:0', 'b=random:mu/8@64:1', 'c=random:sam:mu/8@64:2')\n"
        "    c.stages = ((0, 24), (5, 32))\n"
        "    c.total_steps = 10\n"
        "    return c\n"
    )
    bench = Path(__file__).parents[1] / "bench" / "recipe_memory.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--recipe", str(recipe), "--batch", "4"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["student_px"] for r in rows] == [24, 32] and rows[0]["view_px"] == 64

    import runpy

    from dmt_jax import parallel, train

    sys.path.insert(0, str(bench.parent))
    memory = runpy.run_path(str(bench))
    config = memory["load_recipe"](str(recipe))
    teachers = [memory["abstract_teacher"](e.split("=")[1], 0) for e in config.teachers]
    config.batch_size = 4
    setup = train.build(config, parallel.make_mesh(1, 1, devices=jax.devices()[:1]), teachers=teachers)
    nbytes = lambda tree: sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    want = nbytes(setup.abstract_state) + nbytes(setup.teacher_params) + 4 * 64 * 64 * 3
    assert all(abs(r["arguments_mb"] - want / 2**20) <= 0.05 for r in rows), (want / 2**20, rows)
    assert all(r["peak_mb"] >= r["arguments_mb"] and r["temporaries_mb"] > 0 for r in rows)
