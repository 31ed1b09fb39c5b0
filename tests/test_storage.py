"""gs:// paths against a real GCS JSON API server on localhost (tests/gcs_emulator.py): checkpoints,
teachers, exports, and a whole run whose workdir and teacher live in the bucket, started with
STORAGE_EMULATOR_HOST as its only storage setting."""

import json
import os
import subprocess
import sys

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
        linear_probe_epochs=5,
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


# What tensorstore raised at a run's first checkpoint under the stock emulator (spec dump shortened).
_STOCK_FAILURE = (
    'Error opening "zarr" driver: Error writing "opt_state.inner_states.train.inner_state.0.count/.zarray" '
    "in OCDBT database at gs://dmt-bucket/run1/checkpoints/4/state/ocdbt.process_0/: Error writing "
    "gs://dmt-bucket/run1/checkpoints/4/state/ocdbt.process_0/manifest.ocdbt: Malformed StorageGeneration "
    '[tensorstore_spec=\'{"context":{"cache_pool":{}},"driver":"zarr","kvstore":{"bucket":"dmt-bucket"}}\']'
)


def test_a_failed_save_is_said_whole_without_tensorstores_spec():
    line = checkpoint._one_line(ValueError(_STOCK_FAILURE))
    assert line.endswith("/ocdbt.process_0/manifest.ocdbt: Malformed StorageGeneration"), line
    assert line.startswith('ValueError: Error opening "zarr" driver: Error writing') and "spec" not in line


def test_a_stock_emulator_is_named_as_the_cause():
    """The stock gcp-storage-emulator sends no x-goog-generation header; tensorstore's conditional writes
    (OCDBT's manifests, at a checkpoint) then fail with 'Malformed StorageGeneration'. A tensorstore
    write of that kind, in a process of its own (tensorstore keeps the first emulator address it used):
    the remedy names the emulator and the command that replaces it; without an emulator, no such remedy."""
    script = (
        "import dmt_jax, tensorstore as ts\n"
        "from dmt_jax import errors\n"
        "kv = ts.KvStore.open({'driver': 'gcs', 'bucket': 'dmt-stock'}).result()\n"
        "kv.write('probe', b'1').result()\n"
        "generation = kv.read('probe').result().stamp.generation\n"
        "try:\n"
        "    kv.write('probe', b'2', if_equal=generation).result()\n"
        "except ValueError as e:\n"
        "    print('remedy:', errors.remedy(e))\n"
        "    import os; del os.environ['STORAGE_EMULATOR_HOST']\n"
        "    print('real GCS:', repr(errors.remedy(e)))\n"
    )
    with emulated_bucket("dmt-stock", stock=True):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), timeout=120
        )
        host = os.environ[storage.EMULATOR_VARIABLE]
    assert done.returncode == 0, done.stderr
    [remedy] = [line for line in done.stdout.splitlines() if line.startswith("remedy:")]
    assert f"the GCS emulator at {host} sends no x-goog-generation header" in remedy, done.stdout
    assert "`python -m dmt_jax.storage_emulator`" in remedy, remedy
    assert "real GCS: ''" in done.stdout, done.stdout  # the header is there on real GCS: no such guess


def test_no_event_loop_is_closed_echoes_after_a_failed_save():
    """orbax closes a save's asyncio loop at the first failed write while tensorstore's other writes are
    in flight; each reports 'Event loop is closed' when done. dmt_jax.checkpoint drops those reports
    (the control, without it, shows one)."""
    script = (
        "import asyncio, sys, time\n"
        "if sys.argv[1] == 'dmt':\n    import dmt_jax.checkpoint\n"
        "import tensorstore as ts\n"
        "promise, future = ts.Promise.new()\n"
        "async def wait():\n    asyncio.ensure_future(future)\n    await asyncio.sleep(0.01)\n"
        "loop = asyncio.new_event_loop()\nloop.run_until_complete(wait())\nloop.close()\n"
        "promise.set_result(1)\ntime.sleep(0.2)\nprint('end')\n"
    )

    def stderr(case: str) -> str:
        command = [sys.executable, "-c", script, case]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "end", done.stderr
        return done.stderr

    assert "Event loop is closed" in stderr("control")
    assert "Event loop is closed" not in stderr("dmt")


def test_the_emulator_command_says_where_it_serves_and_stops_on_sigterm():
    from gcs_emulator import EmulatorProcess

    emulator = EmulatorProcess("dmt-cmd")
    try:
        assert emulator.url.startswith("http://localhost:") and not emulator.url.endswith(":0")
    finally:
        emulator.stop()
    assert emulator.proc.returncode == 0 and not list(emulator.output)
