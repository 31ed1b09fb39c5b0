"""Paths typed in any form name one workdir with one lock; nothing is written or read through a link
or into a FIFO (issue 18, items 1 and 2)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from dmt_jax import pictures, storage, validate
from dmt_jax.errors import UserError
from dmt_jax.workdir_lock import WorkdirLock, WorkdirLocked
from tests.helpers_run import Run, checkpoint_steps, cli_args


@pytest.fixture
def tree(tmp_path):
    """tmp/real/w (the workdir), tmp/a/link -> tmp/real/sub: `a/link/../w` is real/w to the kernel, but
    a/w to a lexical normalization (os.path.abspath)."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "link").symlink_to(tmp_path / "real" / "sub")
    return tmp_path


def test_every_form_of_a_path_resolves_to_one(tree, monkeypatch):
    real = str(tree / "real" / "w")
    monkeypatch.setenv("HOME", str(tree / "real"))
    monkeypatch.chdir(tree / "real" / "sub")
    for typed in ("~/w", str(tree / "a" / "link" / ".." / "w"), "../w", real + "/", real):
        assert storage.resolve(typed) == real, typed
    assert os.path.abspath(str(tree / "a" / "link" / ".." / "w")) != real  # what writers did before
    assert storage.resolve_file(str(tree / "a" / "link" / ".." / "r.html")) == str(tree / "real" / "r.html")
    assert storage.resolve("gs://b//runs/./x/../w/") == "gs://b/runs/w"


@pytest.mark.parametrize(
    "typed, message",
    [
        ("", "--workdir is empty: "),
        ("   ", r"--workdir is empty \(blank\)"),
        ("/tmp/" + "x" * 300, "is 300 bytes; a file name holds at most 255"),
        ("/tmp/" + "/".join(["y" * 200] * 25), "a path holds at most 4095"),
        ("gs:///w", "names no bucket"),
    ],
)
def test_unusable_names_are_one_line(typed, message):
    with pytest.raises(UserError, match=message) as error:
        storage.resolve(typed, "--workdir")
    assert "\n" not in str(error.value)
    assert validate.workdir_problems(typed) == error.value.problems  # the validation pass says the same


def test_two_runs_on_one_workdir_typed_two_ways_the_second_is_refused(tree, tmp_path):
    """The first run types ~/w (HOME is tmp/real), the second tmp/a/link/../w: one real workdir."""
    home = {**os.environ, "HOME": str(tree / "real")}
    first = Run(
        cli_args("~/w", tmp_path / "demo", total_steps=100000, checkpoint_every=100000), devices=1, env=home
    )
    try:
        first.wait_for("training from step 0", timeout=300)
        second = Run(cli_args(tree / "a" / "link" / ".." / "w", tmp_path / "demo"), devices=1)
        assert second.finish(timeout=300) == 2
        assert f"error: workdir {tree / 'real' / 'w'} is in use by another run (host" in second.output
        first.send(signal.SIGTERM)
        assert first.finish(timeout=300) == 0
    finally:
        first.proc.kill()
    assert checkpoint_steps(tree / "real" / "w")  # its checkpoints went where its lock was
    assert not (tree / "real" / "sub" / "~").exists() and not (tree / "a" / "w").exists()


def test_unusable_workdir_names_on_the_command_line(tmp_path):
    runs = [Run(cli_args(w, tmp_path / "demo"), devices=1) for w in ("  ", "/tmp/" + "z" * 256)]
    for run, message in zip(
        runs, ["--workdir is empty (blank)", "a file name holds at most 255"], strict=True
    ):
        assert run.finish(timeout=300) == 2
        errors = [line for line in run.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], run.output
        assert "Traceback" not in run.output


# ---------------------------------------------------------------- links and special files


@pytest.fixture
def victim(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    return outside


@pytest.mark.parametrize("name", [".dmt_lock", "config.json", "eval.jsonl", "checkpoints", "pictures"])
@pytest.mark.parametrize("kind", ["link", "dangling link", "fifo"])
def test_the_validation_pass_refuses_links_and_special_files_where_the_run_writes(
    tmp_path, victim, name, kind
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if kind == "fifo":
        os.mkfifo(workdir / name)
    else:
        (workdir / name).symlink_to(victim / ("victim.txt" if kind == "link" else "nothing"))
    problems = validate.workdir_problems(str(workdir))
    assert len(problems) == 1 and str(workdir / name) in problems[0] and "remove them" in problems[0]
    assert (victim / "victim.txt").read_text() == "precious" and sorted(os.listdir(victim)) == ["victim.txt"]


def test_the_lock_never_opens_a_link_or_a_fifo(tmp_path, victim):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / ".dmt_lock").symlink_to(victim / "victim.txt")
    with pytest.raises(storage.LinkRefused, match=r"\.dmt_lock is a symbolic link \(to .*victim.txt\)"):
        WorkdirLock(workdir).acquire()
    os.remove(workdir / ".dmt_lock")
    (workdir / ".dmt_lock").symlink_to(victim / "created_outside")
    with pytest.raises(storage.LinkRefused):
        WorkdirLock(workdir).acquire()
    os.remove(workdir / ".dmt_lock")
    os.mkfifo(workdir / ".dmt_lock")
    start = time.monotonic()
    with pytest.raises(storage.LinkRefused, match="not a regular file"):
        WorkdirLock(workdir).acquire()
    assert time.monotonic() - start < 5
    assert (victim / "victim.txt").read_text() == "precious" and sorted(os.listdir(victim)) == ["victim.txt"]
    os.remove(workdir / ".dmt_lock")
    with WorkdirLock(workdir), pytest.raises(WorkdirLocked):  # a plain file: the lock works as before
        WorkdirLock(str(workdir) + "/").acquire()


def test_writers_replace_a_link_and_refuse_a_linked_folder_or_a_fifo(tmp_path, victim):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").symlink_to(victim / "victim.txt")
    storage.write_text(workdir / "config.json", "{}")  # the link is replaced, its target untouched
    assert not (workdir / "config.json").is_symlink() and (workdir / "config.json").read_text() == "{}"
    (workdir / "pictures").symlink_to(victim)
    with pytest.raises(storage.LinkRefused, match="pictures is a symbolic link"):
        pictures.save_png(np.zeros((4, 4, 3), np.uint8), workdir / "pictures" / "step_1.png")
    os.mkfifo(workdir / "eval.jsonl")
    start = time.monotonic()
    with pytest.raises(storage.LinkRefused, match="eval.jsonl is not a regular file"):
        storage.append_line(workdir / "eval.jsonl", "{}")
    with pytest.raises(storage.LinkRefused, match="eval.jsonl is not a regular file"):
        storage.read_local(workdir / "eval.jsonl")
    assert time.monotonic() - start < 5
    (workdir / "ids.jsonl").symlink_to(victim / "victim.txt")
    with pytest.raises(storage.LinkRefused, match="ids.jsonl is a symbolic link"):
        storage.open_local(workdir / "ids.jsonl", os.O_WRONLY | os.O_APPEND)
    assert (victim / "victim.txt").read_text() == "precious" and sorted(os.listdir(victim)) == ["victim.txt"]
