"""The agglomerative objective in the train step: config fields and their checks, parameters keyed by
teacher name, resolution stages (one compile each) and a resume across a stage boundary that is
bit-exact, with statistics (PHI-S, standardization) and teacher dropping on."""

import jax
import numpy as np
import pytest

from dmt_jax import checkpoint, parallel, train, validate
from dmt_jax import config as config_lib
from dmt_jax.config import base_config, teacher_options

BATCH = 16


def agglomerative_config(**overrides):
    """Three random teachers on three grids (8x8, 12x12 at 96 px, 4x4 following the student's stages:
    6x6 at 48 px), every option on."""
    c = base_config()
    c.img_size = 32
    c.student.variant = "mu/4"
    c.student.num_reg_tokens = 1
    c.student.drop_path = 0.1
    c.objective = "agglomerative"
    c.teachers = ("dino=random:mu/4@32:1", "sam=random:mu/8@96:2", "clip=random:mu/8@32:3")
    c.agglomerative.per_teacher = {
        "dino": teacher_options(norm="phi_s", summary_weight=0.5),
        "sam": teacher_options(norm="standardize", summary_head="none", dense_weight=2.0),
        "clip": teacher_options(
            summary_head="mlp_v1", dense_head="ln_linear", summary_norm="standardize", follow_stages=True
        ),
    }
    c.agglomerative.teacher_drop = 0.5
    c.agglomerative.phi_s_steps = 4
    c.agglomerative.resample = "teacher_to_student"
    c.mask_ratio = 0.5
    c.stages = ((0, 32), (3, 48))
    c.teacher_dtype = c.dtype = "float32"
    c.batch_size = BATCH
    c.total_steps = 20
    c.warmup_steps = 2
    c.base_lr = 1e-2
    c.fsdp_min_size = 1000
    for k, v in overrides.items():
        node, *path = k.split("__")
        target = c
        for p in [node, *path][:-1]:
            target = target[p]
        target[[node, *path][-1]] = v
    return c


def batches(n, size):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)} for _ in range(n)]


def test_fields_are_checked_and_listed():
    assert validate.config_problems(agglomerative_config()) == []
    c = agglomerative_config(mask_ratio=0.5, agglomerative__resample="student_to_teacher")
    c.teachers = ("dino=random:mu/4@32:1", "random:mu/8@32:3", "dino=random:mu/8@96:2")
    c.agglomerative.per_teacher = {"dino": {"norm": "whiten"}, "clipp": {"nrom": "phi_s"}}
    c.teacher_weights = (1.0, 1.0, 1.0)
    problems = validate.config_problems(c)
    for words in ("--config.agglomerative.per_teacher.dino.norm='whiten': must be one of",
                  "config field agglomerative.per_teacher.clipp.'nrom' does not exist; did you mean 'norm'?",
                  "name every teacher of an agglomerative run, NAME=ENTRY", "dino repeated",
                  "per_teacher names clipp, which no teacher entry has", "--config.teacher_weights is DMT's",
                  "set --config.agglomerative.resample=teacher_to_student"):  # fmt: skip
        assert any(words in p for p in problems), (words, problems)
    dmt = base_config()
    dmt.stages = ((0, 32), (5, 30))
    problems = validate.config_problems(dmt)
    assert any("--config.stages needs --config.objective=agglomerative" in p for p in problems), problems
    assert any("student sizes [30] are not multiples of its patch size 16" in p for p in problems), problems
    assert config_lib.stage_list(((1, 32),)) and config_lib.stage_list(((0, 32), (0, 48)))
    lines = "\n".join(config_lib.help_lines(config_lib.BASE_SCHEMA))
    for name in ("objective = 'dmt'", "stages = ()", "agglomerative.teacher_drop = 0.0",
                 "agglomerative.per_teacher.NAME.norm = 'layernorm'"):  # fmt: skip
        assert name in lines, name
    # A recipe's per-teacher block is not an unknown field; a typo beside it is.
    recipe = agglomerative_config()
    recipe.unlock()
    recipe.agglomerative.teacher_dorp = 0.5
    assert config_lib.unknown_fields(recipe, base_config()) == [
        "config field 'agglomerative.teacher_dorp' does not exist; did you mean 'agglomerative.teacher_drop'?"
    ]


def test_parameters_are_keyed_by_teacher_name():
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    shapes = []
    for teachers in (
        ("a=random:mu/4@32:1", "b=random:mu/8@64:2"),
        ("b=random:mu/8@64:2", "a=random:mu/4@32:1"),
    ):
        c = agglomerative_config(teachers=teachers, stages=())
        c.agglomerative.per_teacher = {}
        setup = train.build(c, mesh)
        shapes.append(jax.tree.map(lambda x: x.shape, setup.abstract_state.params))
    assert shapes[0] == shapes[1]
    assert sorted(shapes[0]["heads"]) == ["a_dense", "a_summary", "b_dense", "b_summary"]
    assert shapes[0]["encoder"]["reg_token"] == (1, 2, 64)  # b's summary token + the student's register


def run(setup, state, data, mesh):
    losses = []
    for b in data:
        state, metrics = setup.step(state, setup.teacher_params, parallel.global_batch(b, mesh))
        losses.append({k: float(v) for k, v in metrics.items()})
    return state, losses


def test_resume_across_a_stage_boundary_is_bit_exact(tmp_path):
    config = agglomerative_config()
    config.mesh.data, config.mesh.fsdp = 4, 2
    mesh = parallel.make_mesh(4, 2)
    setup = train.build(config, mesh)
    assert isinstance(setup.step, train.StagedStep) and setup.view_size == 96
    # clip (/8, converted at 32 px) follows the student: 4x4 at 32 px, 6x6 at 48 px; the others keep theirs.
    assert [setup.stack.grids_at(px) for px in (32, 48)] == [[8, 12, 4], [8, 12, 6]]
    stage = train.stage_targets(setup.targets, setup.stack, train.teacher_names(config), 48)
    assert {t.name: t.grid for t in stage} == {"dino": (8, 8), "sam": (12, 12), "clip": (6, 6)}
    data = batches(6, setup.view_size)
    reference, ref_metrics = run(setup, setup.init_state(jax.random.PRNGKey(0)), data, mesh)
    reference = jax.device_get(reference)

    state, first = run(setup, setup.init_state(jax.random.PRNGKey(0)), data[:2], mesh)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    assert ckpt.save(2, state, {"next_index": 2 * BATCH, "bad_images": 0, "global_batch": BATCH})
    ckpt.close()
    del state
    restored, _ = checkpoint.Checkpointer(str(tmp_path / "ckpt")).restore_latest(setup.abstract_state)
    assert isinstance(restored, train.StatsTrainState) and int(restored.step) == 2
    resumed, rest = run(setup, restored, data[2:], mesh)  # steps 3..6: the second stage from step 3
    resumed = jax.device_get(resumed)

    assert first + rest == ref_metrics  # every metric of every step, exactly
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), resumed, reference)
    assert jax.tree.all(same), jax.tree.map(lambda a, b: float(np.abs(a - b).max()), resumed, reference)
    # The statistics did their work: PHI-S pooled 4 steps, then froze; standardization moved.
    assert int(reference.stats["dino"]["dense"]["steps"]) == 4
    assert not np.allclose(reference.stats["sam"]["dense"]["mean"], 0)
    assert 0 < ref_metrics[-1]["teacher_kept/clip"] <= 1 and "loss_summary/sam" not in ref_metrics[-1]


@pytest.mark.parametrize("px", [32, 48])
def test_stage_position_table_is_the_stored_one_resized(px):
    c = agglomerative_config(stages=())
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    setup = train.build(c, mesh)
    params = jax.device_get(setup.init_state(jax.random.PRNGKey(0)).params)
    resized = train.with_position_table(params, 8, px // 4)
    pos = resized["encoder"]["pos_embed"]
    regs = params["encoder"]["reg_token"].shape[1]
    assert pos.shape == (1, 1 + regs + (px // 4) ** 2, 64)
    np.testing.assert_array_equal(pos[:, : 1 + regs], params["encoder"]["pos_embed"][:, : 1 + regs])
    if px == 32:
        assert resized is params


@pytest.mark.parametrize("shape", [(4, 2), (2, 1), (3, 1)])  # 8 and 2 batch shards: the butterfly; 3: psum
def test_ordered_batch_sum(shape):
    mesh = parallel.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
    batch_sum = parallel.ordered_batch_sum(mesh)
    x = np.random.default_rng(0).standard_normal((24 * 5, 7)).astype(np.float32)
    placed = jax.device_put(x, parallel.batch_sharding(mesh))
    total = jax.jit(batch_sum)(placed)
    np.testing.assert_allclose(total, x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
    outer = jax.jit(lambda a: batch_sum(a, lambda r: r.T @ r))(placed)
    np.testing.assert_allclose(outer, x.T.astype(np.float64) @ x, rtol=1e-5, atol=1e-4)
    shards = [np.asarray(s.data) for s in total.addressable_shards]
    assert all(np.array_equal(s, shards[0]) for s in shards)  # every device holds the same bits


def test_teachers_of_several_families():
    """A CLIP-like ViT (projected summary), a SigLIP-like one (no CLS, MAP summary) and a SAM encoder at
    twice the student's resolution (no summary, the neck's 256 channels), each at its own input size."""
    from dmt_jax.models.sam import SamConfig, SamEncoder
    from dmt_jax.teachers import Teacher, TeacherSpec, make_random_teacher

    sam_config = SamConfig(
        embed_dim=64, depth=2, num_heads=2, mlp_dim=128, img_size=64, global_attn_indexes=(1,)
    )
    sam_params = jax.jit(SamEncoder(sam_config).init)(
        jax.random.PRNGKey(3), np.zeros((1, 64, 64, 3), np.float32)
    )
    teachers = [
        make_random_teacher("mu/4", 32, seed=1, fmt="clip", proj_dim=24),
        make_random_teacher("mu/8", 48, seed=2, fmt="siglip", class_token=False, pool="map"),
        Teacher(TeacherSpec(format="sam", family="sam", config=sam_config, input_resize="longest_pad"),
                sam_params["params"]),
    ]  # fmt: skip
    c = agglomerative_config(stages=(), mask_ratio=0.0, agglomerative__resample="student_to_teacher")
    c.teachers = ("clip=clip_l14", "siglip=siglip_so400m", "sam=sam_h")  # names; the Teachers are given
    c.agglomerative.per_teacher = {
        "sam": teacher_options(norm="phi_s"),
        "siglip": teacher_options(norm="standardize"),
    }
    mesh = parallel.make_mesh(2, 1, devices=jax.devices()[:2])
    setup = train.build(c, mesh, teachers=teachers)
    by_name = {t.name: t for t in setup.targets}
    assert (by_name["clip"].summary_dim, by_name["clip"].dense_dim, by_name["clip"].grid) == (24, 64, (8, 8))
    assert (by_name["siglip"].summary_dim, by_name["siglip"].grid) == (64, (6, 6))
    assert (by_name["sam"].summary_dim, by_name["sam"].dense_dim, by_name["sam"].grid) == (None, 256, (4, 4))
    assert setup.view_size == 64
    state, metrics = run(setup, setup.init_state(jax.random.PRNGKey(0)), batches(4, 64), mesh)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert {"loss_summary/clip", "loss_summary/siglip", "loss_dense/sam"} <= set(metrics[-1])
    assert "loss_summary/sam" not in metrics[-1] and "sam_summary" not in state.params["heads"]
