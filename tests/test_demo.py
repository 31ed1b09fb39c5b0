"""The demo, end to end with fewer steps: teachers trained in process, distillation, evaluation."""

import json

import pytest

from dmt_jax import loop


@pytest.fixture
def demo_config(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).parents[1] / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.demo_root = str(tmp_path / "demo_data")
    c.compilation_cache_dir = ""  # JAX's cache setting is process-wide: leave the test process's alone
    c.total_steps = 400
    c.checkpoint_every = 200
    c.log_every = 40
    c.eval_every = 0
    return c


def test_demo_distills_teachers_into_the_student(demo_config, tmp_path, monkeypatch, capsys):
    # The demo's own teacher recipe (demo_teachers.STEPS, BATCH, LR): a few seconds each.
    workdir = tmp_path / "run"
    monkeypatch.setenv("DMT_PROGRESS", "lines")  # as in a log file
    loop.train_and_evaluate(demo_config, str(workdir))
    out, err = capsys.readouterr()
    # Every long piece of the start says how far it is; the summary names the teachers for what they are.
    assert "generating the demo dataset in " in err and ": started (800 images)" in err, err
    for entry in demo_config.teachers:
        variant, rest = entry.removeprefix("demo:").split("@")
        px, seed = rest.split(":")
        assert f"demo teacher {variant}@{px} seed {seed}: started (1,000 steps)" in err, err
        assert f"demo teacher {variant}@{px} seed {seed}: done, 1,000 steps in " in err, err
    assert [line.split(" ")[2] for line in out.splitlines() if line.startswith("teacher ")] == ["demo"] * 3

    evals = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 400
    for k in range(3):
        # Heads start unrelated to the targets; distillation aligns them.
        assert first[f"alignment/teacher_{k}"] < 0.3
        assert last[f"alignment/teacher_{k}"] > 0.5  # 0.64-0.77 here (8 virtual devices, 400 steps)
        # Trained teachers separate the demo classes far above chance (10 classes).
        assert last[f"knn_top1/teacher_{k}"] > 25
        assert last[f"linear_probe_top1/teacher_{k}"] > 25
        # The student's encoder moves toward each teacher's representation (CKA: no head involved).
        assert last[f"cka/teacher_{k}"] > first[f"cka/teacher_{k}"]
    assert last["knn_top1/student"] > first["knn_top1/student"] + 10
    assert last["linear_probe_top1/student"] > first["linear_probe_top1/student"] + 10
    # Every part left its trace: checkpoints, TensorBoard events, the timm export.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["200", "400"]
    assert list(workdir.glob("events.out.tfevents.*"))
    assert (workdir / "student_timm.safetensors").exists()
    assert sorted(p.name for p in (workdir / "pictures").iterdir()) == ["step_0.png", "step_400.png"]
