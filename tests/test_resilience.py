"""A run never loses work: SIGKILL, SIGTERM, a corrupt checkpoint, a full disk, a non-finite loss,
unreadable images. Each fault is injected into a tiny demo run (tests/helpers_run.py) and the run is
compared with an uninterrupted one.

The subprocess runs (reference, SIGKILL, SIGTERM and their restarts) are started together once for
the module; the other faults run in process, on conftest's 8 virtual devices.
"""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers_run import (
    Run,
    checkpoint_steps,
    cli_args,
    example_ids,
    fill_disk_under,
    finetune_args,
    finetune_config,
    max_rel_err,
    read_state,
    scalars,
    tiny_config,
    trees_equal,
)

from dmt_jax import checkpoint, loop, runner

STEPS = 20  # long enough that a signal sent at step 6 lands well before the end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference, SIGKILL'd and SIGTERM'd runs side by side, then the two restarts (SIGTERM's on 4
    devices instead of 8: an elastic restore)."""
    base = tmp_path_factory.mktemp("resilience")
    demo = base / "demo"
    ref, killed, termed = (Run(cli_args(base / name, demo, total_steps=STEPS)) for name in ("ref", "k", "t"))

    killed.wait_for(r"^step 6/")
    # Checkpoint 4 is written in the background (async_checkpoints): kill once it is on disk, so that the
    # kill lands mid-run after a checkpoint. Which one the restart resumes from is timing; exactness is not.
    deadline = time.monotonic() + 60
    while not checkpoint_steps(base / "k") and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send(signal.SIGKILL)
    termed.wait_for(r"^step 6/")
    termed.send(signal.SIGTERM)
    t_signal = time.monotonic()
    term_rc = termed.finish()
    term_seconds = time.monotonic() - t_signal
    kill_rc = killed.finish()
    at_kill = checkpoint_steps(base / "k")
    at_term = checkpoint_steps(base / "t")
    assert ref.finish() == 0, ref.output

    killed2 = Run(cli_args(base / "k", demo, total_steps=STEPS))
    termed2 = Run(cli_args(base / "t", demo, total_steps=STEPS), devices=4)
    return SimpleNamespace(
        base=base,
        demo=demo,
        ref=ref,
        killed=killed,
        termed=termed,
        kill_rc=kill_rc,
        term_rc=term_rc,
        term_seconds=term_seconds,
        at_kill=at_kill,
        at_term=at_term,
        killed2=killed2,
        killed2_rc=killed2.finish(),
        termed2=termed2,
        termed2_rc=termed2.finish(),
    )


def test_sigkill_then_restart_is_bit_exact(runs):
    assert runs.kill_rc == -signal.SIGKILL
    assert runs.at_kill and runs.at_kill[-1] < STEPS, f"the kill should land mid-run: {runs.at_kill}"
    assert runs.killed2_rc == 0, runs.killed2.output
    assert f"resuming from the checkpoint at step {runs.at_kill[-1]}" in runs.killed2.output
    reference, resumed = read_state(runs.base / "ref"), read_state(runs.base / "k")
    assert int(resumed["step"]) == STEPS
    assert trees_equal(resumed, reference)  # params, Adam moments, step and rng: bit for bit
    # The same images in the same order: every step's ids (a rerun step's later line wins).
    assert example_ids(runs.base / "k") == example_ids(runs.base / "ref")
    assert sorted(example_ids(runs.base / "ref")) == list(range(1, STEPS + 1))


def test_sigterm_checkpoints_the_step_reached_and_exits_0(runs):
    assert runs.term_rc == 0, runs.termed.output
    saved = [line for line in runs.termed.lines if line.startswith("stop requested: checkpoint at step")]
    assert len(saved) == 1, runs.termed.output
    step = int(saved[0].split("step ")[1].split()[0])
    assert 6 <= step < STEPS and runs.at_term[-1] == step
    assert runs.term_seconds < 60  # one step, the save and the exit (generous for a loaded machine)
    # The restart (on 4 devices instead of 8) continues from that step to the same parameters.
    assert runs.termed2_rc == 0, runs.termed2.output
    assert f"resuming from the checkpoint at step {step}" in runs.termed2.output
    resumed, reference = read_state(runs.base / "t"), read_state(runs.base / "ref")
    assert int(resumed["step"]) == STEPS
    assert max_rel_err(resumed["params"], reference["params"]) < 1e-5
    assert example_ids(runs.base / "t") == example_ids(runs.base / "ref")


# tensorstore calls back into an asyncio loop that orbax has closed after the failed read: harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(runs, tmp_path, capsys):
    workdir = tmp_path / "work"
    shutil.copytree(runs.base / "ref", workdir)
    newest = checkpoint_steps(workdir)[-1]
    damaged = _truncate_array_files(workdir / "checkpoints" / str(newest))
    assert damaged

    loop.train_and_evaluate(tiny_config(runs.demo, total_steps=STEPS), str(workdir))
    out = capsys.readouterr().out
    previous = checkpoint_steps(runs.base / "ref")[-2]
    assert f"checkpoint at step {newest} in {workdir / 'checkpoints'} is unreadable" in out
    assert f"resuming from the checkpoint at step {previous}" in out
    assert len(list((workdir / "checkpoints_unreadable").glob(f"{newest}-*"))) == 1  # kept for a post-mortem
    assert max_rel_err(read_state(workdir)["params"], read_state(runs.base / "ref")["params"]) < 1e-6


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
    import jax.numpy as jnp

    state = {"w": jnp.arange(8.0)}
    position = {"next_index": 0, "bad_images": 0, "global_batch": 8}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.save(1, state, position) and ckpt.save(2, state, position)
    ckpt.close()
    for step in (1, 2):
        _truncate_array_files(tmp_path / "checkpoints" / str(step))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    with pytest.raises(
        checkpoint.CheckpointError, match=r"no checkpoint .* can be restored \(steps \[1, 2\]\)"
    ):
        ckpt.restore_latest(state)
    assert checkpoint_steps(tmp_path) == [1, 2]  # nothing moved, nothing deleted
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above, after a write
def test_disk_full_during_saves(runs, tmp_path, capsys, monkeypatch):
    """A full disk at step 8 (the run goes on) and at the last step (it stops with exit code 1);
    the rerun after space is freed ends where the uninterrupted run did."""
    workdir = tmp_path / "work"
    _fill_disk_during_saves(monkeypatch, workdir / "checkpoints", steps=(8, STEPS))
    config = tiny_config(runs.demo, total_steps=STEPS, keep_checkpoints=10)
    with pytest.raises(SystemExit) as stopped:
        loop.train_and_evaluate(config, str(workdir))
    assert stopped.value.code == 1
    out, err = capsys.readouterr()
    assert _line(out, "checkpoint at step 8 NOT saved (OSError: [Errno 28] No space left on device")
    assert _line(out, f"checkpoint at step {STEPS} NOT saved").endswith("newest intact checkpoint: step 16")
    assert _line(err, f"error: the checkpoint at step {STEPS} could not be written").endswith(
        "Free space and run again to continue from it"
    )
    assert "newest checkpoint: step 16 in " in err
    assert checkpoint_steps(workdir) == [4, 12, 16]  # the failed saves left the others intact...
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]  # ...and no debris
    read_state(workdir, 4)  # still readable

    monkeypatch.undo()  # space freed: the rerun continues from step 16
    loop.train_and_evaluate(config, str(workdir))
    assert "resuming from the checkpoint at step 16" in capsys.readouterr().out
    assert max_rel_err(read_state(workdir)["params"], read_state(runs.base / "ref")["params"]) < 1e-6


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys):
    config = tiny_config(tmp_path / "demo", base_lr=1e30, warmup_steps=4, checkpoint_every=2)
    with pytest.raises(SystemExit) as stopped:
        loop.train_and_evaluate(config, str(tmp_path / "work"))
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: non-finite loss at step "), err
    last_good = int(err[-1].split("last good checkpoint: step ")[1].split()[0])
    assert last_good == checkpoint_steps(tmp_path / "work")[-1]
    assert all(np.isfinite(x).all() for x in _leaves(read_state(tmp_path / "work")["params"]))


def test_nonfinite_skip_and_unreadable_images_go_on(tmp_path, capsys):
    """nonfinite='skip' runs to the end; broken images are skipped and counted in the metrics."""
    from dmt_jax import data

    config = tiny_config(tmp_path / "demo", base_lr=1e30, warmup_steps=4, nonfinite="skip")
    broken = _break_images(data.make_source(config.data, "train"))
    loop.train_and_evaluate(config, str(tmp_path / "work"))
    out = capsys.readouterr().out
    assert "non-finite steps skipped" in out and "unreadable images skipped so far" in out

    logged = scalars(tmp_path / "work")
    assert sum(logged["nonfinite_steps"].values()) > 0
    # 12 steps x 16 images read 192 positions of the 80-image epoch: each broken image 2 or 3 times.
    assert 2 * broken <= logged["bad_images"][12] <= 3 * broken
    assert int(read_state(tmp_path / "work")["step"]) == 12
    assert all(np.isfinite(x).all() for x in _leaves(read_state(tmp_path / "work")["params"]))


def test_sigint_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    preemption = runner.Preemption(agree_every=1)
    assert not preemption.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
    assert preemption.should_stop(2)
    preemption.close()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_example_id_log_drops_a_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "example_ids.p0.jsonl"
    path.write_text('{"step": 1, "ids": [3, 1]}\n{"step": 2, "ids": [0,')
    with loop._open_ids_log(str(tmp_path)) as f:
        f.write('{"step": 2, "ids": [0, 2]}\n')
    assert example_ids(tmp_path) == {1: [3, 1], 2: [0, 2]}


def _truncate_array_files(step_dir: Path) -> list[Path]:
    """Cuts every array data file of a checkpoint in half (as a disk that filled, or a torn copy)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)
    return files


def _fill_disk_during_saves(monkeypatch, checkpoints: Path, steps):
    """Every file orbax opens for writing inside the temporary directory of these steps' saves fails
    with ENOSPC, after tensorstore has written the array data (the low-level write orbax's metadata
    goes through is Python's open)."""
    fill_disk_under(monkeypatch, tuple(f"{checkpoints}/{step}.orbax-checkpoint-tmp" for step in steps))


def _break_images(source) -> int:
    """A truncated JPEG, a PNG overwritten with noise, a dangling link: three unreadable images."""
    jpeg = next(p for p in source.paths if p.endswith(".jpg"))
    png = next(p for p in source.paths if p.endswith(".png"))
    link = next(p for p in reversed(source.paths) if p.endswith(".jpg"))
    with open(jpeg, "r+b") as f:
        f.truncate(200)
    Path(png).write_bytes(np.random.default_rng(0).bytes(500))
    os.remove(link)
    os.symlink(link + ".missing", link)
    return 3


def _line(text: str, start: str) -> str:
    found = [line for line in text.splitlines() if line.startswith(start)]
    assert len(found) == 1, f"expected one line starting {start!r} in:\n{text}"
    return found[0]


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ---------------------------------------------------------------- stop requests outside a step, interrupts


def _sigterm_when(predicate, timeout: float = 300):
    """SIGTERM to this process once predicate() holds (polled); returns the monotonic time it was sent."""
    sent = []

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return sent


def test_sigterm_during_an_evaluation_checkpoints_at_once(tmp_path, monkeypatch, capsys):
    """Each evaluation batch takes a second (a slow validation set); SIGTERM arrives during the first
    batch of the evaluation at step 4: the run checkpoints step 4 and ends within a few seconds, not
    after the evaluation. The resume (eval.jsonl's last line torn meanwhile) evaluates and exports."""
    from dmt_jax import finetune

    def slow(batches):
        for batch in batches:
            evaluating.set()
            time.sleep(1.0)
            yield batch

    real_eval_input, evaluating = runner._eval_input, threading.Event()
    monkeypatch.setattr(runner, "_eval_input", lambda *args: list(slow(real_eval_input(*args))))
    fields = dict(total_steps=8, eval_every=4, export_at_end=True, eval_batch_size=8)
    workdir, demo = tmp_path / "run", tmp_path / "demo"
    sent = _sigterm_when(evaluating.is_set)
    assert finetune.finetune(finetune_config(demo, **fields), str(workdir)) == {}
    took = time.monotonic() - sent[0]
    out = capsys.readouterr().out
    assert "stop requested during the evaluation at step 4: checkpoint at step 4 saved" in out, out
    assert checkpoint_steps(workdir) == [4] and took < 10, took  # a batch, the save; not 5 more batches
    assert not (workdir / "eval.jsonl").exists()

    monkeypatch.undo()
    (workdir / "eval.jsonl").write_text('{"step": 4, "top1": 1')  # a kill during an append
    final = finetune.finetune(finetune_config(demo, **fields), str(workdir))
    assert "resuming from the checkpoint at step 4" in capsys.readouterr().out
    lines = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [8] and final["top1"] == lines[0]["top1"]
    assert (workdir / "classifier_timm.safetensors").exists()


def test_sigterm_while_the_first_step_compiles_ends_at_once(tmp_path):
    """A ViT-B/16 fine-tuning compiles its first step for many seconds: a SIGTERM then ends the run at once
    (nothing learned yet: nothing to save), exit 0, no abort from the compile left running."""
    args = finetune_args(tmp_path / "run", tmp_path / "demo", model__variant="B/16", total_steps=4)
    run = Run(["first-step", "dmt_jax.finetune", *args], devices=1, module="tests.patched_run")
    run.wait_for(r"^first step compiling$")
    run.send(signal.SIGTERM)
    sent = time.monotonic()
    assert run.finish() == 0, run.output
    assert time.monotonic() - sent < 30
    said = "stop requested while the first step compiled: nothing to save (resumes from the start)"
    assert said in run.output
    assert not any(line.startswith("step ") for line in run.lines), run.output  # it did not wait for step 1
    assert "Traceback" not in run.output and "terminate called" not in run.output
    assert checkpoint_steps(tmp_path / "run") == []


def test_a_second_ctrl_c_ends_in_one_line_and_removes_the_partial_checkpoint(tmp_path):
    """Saves from step 8 on never finish (tests/patched_run.py): the first Ctrl-C asks for a checkpoint,
    the second, during that save, ends the run at once: one line, exit 130, no partial folder left."""
    workdir, demo = tmp_path / "run", tmp_path / "demo"
    args = ["held-saves", "8", "dmt_jax.main", *cli_args(workdir, demo, total_steps=200)]
    run = Run(args, module="tests.patched_run")
    run.wait_for("^held$")
    run.send(signal.SIGINT)
    time.sleep(2)
    run.send(signal.SIGINT)
    assert run.finish() == 130, run.output
    after_held = run.output.split("held\n", 1)[1].splitlines()
    assert [line for line in after_held if not line.startswith("step ")] == [
        "interrupted: stopped without a new checkpoint; run again to resume from the newest"
    ], run.output
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]
    resumed = Run(cli_args(workdir, demo, total_steps=8, resume_allow_changes=True))  # a shorter run
    assert resumed.finish() == 0, resumed.output
    assert "resuming from the checkpoint at step 4" in resumed.output


def test_a_refused_resume_says_one_line_before_anything_else(tmp_path, capsys):
    """A changed student (its arrays change shape) is refused naming the change, even with
    resume_allow_changes, before any array is read, the summary or 'resuming from' is said, or an events
    file is opened; a fine-tuning pointed at a distillation's workdir, and the reverse, in one line."""
    from dmt_jax import finetune
    from dmt_jax.errors import UserError
    from dmt_jax.run_record import ResumeRefused

    demo, distilled, tuned = tmp_path / "demo", tmp_path / "distilled", tmp_path / "tuned"
    loop.train_and_evaluate(tiny_config(demo, total_steps=2, checkpoint_every=2), str(distilled))
    finetune.finetune(finetune_config(demo, total_steps=2, checkpoint_every=2), str(tuned))
    events = sorted(p.name for p in distilled.glob("events.out.tfevents.*"))
    capsys.readouterr()

    changed = tiny_config(demo, total_steps=4, student__pos_embed="learned", resume_allow_changes=True)
    with pytest.raises(ResumeRefused) as refused:
        loop.train_and_evaluate(changed, str(distilled))
    assert "student.pos_embed: 'sincos' -> 'learned'" in str(refused.value)
    assert "its arrays have other shapes, so it cannot be resumed" in str(refused.value)
    assert capsys.readouterr().out == ""  # no summary, no "resuming from"
    assert sorted(p.name for p in distilled.glob("events.out.tfevents.*")) == events

    refusal = r"holds the checkpoints of a distillation \(python -m dmt_jax.main\), not of a fine-tuning: "
    with pytest.raises(UserError, match=refusal + r"choose another --workdir \(to fine-tune its student, "):
        finetune.finetune(finetune_config(demo, total_steps=2), str(distilled))
    refusal = r"holds the checkpoints of a fine-tuning \(python -m dmt_jax.finetune\), not of a distillation"
    with pytest.raises(UserError, match=refusal):
        loop.train_and_evaluate(tiny_config(demo, total_steps=2), str(tuned))
    with pytest.raises(ResumeRefused, match="model.global_pool: 'avg' -> 'token'"):
        finetune.finetune(finetune_config(demo, total_steps=2, model__global_pool="token"), str(tuned))
