"""An agglomerative run with every option on (two teachers on other grids than the student's, one at a
higher resolution; summary and dense targets; PHI-S, standardized and LayerNorm targets; MLP v1 and v2
heads; teacher dropping; two resolution stages; fsdp) gives the same state in two processes (two virtual
CPU devices each, jax.distributed on localhost) as in one process with four devices: the statistics
are computed from the global batch inside the step.

The statistics are summed over the batch in a fixed order (parallel.ordered_batch_sum), so both runs
hold the same bits: PHI-S's eigenvectors would turn last-bit differences of a collective's own order
(gloo between processes, in-process otherwise) into differences of about 1e-7 / eigengap (1e-3 for
these random teachers' nearly isotropic features), which training spreads into the whole student."""

from pathlib import Path

import pytest
from helpers_run import REPO, Run, free_port, max_rel_err, read_state, tiny_fields, trees_equal

STEPS = 6
RECIPE = f"""
import runpy

from dmt_jax.config import teacher_options


def get_config():
    c = runpy.run_path({str(REPO / "configs" / "demo.py")!r})["get_config"]()
    c.objective = "agglomerative"
    c.mask_ratio = 0.0  # the student's adapted features resampled to each teacher's grid
    c.student.num_reg_tokens = 1
    c.agglomerative.per_teacher = {{
        "dino": teacher_options(norm="phi_s", summary_norm="standardize", summary_weight=0.5),
        "sam": teacher_options(norm="layernorm", summary_head="none", dense_head="mlp_v1", dense_weight=2.0),
    }}
    c.agglomerative.teacher_drop = 0.5
    c.agglomerative.phi_s_steps = 2
    c.stages = ((0, 32), (3, 48))
    return c
"""


def args(recipe, workdir, demo_root, *extra):
    fields = tiny_fields(
        demo_root,
        teachers="('dino=random:mu/4@32:1','sam=random:mu/8@96:2')",
        total_steps=STEPS,
        checkpoint_every=3,
        mesh__fsdp=2,
        fsdp_min_size=1000,
    )
    return [
        f"--config={recipe}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in fields.items()),
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("agglomerative_multiprocess")
    recipe = base / "recipe.py"
    recipe.write_text(RECIPE)
    demo, multi_dir, single_dir = base / "demo", base / "multi", base / "single"
    port = free_port()
    multi = [
        Run(
            args(
                recipe,
                multi_dir,
                demo,
                f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ),
            devices=2,
        )  # fmt: skip
        for i in range(2)
    ]
    multi_rcs = [r.finish(timeout=900) for r in multi]
    # After the pair, not beside it: on a loaded 2-core machine a third process starting with them can
    # delay one of the pair past gloo's 30 s connection deadline.
    single = Run(args(recipe, single_dir, demo), devices=4)
    return multi, multi_rcs, single, single.finish(timeout=900), multi_dir, single_dir


def test_two_processes_equal_one_process_with_every_option_on(runs):
    multi, multi_rcs, single, single_rc, multi_dir, single_dir = runs
    assert multi_rcs == [0, 0], [r.output for r in multi]
    assert single_rc == 0, single.output
    assert "agglomerative: views of 96 px; student at 32 px from step 0, 48 px from step 3" in single.output
    for step in (3, STEPS):  # the stage boundary, and after the second stage
        a, b = read_state(multi_dir, step), read_state(single_dir, step)
        assert int(a["step"]) == step
        assert trees_equal(a["stats"], b["stats"]), step  # the same bits
        for part in ("params", "opt_state"):
            assert max_rel_err(a[part], b[part]) < 1e-5, (step, part)
    final = read_state(single_dir)
    assert int(final["stats"]["dino"]["dense"]["steps"]) == 2  # PHI-S estimated over 2 steps, then frozen
    assert sorted(final["params"]["heads"]) == ["dino_dense", "dino_summary", "sam_dense"]
    assert Path(single_dir, "config.json").exists()
