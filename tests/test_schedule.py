"""The lr schedule: a short run (total_steps) keeps the warmup's fraction of the run and reaches its
peak; after a skipped non-finite step the optimizer's schedule still follows state.step (the lr logged)."""

import jax
import numpy as np
import pytest

from dmt_jax import parallel, summary, train
from dmt_jax.config import base_config


@pytest.mark.parametrize(
    "fields, steps, steps_per_epoch, warmup",
    [
        (dict(total_steps=20), 20, 1.0, 1),  # 20 of 300 epochs: the first 1/15 of the run
        (dict(total_steps=3000), 3000, 1.0, 200),
        (dict(total_steps=20, warmup_steps=5), 20, 1.0, 5),
        (dict(total_steps=20, warmup_steps=50), 20, 1.0, 19),  # never the whole run
        (dict(), 3000, 10.0, 200),  # epochs: warmup_epochs x steps per epoch
        (dict(total_steps=20, warmup_epochs=0.0), 20, 1.0, 0),
    ],
)
def test_warmup_keeps_its_fraction_of_a_short_run(fields, steps, steps_per_epoch, warmup):
    config = base_config()
    config.update(fields)
    assert train.warmup_steps(config, steps, steps_per_epoch) == warmup


def test_a_short_run_reaches_the_peak_lr():
    config = base_config()
    config.total_steps, config.batch_size = 20, 256
    schedule = train.lr_schedule(config, 20, steps_per_epoch=1.0)
    lrs = [float(schedule(s)) for s in range(20)]
    assert max(lrs) == pytest.approx(config.base_lr) and lrs[0] == 0.0 and lrs[-1] < lrs[2]


@pytest.fixture(scope="module")
def tiny_setup():
    config = base_config()
    config.img_size, config.student.variant = 32, "mu/4"
    config.teachers, config.teacher_dtype, config.dtype = ("random:mu/4@32:1",), "float32", "float32"
    config.batch_size, config.total_steps, config.warmup_steps = 8, 10, 4
    return train.build(config, parallel.make_mesh(1, 1, devices=jax.devices()[:1]))


class _FortyImages:
    num_classes = 4

    def __len__(self):
        return 40


def test_startup_summary_says_what_the_run_will_do(tiny_setup):
    text = summary.describe_run(tiny_setup, _FortyImages())
    assert text.splitlines() == [
        f"data: demo dataset in {tiny_setup.config.data.demo_root}: 40 images, 4 classes",
        "teacher 0: random mu/4 at 32 px, 8x8 grid (random:mu/4@32:1)",
        "student: mu/4 at 32 px, 8x8 grid, mask ratio 0.75",
        "schedule: 10 steps of batch 8 = 2 epochs; warmup 4 steps, then cosine from peak lr 4.69e-06 to 0",
        "devices: 8 x cpu in 1 process(es); mesh data=1 x fsdp=1",
    ]


def test_skipped_step_keeps_the_optimizer_schedule_at_the_step(tiny_setup):
    setup, mesh = tiny_setup, tiny_setup.mesh
    state = setup.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    good = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)}
    nan_teachers = jax.tree.map(lambda x: x * np.nan, setup.teacher_params)  # a non-finite loss
    skipped = []
    for params in (setup.teacher_params, nan_teachers, setup.teacher_params):
        state, metrics = setup.step(state, params, parallel.global_batch(good, mesh))
        skipped.append(int(metrics["nonfinite"]))
    assert skipped == [0, 1, 0] and int(state.step) == 3
    counts = [
        int(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if jax.tree_util.keystr(path).endswith(".count")
    ]
    assert counts and set(counts) == {3}, counts  # the skipped step advanced the schedule too
    # The lr logged for the last step (index 2) is the one its update used: schedule(2), not schedule(1).
    assert float(metrics["lr"]) == pytest.approx(float(setup.schedule(2)))
    assert float(setup.schedule(2)) != pytest.approx(float(setup.schedule(1)))
