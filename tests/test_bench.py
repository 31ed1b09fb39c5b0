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
