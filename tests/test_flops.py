"""The analytic FLOP counts (flops.py, Setup.flops_per_image: the progress line's MFU) against XLA's cost
analysis of the compiled step, nothing run: DMT's step (its count unchanged) and an agglomerative step
with a CLIP-like ViT, an EVA following the student's stages and a SAM teacher, in both stages.

Models are two blocks of width 384 (XLA also counts elementwise work, norms, GELU's polynomial,
softmax, the optimizer: about 4% above the matrix products at this width, less when wider), so XLA's
count must lie within [0.97, 1.07] of the analytic one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dmt_jax import flops, objective, parallel, train
from dmt_jax.config import base_config, teacher_options
from dmt_jax.models import EvaConfig, SamConfig, build_model
from dmt_jax.models import vit as vit_module
from dmt_jax.teachers import Teacher, TeacherSpec, make_random_teacher

W = 384
LOW, HIGH = 0.97, 1.07


@pytest.fixture(autouse=True)
def wide_variant(monkeypatch):
    monkeypatch.setitem(vit_module.VARIANTS, "w384", (W, 2, 6, 4 * W))


def xla_flops_per_image(setup, step_fn) -> float:
    c = setup.config
    images = jax.ShapeDtypeStruct((c.batch_size, setup.view_size, setup.view_size, 3), jnp.uint8,
                                  sharding=parallel.batch_sharding(setup.mesh))  # fmt: skip
    compiled = step_fn.lower(setup.abstract_state, setup.teacher_params, {"image": images}).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"]) / c.batch_size


def one_device():
    return parallel.make_mesh(1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_dmt_count_is_unchanged_and_near_xla(mask_ratio):
    c = base_config()
    c.img_size, c.student.variant, c.mask_ratio = 32, "w384/4", mask_ratio
    c.teachers = ("random:w384/4@32:1", "random:w384/4@32:2")
    c.batch_size, c.total_steps, c.teacher_dtype, c.dtype = 8, 10, "float32", "float32"
    setup = train.build(c, one_device())
    counted = setup.flops_per_image()
    # The count of before (bench/torch_reference.py's): teachers over all 65 tokens, student and heads 3x.
    n = objective.num_visible(64, mask_ratio)
    before = 2 * flops.vit_flops(W, 2, 65, 4, 4 * W) + 3 * flops.vit_flops(W, 2, n + 1, 4, 4 * W)
    assert counted == before + 3 * 2 * (n + 1) * W * 2 * W
    # Masked, the teachers' last blocks run q, proj and the MLP, and attend, only at CLS + the visible
    # patches, which the count (kept for comparability) does not take off.
    last_block_saving = 2 * (64 - n) * (2 * (2 * W * W + 2 * W * 4 * W) + 4 * 65 * W)
    ratio = xla_flops_per_image(setup, setup.step) / (counted - last_block_saving)
    print(f"DMT mask {mask_ratio}: XLA / (count - last blocks' saving) {ratio:.4f}")
    assert LOW <= ratio <= HIGH, ratio


def random_teacher(family, config, seed) -> Teacher:
    images = jnp.zeros((1, config.img_size, config.img_size, 3))
    params = jax.jit(build_model(family, config).init)(jax.random.PRNGKey(seed), images)["params"]
    return Teacher(TeacherSpec(format="random", family=family, config=config), params)


@pytest.mark.parametrize(
    "mask_ratio,resample,norm",
    [(0.0, "student_to_teacher", "layernorm"), (0.5, "teacher_to_student", "phi_s")],
)
def test_agglomerative_count_is_near_xla_in_every_stage(mask_ratio, resample, norm):
    teachers = [
        make_random_teacher("w384/8", 64, 1, fmt="clip", proj_dim=W // 2),
        random_teacher("eva", EvaConfig(width=W, depth=2, num_heads=6, mlp_dim=1024, img_size=56), 2),
        random_teacher(
            "sam",
            SamConfig(
                embed_dim=W,
                depth=2,
                num_heads=6,
                mlp_dim=4 * W,
                img_size=64,
                window_size=3,
                global_attn_indexes=(1,),
            ),
            3,
        ),  # fmt: skip
    ]
    c = base_config()
    c.img_size, c.student.variant, c.student.num_reg_tokens = 32, "w384/4", 1
    c.objective, c.teachers = "agglomerative", ("clip=a", "eva=b", "sam=c")
    c.agglomerative.per_teacher = {
        "clip": teacher_options(norm=norm, summary_head="mlp_v1"),
        "eva": teacher_options(follow_stages=True, dense_head="mlp", summary_norm="standardize"),
        "sam": teacher_options(summary_head="none", dense_head="ln_linear"),
    }
    c.agglomerative.resample, c.mask_ratio, c.stages = resample, mask_ratio, ((0, 32), (3, 48))
    c.batch_size, c.total_steps, c.teacher_dtype, c.dtype = 8, 10, "float32", "float32"
    setup = train.build(c, one_device(), teachers=teachers)
    assert setup.stack.img_sizes(32)[1] == 28 and setup.stack.img_sizes(48)[1] == 42  # EVA /14 follows
    counts = [setup.flops_per_image(start) for start, _ in c.stages]
    stages = (0, 1) if mask_ratio == 0 else (1,)  # the second stage: the EVA resized in the step
    for i in stages:
        ratio = xla_flops_per_image(setup, setup.step.fns[i]) / counts[i]
        print(f"mask {mask_ratio} {resample} {norm}, stage {c.stages[i]}: XLA / analytic {ratio:.4f}")
        assert LOW <= ratio <= HIGH, (c.stages[i], ratio)
    # Without a step: the stages weighted by their steps (3 at 32 px, 7 at 48 px).
    assert setup.flops_per_image() == pytest.approx((3 * counts[0] + 7 * counts[1]) / 10)
