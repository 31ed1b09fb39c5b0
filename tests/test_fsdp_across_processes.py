"""fsdp that spans processes: two processes with one CPU device each, mesh data=1 fsdp=2, so every large
tensor of the student and of the teachers is split between the two hosts. The run trains, evaluates
(k-NN, probe, alignment: features fetched to every host) and exports on process 0 what both hold."""

import numpy as np
from helpers_run import Run, cli_args, free_port, read_state
from safetensors.numpy import load_file

from dmt_jax import export


def test_export_and_evaluation_when_fsdp_spans_processes(tmp_path):
    port = free_port()
    workdir = tmp_path / "run"
    runs = [
        Run(
            cli_args(
                workdir,
                tmp_path / "demo",
                total_steps=4,
                warmup_steps=1,
                checkpoint_every=4,
                evaluate=True,
                eval_every=100,
                linear_probe_epochs=5,
                export_at_end=True,
                eval_batch_size=9,  # not a multiple of the 2 devices: rounded up to 10
                fsdp_min_size=1000,
                mesh__data=1,
                mesh__fsdp=2,
            )
            + [
                f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            devices=1,
        )
        for i in range(2)
    ]
    rcs = [r.finish(timeout=300) for r in runs]
    assert rcs == [0, 0], "\n----\n".join(r.output for r in runs)
    assert "eval at step 4:" in runs[0].output
    exported = load_file(str(workdir / "student_timm.safetensors"))
    expected = export.timm_state_dict(read_state(workdir)["params"]["encoder"])
    assert exported.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(exported[k], expected[k])
