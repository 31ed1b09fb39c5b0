"""bench/pod_rehearsal.py plays a pod on localhost and says what it saw: 4 processes x 2 devices with
teachers and workdir in an emulated bucket equal one process with 8 devices; a SIGTERM to one process
stops all four with a checkpoint in the bucket, and 2 processes x 2 devices resume it to the same
state; start-up memory per process stays near a single process's. The evaluation part runs at a
small bank here (an ImageNet-sized one, 1.28M x 768, is the script's default)."""

import json
import subprocess
import sys

from helpers_run import REPO, run_env


def rehearse(*args: str, timeout: float = 300):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pod_rehearsal.py"), *args],
        capture_output=True,
        text=True,
        env=run_env(devices=1),
        cwd=str(REPO),
        timeout=timeout,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["part"]: r for r in rows}, out


def test_pod_on_localhost_matches_one_process_and_resumes_after_sigterm():
    rows, out = rehearse("--parts", "pod,resume", "--steps", "4", "--timeout", "420", timeout=1500)
    pod, resume = rows["pod"], rows["resume"]
    # Its results only: no emulator tracebacks around them (once 5,996 lines, 217 BrokenPipe tracebacks).
    said = (out.stdout + out.stderr).splitlines()
    assert len(said) < 50 and "Traceback" not in out.stderr, out.stderr[-5000:]
    assert pod["evaluated"] and pod["export_within_1e5"], pod
    assert pod["rss_within_1_5x"], pod
    assert resume["checkpoint_in_bucket"] and resume["resumed_from"] == resume["stop_step"] < 4, resume
    assert resume["final_within_1e5"], resume


def test_rehearsal_script_measures_the_evaluation():
    rows, out = rehearse(
        "--parts", "eval", "--bank", "4096", "--queries", "600", "--classes", "50", "--dim", "64"
    )
    assert list(rows) == ["eval"]
    row = rows["eval"]
    assert row["bank"] == 4096 and row["devices"] == 8 and row["no_constant_over_1mb"], row
    assert row["knn_top1"] > 90 and row["probe_top1"] > 90, row
    assert 0 < row["peak_mb_per_device"]["knn_query_batch"] < 64, (
        row
    )  # an eighth of a 1 MB bank, and temporaries
    assert "[eval]" in out.stdout  # the table after the JSON lines
