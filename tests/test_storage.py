"""gs:// paths against a real GCS JSON API server on localhost (tests/gcs_emulator.py): checkpoints,
teachers, exports, and a whole run whose workdir and teacher live in the bucket, started with
STORAGE_EMULATOR_HOST as its only storage setting."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import child_env, emulated_bucket
from helpers_run import Run, cli_args

from dmt_jax import checkpoint, export, storage
from dmt_jax.teachers import load_teacher, make_random_teacher, save_teacher

POSITION = {"next_index": 3, "bad_images": 0, "global_batch": 8}


@pytest.fixture(scope="module")
def bucket():
    with emulated_bucket() as root:
        yield root


def test_paths_stay_in_the_bucket():
    assert os.fspath(storage.path("gs://b/run/checkpoints")) == "gs://b/run/checkpoints"
    assert os.fspath(storage.path("relative/dir")) == os.path.abspath("relative/dir")


def test_checkpoints_save_restore_and_set_aside_in_the_bucket(bucket):
    directory = f"{bucket}/ckpt_test/checkpoints"
    state = {"w": jnp.arange(1024.0)}
    ckpt = checkpoint.Checkpointer(directory)
    assert ckpt.save(1, state, POSITION) and ckpt.save(2, state, POSITION)
    assert ckpt.steps() == [1, 2]
    ckpt.close()
    assert not storage.path("ckpt_test").exists()  # nothing went to a local "gs:" folder
    # Damage step 2 (its array data objects gone): set aside in the bucket, step 1 restored.
    step_2 = storage.path(directory) / "2" / "state"
    for f in storage.files_under(step_2):
        if f.parent.name == "d":
            f.unlink()
    ckpt = checkpoint.Checkpointer(directory)
    restored, data = ckpt.restore_latest(state)
    assert np.array_equal(np.asarray(restored["w"]), np.arange(1024.0)) and data["next_index"] == [3]
    assert ckpt.steps() == [1]
    assert [p.name.split("-")[0] for p in storage.path(directory + "_unreadable").iterdir()] == ["2"]
    ckpt.close()


def test_teacher_and_export_in_the_bucket(bucket):
    teacher = make_random_teacher("mu/4", 32, seed=3)
    save_teacher(f"{bucket}/teachers/t", teacher.spec, teacher.params)
    loaded = load_teacher(f"{bucket}/teachers/t")
    assert loaded.spec == teacher.spec
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(teacher.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kwargs = export.export_timm(loaded.params, f"{bucket}/export/student.safetensors")
    from safetensors.numpy import load

    exported = load(storage.path(f"{bucket}/export/student.safetensors").read_bytes())
    assert kwargs["embed_dim"] == teacher.spec.width and "patch_embed.proj.weight" in exported


def test_a_whole_run_in_the_bucket(bucket, tmp_path):
    teacher = make_random_teacher("mu/4", 32, seed=1)
    save_teacher(f"{bucket}/teachers/run_t", teacher.spec, teacher.params)
    workdir = f"{bucket}/run"
    args = cli_args(
        workdir,
        tmp_path / "demo",
        teachers=f"('{bucket}/teachers/run_t','random:mu/8@64:2')",
        total_steps=4,
        warmup_steps=1,
        checkpoint_every=2,
        evaluate=True,
        eval_every=100,
        linear_probe_steps=5,
        export_at_end=True,
        log_example_ids=False,
    )
    run = Run(args, devices=2, env=child_env())
    assert run.finish(timeout=300) == 0, run.output
    root = storage.path(workdir)
    names = {p.name for p in root.iterdir()}
    assert {"checkpoints", "config.json", "eval.jsonl", "student_timm.safetensors"} <= names, names
    assert any(n.startswith("events.out.tfevents.") for n in names), names
    assert sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    steps = [json.loads(line)["step"] for line in (root / "eval.jsonl").read_text().splitlines()]
    assert steps == [0, 4]
    assert not (tmp_path / "gs:").exists() and not storage.path("gs:").exists()


def test_a_stock_emulator_is_named_in_one_whole_line(tmp_path):
    """Under gcp-storage-emulator as it ships, the first checkpoint fails (no x-goog-generation header):
    the run says the whole error (tensorstore's spec dump dropped, no path cut short), exits 1 with a
    line naming the emulator and the command that replaces it, and prints no 'Event loop is closed'
    traceback. (A run of its own: tensorstore keeps the emulator's address it first used per process.)"""
    with emulated_bucket("dmt-stock", stock=True) as bucket:
        args = cli_args(
            f"{bucket}/run",
            tmp_path / "demo",
            teachers="('random:mu/4@32:1',)",
            total_steps=2,
            checkpoint_every=2,
            log_example_ids=False,
        )
        run = Run(args, devices=1, env=child_env())
        assert run.finish(timeout=300) == 1, run.output
    [line] = [line for line in run.lines if "NOT saved" in line]
    assert "Malformed StorageGeneration)" in line and "tensorstore_spec" not in line, line
    assert f"{bucket}/run/checkpoints/2" in line, line  # the path whole
    error = run.lines[-1]
    assert error.startswith("error: the checkpoint at step 2 could not be written"), run.output
    assert "x-goog-generation" in error and "python -m dmt_jax.storage_emulator" in error, error
    assert "Event loop is closed" not in run.output and "never retrieved" not in run.output, run.output


def test_the_emulator_command_says_where_it_serves_and_stops_on_sigterm():
    from gcs_emulator import EmulatorProcess

    emulator = EmulatorProcess("dmt-cmd")
    try:
        assert emulator.url.startswith("http://localhost:") and not emulator.url.endswith(":0")
    finally:
        emulator.stop()
    assert emulator.proc.returncode == 0 and not list(emulator.output)
