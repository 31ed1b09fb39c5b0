"""A full disk outside checkpoint saves (the final export, the cache of a trained demo teacher, the demo
dataset's generation) gives one line naming the path and leaves no partial file; a SIGTERM during the
demo dataset's generation removes its temporary folder and says so (issue 18, item 7).

The full disk is real: a small tmpfs filled to the last block (the writers are Rust, TensorFlow and
Python code, so no patch of Python's open can stand in for it). Mounting needs root: elsewhere those
tests are skipped, and the errno translation they rely on is tested alone.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from dmt_jax import export, storage, teachers
from dmt_jax.data import demo
from dmt_jax.errors import os_error_message
from tests.helpers_run import Run, cli_args


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 256 kB tmpfs with no free block left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    try:
        with open(disk / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _one_line_naming(error: OSError, path) -> None:
    assert error.errno == errno.ENOSPC and error.filename == str(path)
    message = os_error_message(error)
    assert message == f"No space left on device: {path}; free space"


def test_the_final_export_on_a_full_disk(full_disk):
    params = teachers.make_random_teacher("mu/4", 32, 0).params
    target = full_disk / "student_timm.safetensors"
    with pytest.raises(OSError) as error:
        export.export_timm(params, target)
    _one_line_naming(error.value, target)
    assert os.listdir(full_disk) == ["filler"]  # no partial file, no temporary file


def test_a_demo_teacher_cache_on_a_full_disk(full_disk):
    teacher = teachers.make_random_teacher("mu/4", 32, 0)
    target = full_disk / "teachers" / "mu_4_32px"
    with pytest.raises(OSError) as error:
        teachers.save_teacher(target, teacher.spec, teacher.params)
    _one_line_naming(error.value, target)
    assert os.listdir(full_disk / "teachers") == []


def test_the_demo_dataset_on_a_full_disk(full_disk):
    root = full_disk / "demo"
    with pytest.raises(OSError) as error:
        demo.make_demo_dataset(root, per_class_train=64, per_class_val=16)
    _one_line_naming(error.value, root)
    assert os.listdir(full_disk) == ["filler"]


def test_a_run_whose_demo_dataset_meets_a_full_disk_says_one_line(full_disk, tmp_path):
    run = Run(cli_args(tmp_path / "run", full_disk / "demo"), devices=1)
    assert run.finish(timeout=300) == 1
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.output, run.output
    assert (
        errors[0].startswith(f"error: No space left on device: {full_disk / 'demo'}/")
        and "free space" in errors[0]
    )
    assert os.listdir(full_disk / "demo") == []  # the demo_root folder, and nothing in it


def test_library_write_errors_name_the_file_they_were_for():
    """safetensors' (Rust) and tensorstore's errors carry the OS error in their text only."""
    from safetensors import SafetensorError

    for raised in (
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        ValueError("OUT_OF_RANGE: [Errno 28] No space left on device"),
    ):
        with pytest.raises(storage.WriteFailed) as error, storage.named_write_errors("/data/x.safetensors"):
            raise raised
        assert error.value.errno == errno.ENOSPC and error.value.filename == "/data/x.safetensors"
    with pytest.raises(KeyError), storage.named_write_errors("/data/x"):  # not a failed write: unchanged
        raise KeyError("w")


def test_sigterm_during_the_demo_dataset_generation_removes_its_temporary_folder(tmp_path):
    demo_root = tmp_path / "demo"
    # 4000 images per class: tens of seconds of generation, time to stop it in the middle.
    run = Run(cli_args(tmp_path / "run", demo_root, data__demo_per_class_train=4000), devices=1)
    deadline = time.monotonic() + 240
    while not [p for p in demo_root.glob(".*.tmp-*") if any(p.rglob("*.png"))]:
        assert time.monotonic() < deadline and run.proc.poll() is None, run.output
        time.sleep(0.2)
    run.send(signal.SIGTERM)
    assert run.finish(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM while generating the demo dataset: its partial copy" in run.output
    assert "Traceback" not in run.output
    assert os.listdir(demo_root) == []  # neither the temporary folder nor a partial dataset
    # The demo must not have been written in full already: then the stop came too late to test anything.
    assert not np.any([p.name.startswith("c10_") for p in demo_root.iterdir()])
