"""EVA-02 (models/eva.py) against timm's Eva: full-size B/14, L/14 at reduced depth, EVA-CLIP towers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.models.eva import Eva as TimmEva

from dmt_jax import convert
from dmt_jax.formats import names_eva
from dmt_jax.models.eva import Eva, EvaConfig, rope_tables
from dmt_jax.models.family import OPENAI_MEAN, OPENAI_STD
from dmt_jax.teachers import Teacher, TeacherStack, flatten_params, load_teacher, unflatten_params

try:
    from tests import checkpoint_layouts as layouts
except ImportError:  # tests/ is not a package
    import checkpoint_layouts as layouts

TOLERANCE = 1e-5
TINY = EvaConfig(width=64, depth=2, num_heads=2, mlp_dim=170, patch_size=14, img_size=56, rope_ref_grid=16)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def flax_params(timm_model: TimmEva) -> dict:
    """timm Eva state dict -> the Flax Eva's params, through the name table conversion uses."""
    return unflatten_params(
        names_eva.TABLE.to_flax({k: v.numpy() for k, v in timm_model.state_dict().items()})
    )


def random_images(config: EvaConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, config.img_size, config.img_size), generator=gen)


def nhwc(images: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def timm_reference(model: TimmEva, images: torch.Tensor):
    """(final-norm tokens, summary): forward_features, and the head on the CLS token where present."""
    with torch.no_grad():
        tokens = model.forward_features(images)
        summary = model.forward_head(tokens) if model.num_classes else tokens[:, 0]
    return tokens.numpy(), summary.numpy()


def check_against_timm(config: EvaConfig, seed: int = 0, batch: int = 2):
    timm_model = layouts.random_timm_eva(config, seed)
    images = random_images(config, batch, seed)
    tokens, summary = timm_reference(timm_model, images)
    out = jax.jit(Eva(config).apply)({"params": flax_params(timm_model)}, nhwc(images))
    assert out.prefix.shape == (batch, config.num_prefix_tokens, config.width)
    assert out.patches.shape == (batch, config.grid**2, config.width)
    assert out.tokens().shape == tokens.shape
    assert relative_error(out.tokens(), tokens) <= TOLERANCE, relative_error(out.tokens(), tokens)
    assert relative_error(out.summary, summary) <= TOLERANCE, relative_error(out.summary, summary)


def test_b14_full_size_equals_timm():
    """EVA-02 B/14 as the MIM file holds it, every block, 224 px."""
    check_against_timm(EvaConfig.preset("B/14"))


def test_l14_reduced_depth_equals_timm():
    check_against_timm(EvaConfig.preset("L/14", depth=2), seed=1, batch=1)


@pytest.mark.parametrize(
    "name, config",
    [
        # EVA-CLIP: inner_attn_ln, the projection head, patch 16 (a 4x4 grid on the 16-grid frequencies)
        ("clip_tower", dataclasses.replace(TINY, patch_size=16, img_size=64, attn_norm=True, proj_dim=32)),
        ("fine_tuned_448", dataclasses.replace(TINY, img_size=448)),  # 32x32 grid, 16-grid frequencies
        ("native_grid", dataclasses.replace(TINY, img_size=224)),  # grid == rope_ref_grid
        ("registers", dataclasses.replace(TINY, num_reg_tokens=4)),
        ("no_sub_ln_no_bias", dataclasses.replace(TINY, mlp_norm=False, qv_bias=False)),
    ],
)
def test_options_equal_timm(name, config):
    check_against_timm(config, seed=3)


def test_name_table_reads_both_ways():
    """Flax params -> timm names loads strictly into timm's Eva (every tensor, no other)."""
    config = dataclasses.replace(TINY, attn_norm=True, proj_dim=16, num_reg_tokens=2)
    source, target = layouts.random_timm_eva(config, seed=1), layouts.random_timm_eva(config, seed=2)
    back = names_eva.flax_to_timm(flatten_params(flax_params(source)))
    target.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in back.items()}, strict=True
    )
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert set(names_eva.expected_timm_shapes(config)) == set(source.state_dict())


def test_rope_tables_equal_timm():
    config = dataclasses.replace(TINY, img_size=448)
    timm_model = layouts.random_timm_eva(config)
    sin, cos = np.split(timm_model.rope.get_embed().numpy(), 2, axis=-1)
    ours_sin, ours_cos = rope_tables(config)
    p = config.num_prefix_tokens
    np.testing.assert_allclose(ours_sin[p:], sin, atol=1e-6)
    np.testing.assert_allclose(ours_cos[p:], cos, atol=1e-6)
    assert (ours_sin[:p] == 0).all() and (ours_cos[:p] == 1).all()


def test_output_patches_equal_the_full_forward():
    """The teacher's last-block-only-at-visible-patches path: the same values as gathering after."""
    config = dataclasses.replace(TINY, num_reg_tokens=1)
    timm_model = layouts.random_timm_eva(config, seed=5)
    params = {"params": flax_params(timm_model)}
    images = nhwc(random_images(config))
    keep = jnp.asarray([[0, 5, 7, 15], [3, 2, 9, 11]], jnp.int32)
    full = jax.jit(Eva(config).apply)(params, images)
    part = jax.jit(Eva(config).apply)(params, images, output_patches=keep)
    assert part.patches.shape == (2, 4, config.width)
    visible = jnp.take_along_axis(full.patches, keep[:, :, None], axis=1)
    np.testing.assert_allclose(part.patches, visible, atol=1e-5)
    np.testing.assert_allclose(part.prefix, full.prefix, atol=1e-5)
    np.testing.assert_allclose(part.summary, full.summary, atol=1e-5)


def test_bfloat16_close_to_float32():
    config = TINY
    params = {"params": flax_params(layouts.random_timm_eva(config, seed=2))}
    images = nhwc(random_images(config))
    full = jax.jit(Eva(config).apply)(params, images).tokens()
    half = jax.jit(Eva(config, dtype=jnp.bfloat16).apply)(params, images.astype(jnp.bfloat16)).tokens()
    assert half.dtype == jnp.bfloat16
    assert relative_error(half, full) < 3e-2


def test_wrong_image_size_is_one_line():
    with pytest.raises(ValueError, match="--img-size"):
        jax.eval_shape(Eva(TINY).init, jax.random.PRNGKey(0), jnp.zeros((1, 70, 70, 3)))


def test_config_round_trip_and_errors():
    config = EvaConfig.preset("CLIP-L/14-336")
    assert EvaConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(EvaConfig.from_dict(config.to_dict()))
    assert (config.grid, config.head_dim, config.num_tokens) == (24, 64, 1 + 24 * 24)
    d = config.to_dict()
    with pytest.raises(ValueError, match=r"lacks the fields \['width'\] and has unknown fields \['extra'\]"):
        EvaConfig.from_dict({**{k: v for k, v in d.items() if k != "width"}, "extra": 1})
    with pytest.raises(ValueError, match="head width divisible by 4"):
        EvaConfig(width=60, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="not a multiple"):
        EvaConfig(width=64, depth=1, num_heads=2, mlp_dim=8, img_size=100)
    with pytest.raises(ValueError, match="unknown EVA-02 preset"):
        EvaConfig.preset("G/14")


# ---------------------------------------------------------------- conversion of the official layouts

SMALL = EvaConfig(width=128, depth=2, num_heads=2, mlp_dim=340, patch_size=14, img_size=56)
SMALL_CLIP = dataclasses.replace(SMALL, patch_size=16, img_size=64, attn_norm=True, proj_dim=48)
SMALL_FUSED = dataclasses.replace(SMALL, mlp_norm=False)  # EVA-02 Ti/S: fused qkv and w12, no ffn_ln


def convert_and_load(ckpt, tmp_path, *args):
    src, out = tmp_path / "eva.pt", tmp_path / "teacher"
    torch.save(ckpt, src)
    assert convert.main([str(src), str(out), *map(str, args)]) == 0
    return load_teacher(out)


def assert_teacher_equals(teacher, images: torch.Tensor, tokens, summary):
    x = nhwc(images)
    assert relative_error(teacher.features(x), tokens) <= TOLERANCE
    assert relative_error(teacher.summary(x), summary) <= TOLERANCE


LAYOUTS = {  # case -> (config, model builder, official layout); the reference is timm's Eva
    "mim_module": (SMALL, layouts.random_timm_eva, lambda m, c: layouts.mim_layout(m, c, "module")),
    "mim_model": (SMALL, layouts.random_timm_eva, lambda m, c: layouts.mim_layout(m, c, "model")),
    "mim_plain": (SMALL, layouts.random_timm_eva, lambda m, c: layouts.mim_layout(m, c, None)),
    "mim_fused_tiny_small": (SMALL_FUSED, layouts.fused_timm_eva, layouts.mim_layout),
    "eva_clip": (SMALL_CLIP, layouts.random_timm_eva, layouts.eva_clip_layout),
    "eva_clip_ddp": (SMALL_CLIP, layouts.random_timm_eva, lambda m, c: layouts.eva_clip_layout(m, c, True)),
    "openclip_tower": (EvaConfig.preset("CLIP-B/16", depth=2), None, None),  # reference: open_clip
}


def conversion_errors(case: str, tmp_path) -> dict:
    """The case's model with random weights, saved in its official layout, through dmt-convert and
    load_teacher: relative errors of features and summary against the reference library."""
    config, build, layout = LAYOUTS[case]
    if case == "openclip_tower":  # open_clip's own module: tokens from its trunk, summary = encode_image
        visual, ckpt = layouts.openclip_visual(config, seed=8)
        images = random_images(config, batch=1)
        with torch.no_grad():
            tokens, summary = visual.trunk.forward_features(images).numpy(), visual(images).numpy()
    else:
        model = build(config, 7)
        images, ckpt = random_images(config), layout(model, config)
        tokens, summary = timm_reference(model, images)
    teacher = convert_and_load(ckpt, tmp_path)
    x = nhwc(images)
    return dict(
        case=case,
        format=teacher.spec.format,
        family=teacher.spec.family,
        variant=teacher.spec.variant,
        config_as_built=teacher.spec.config == config,
        openai_mean_std=(teacher.spec.mean, teacher.spec.std) == (OPENAI_MEAN, OPENAI_STD),
        features_error=relative_error(teacher.features(x), tokens),
        summary_error=relative_error(teacher.summary(x), summary),
    )


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_official_layouts_convert_exactly(case, tmp_path):
    result = conversion_errors(case, tmp_path)
    assert (result["format"], result["family"]) == ("eva02", "eva")  # --format auto found it
    assert result["config_as_built"] and result["openai_mean_std"]
    assert result["features_error"] <= TOLERANCE and result["summary_error"] <= TOLERANCE


def eva_interpolate(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """EVA-02's run_class_finetuning / EVA-CLIP's resize_evaclip_pos_embed, verbatim in effect."""
    extra, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(grid.shape[1] ** 0.5)
    grid = grid.reshape(-1, old, old, grid.shape[-1]).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False
    )
    return torch.cat([extra, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("new_size", [112, 28])  # the 448-from-224 case at test size, and a smaller one
def test_img_size_resizes_pos_embed_as_eva_and_recomputes_rope(new_size, tmp_path):
    model = layouts.random_timm_eva(SMALL, seed=9)
    teacher = convert_and_load(layouts.mim_layout(model, SMALL), tmp_path, "--img-size", new_size)
    resized = dataclasses.replace(SMALL, img_size=new_size)
    assert teacher.spec.config == resized and teacher.spec.pos_embed_resize == "bicubic_size"
    # timm at the new size (RoPE on the new grid, 16-grid frequencies) with EVA's resized table
    reference = layouts.random_timm_eva(resized, seed=9)
    state = model.state_dict() | {"pos_embed": eva_interpolate(model.pos_embed.detach(), new_size // 14)}
    reference.load_state_dict(state)
    images = random_images(resized)
    assert_teacher_equals(teacher, images, *timm_reference(reference, images))


def expect_refusal(capsys, tmp_path, ckpt, *fragments):
    torch.save(ckpt, tmp_path / "bad.pt")
    assert convert.main([str(tmp_path / "bad.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dmt-convert: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_mim():
    return layouts.mim_layout(layouts.random_timm_eva(SMALL, seed=10), SMALL, None)


def test_refuses_a_missing_block(capsys, tmp_path, small_mim):
    ckpt = {k: v for k, v in small_mim.items() if not k.startswith("blocks.0.")}
    expect_refusal(capsys, tmp_path, ckpt, "not numbered 0..0", "blocks 0 missing")


def test_refuses_an_extra_block(capsys, tmp_path, small_mim):
    extra = {
        k.replace("blocks.1.", "blocks.3."): v for k, v in small_mim.items() if k.startswith("blocks.1.")
    }
    expect_refusal(capsys, tmp_path, small_mim | extra, "not numbered", "missing")


def test_refuses_a_missing_w3(capsys, tmp_path, small_mim):
    ckpt = {k: v for k, v in small_mim.items() if k != "blocks.1.mlp.w3.weight"}
    expect_refusal(capsys, tmp_path, ckpt, "missing tensors: blocks.1.mlp.fc2.weight", "w3")


def test_refuses_nan_weights(capsys, tmp_path, small_mim):
    ckpt = dict(small_mim)
    ckpt["blocks.1.mlp.w1.weight"] = ckpt["blocks.1.mlp.w1.weight"].clone()
    ckpt["blocks.1.mlp.w1.weight"][0, 0] = float("nan")
    expect_refusal(capsys, tmp_path, ckpt, "NaN", "fc1_g")


def test_refuses_a_fine_tuned_classifier(capsys, tmp_path, small_mim):
    ckpt = {k: v for k, v in small_mim.items() if not k.startswith("norm.")}
    ckpt |= layouts.junk(("fc_norm.weight", (128,)), ("fc_norm.bias", (128,)), ("head.weight", (10, 128)))
    expect_refusal(capsys, tmp_path, ckpt, "fine-tuned classifier", "MIM")


def test_num_heads_option(tmp_path):
    """--num-heads for a tower whose heads are not 64 wide (the tensors cannot tell)."""
    config = dataclasses.replace(SMALL, num_heads=4)
    model = layouts.random_timm_eva(config, seed=11)
    teacher = convert_and_load(layouts.mim_layout(model, config), tmp_path, "--num-heads", 4)
    assert teacher.spec.config == config
    images = random_images(config)
    assert_teacher_equals(teacher, images, *timm_reference(model, images))


def test_teacher_stack_vmaps_eva_teachers_exactly(tmp_path):
    """Two EVA-CLIP teachers of one shape: one vmapped group, each equal to itself alone."""
    model = layouts.random_timm_eva(SMALL_CLIP, seed=12)
    first = convert_and_load(layouts.eva_clip_layout(model, SMALL_CLIP), tmp_path)
    second = Teacher(first.spec, jax.tree.map(lambda a: np.asarray(a) * 0.9, first.params))
    stack = TeacherStack([first, second], dtype=jnp.float32)
    pixels = jax.random.randint(jax.random.PRNGKey(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    keep = jnp.asarray([[0, 3, 5], [1, 2, 15]], jnp.int32)
    features = jax.jit(stack.features)(stack.params, pixels)
    tokens = jax.jit(stack.apply)(stack.params, pixels, keep)  # the DMT path: CLS, visible patches
    for teacher, out, dmt in zip((first, second), features, tokens, strict=True):
        alone = teacher.forward(teacher.normalize(pixels))
        for ours, reference in zip(jax.tree.leaves(out), jax.tree.leaves(alone), strict=True):
            assert relative_error(ours, reference) <= TOLERANCE
        visible = jnp.take_along_axis(alone.patches, keep[:, :, None], axis=1)
        assert relative_error(dmt, jnp.concatenate([alone.prefix[:, :1], visible], axis=1)) <= TOLERANCE


if __name__ == "__main__":
    import contextlib
    import json
    import sys
    import tempfile
    from pathlib import Path

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name in sys.argv[1:] or LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            result = conversion_errors(name, Path(tmp))
        print(json.dumps(result), flush=True)
