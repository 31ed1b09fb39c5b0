"""A fine-tuning whose workdir and init live in a bucket (tests/gcs_emulator.py), as on a pod: from a
gs:// student_timm.safetensors, evaluated in the middle, killed, resumed with evaluation only at the
end, exported. Everything it reads and writes goes through the storage layer."""

import json
import signal

import numpy as np
from gcs_emulator import child_env, emulated_bucket
from helpers_run import REPO, Run

from dmt_jax import storage
from dmt_jax.export import export_timm
from dmt_jax.teachers import make_random_teacher

FIELDS = {
    "total_steps": 16,
    "batch_size": 16,
    "checkpoint_every": 4,
    "log_every": 2,
    "eval_every": 4,
    "eval_batch_size": 40,
    "data.demo_per_class_train": 8,
    "data.demo_per_class_val": 4,
}


def _args(workdir, demo_root, **fields) -> list[str]:
    fields = dict(FIELDS, **{"data.demo_root": str(demo_root)}, **fields)
    return [f"--config={REPO / 'configs' / 'finetune_demo.py'}", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in fields.items()
    ]


def test_finetune_in_a_bucket_from_a_bucket_init_killed_resumed_exported(tmp_path):
    with emulated_bucket() as bucket:
        init, workdir = f"{bucket}/students/student_timm.safetensors", f"{bucket}/ft"
        export_timm(make_random_teacher("mu/4", 32, seed=3).params, init)
        args = _args(workdir, tmp_path / "demo", init=init)

        first = Run(args, devices=2, module="dmt_jax.finetune", env=child_env())
        first.wait_for(r"^eval at step 8: ", timeout=300)
        first.wait_for(r"^step 10/")
        first.send(signal.SIGKILL)
        assert first.finish() == -signal.SIGKILL
        assert f"init: {init} (student file)" in first.output
        assert "eval at step 4: top1 " in first.output and ", best_step 4" in first.output  # an int stays one
        root = storage.path(workdir)
        steps = sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit())
        assert steps and steps[-1] in (8, 12), steps

        # Resumed with evaluation only at the end (eval_every is bookkeeping: allowed, listed).
        resumed = Run(args + ["--config.eval_every=0"], devices=2, module="dmt_jax.finetune", env=child_env())
        assert resumed.finish(timeout=300) == 0, resumed.output
        # The newest checkpoint, unless the kill landed while orbax copied it into place (in a bucket it
        # finishes a save object by object): then the one before it is used.
        (line,) = [line for line in resumed.lines if line.startswith("resuming from the checkpoint at step ")]
        start = int(line.split()[6])
        assert start in steps[-2:], (steps, resumed.output)
        evaluations = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
        # Evaluations past the resumed step were of steps trained again: dropped; then only the final one.
        assert [e["step"] for e in evaluations] == [s for s in (4, 8) if s <= start] + [16]
        assert evaluations[-1]["best_step"] in (4, 8, 16) and 0 <= evaluations[-1]["top1"] <= 100
        from safetensors.numpy import load

        exported = load((root / "classifier_timm.safetensors").read_bytes())
        assert exported["head.weight"].shape == (10, 64) and np.isfinite(exported["head.weight"]).all()
        names = {p.name for p in root.iterdir()}
        assert "config.json" in names and any(n.startswith("events.out.tfevents.") for n in names), names
        assert not (tmp_path / "gs:").exists() and not storage.path("gs:").exists()
