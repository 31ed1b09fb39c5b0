"""Teachers that follow the student's resolution stages (TeacherStack(follow=...), per-teacher
follow_stages): their position tables resized inside the step (models/resize.py) equal the tables
conversion writes at that size (formats' PyTorch / scipy resizers), and such a teacher equals the same
teacher converted at that size. Also the DMT path's EVA: its last block only at the visible patches.

Tolerance 1e-5 relative (the suite's): the interpolation weights are built in float64 here and in
float32 by torch, so tables differ by a few float32 ulps (max 4e-6 of the table's largest value
measured on these grids), well inside it; scipy's zoom computes in float64 (1e-7).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dmt_jax import formats
from dmt_jax.formats import sam as sam_format
from dmt_jax.models import EvaConfig, SamConfig, ViTConfig, build_model, resize
from dmt_jax.models.family import HALF, OPENAI_MEAN, OPENAI_STD
from dmt_jax.teachers import Teacher, TeacherSpec, TeacherStack, flatten_params, unflatten_params

TOLERANCE = 1e-5


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("method", ["bicubic_size", "bicubic_scale_offset_0.1", "bicubic_size_antialias",
                                    "linear_zoom"])  # fmt: skip
@pytest.mark.parametrize("old,new", [(16, 27), (27, 16), (4, 6), (14, 31), (37, 18)])
def test_table_resize_equals_the_converters(method, old, new):
    """formats' resize_pos_embed (torch F.interpolate / scipy zoom) vs the JAX matrices, prefix rows kept."""
    rng = np.random.default_rng(old * 100 + new)
    table = rng.standard_normal((1, 2 + old * old, 12)).astype(np.float32)
    reference = formats.resize_pos_embed(table, 2, new, method).numpy()
    ours = np.asarray(resize.resize_rows(jnp.asarray(table), 2, new, method))
    assert ours.shape == reference.shape == (1, 2 + new * new, 12)
    np.testing.assert_array_equal(ours[:, :2], table[:, :2])
    assert relative_error(ours, reference) <= TOLERANCE


@pytest.mark.parametrize("old,new", [(27, 39), (127, 63), (7, 11)])
def test_relative_position_tables_equal_segment_anythings_resize(old, new):
    table = torch.from_numpy(np.random.default_rng(old).standard_normal((old, 16)).astype(np.float32))
    reference = sam_format.resize_rel_pos(table, new).numpy()  # segment-anything's get_rel_pos
    ours = np.asarray(resize.resize_1d(jnp.asarray(table.numpy()), new, "linear"))
    assert relative_error(ours, reference) <= TOLERANCE


# ---------------------------------------------------------------- a teacher following a stage

VIT = dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=8, img_size=64)
CLIP = dict(pre_norm=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5, proj_dim=24)
SIGLIP = dict(class_token=False, act="gelu_tanh", pool="map")
SAM = SamConfig(embed_dim=64, depth=2, num_heads=2, mlp_dim=128, img_size=64, window_size=3,
                global_attn_indexes=(1,))  # fmt: skip
# format -> (family, config at its converted size, mean, std, input rule); each format's own resize
CASES = {
    "mae": ("vit", ViTConfig(**VIT), None, None, "bilinear"),
    "dino": ("vit", ViTConfig(**VIT), None, None, "bilinear"),
    "dinov2": (
        "vit",
        ViTConfig(**VIT, num_reg_tokens=4, no_embed_class=True, layerscale=True),
        None,
        None,
        "bilinear",
    ),  # fmt: skip
    "clip": ("vit", ViTConfig(**VIT, **CLIP), OPENAI_MEAN, OPENAI_STD, "bicubic"),
    "siglip": ("vit", ViTConfig(**VIT, **SIGLIP), HALF, HALF, "squash"),
    "eva02": (
        "eva",
        EvaConfig(width=64, depth=2, num_heads=2, mlp_dim=170, patch_size=14, img_size=56),
        OPENAI_MEAN,
        OPENAI_STD,
        "bicubic",
    ),  # fmt: skip
    "sam": ("sam", SAM, None, None, "longest_pad"),
}
METHOD = {"mae": "bicubic_size", "dino": "bicubic_scale_offset_0.1", "dinov2": "bicubic_size_antialias",
          "clip": "bicubic_size_antialias", "siglip": "linear_zoom", "eva02": "bicubic_size",
          "sam": "bicubic_size_antialias+rel_pos_linear"}  # fmt: skip


def random_teacher(fmt: str, seed: int = 0) -> Teacher:
    """Random values everywhere (norm scales and biases too); position tables large, so they matter."""
    family, config, mean, std, rule = CASES[fmt]
    images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: build_model(family, config).init(jax.random.PRNGKey(0), x), images)
    rng = np.random.default_rng(seed)
    flat = {}
    for name, leaf in flatten_params(shapes["params"]).items():
        scale = 0.5 if "pos" in name else 0.1
        base = 1.0 if name.endswith(("scale", "gamma")) else 0.0
        flat[name] = (base + scale * rng.standard_normal(leaf.shape)).astype(np.float32)
    inputs = {k: v for k, v in dict(mean=mean, std=std).items() if v is not None}
    spec = TeacherSpec(format=fmt, family=family, config=config, input_resize=rule, **inputs)
    return Teacher(spec, unflatten_params(flat))


def converted_at(teacher: Teacher, img_size: int) -> Teacher:
    """The teacher as dmt-convert --img-size writes it: its format's own resize (torch) of the tables."""
    spec, flat = teacher.spec, flatten_params(teacher.params)
    tables = {"pos_embed": "pos_embed"}  # reference name -> Flax path: the names the resize reads
    if spec.family == "sam":
        tables |= {f"blocks.{i}.attn.rel_pos_{a}": f"blocks_{i}/attn/rel_pos_{a}"
                   for i in spec.config.global_attn_indexes for a in "hw"}  # fmt: skip
    state = {ref: torch.from_numpy(np.asarray(flat[path])) for ref, path in tables.items()}
    state, config, method = formats.get(spec.format).resize(state, spec.config, img_size)
    assert method == METHOD[spec.format] == formats.resize_method(spec.format, spec.config)
    flat = {**flat, **{path: state[ref].numpy() for ref, path in tables.items()}}
    return Teacher(dataclasses.replace(spec, config=config, pos_embed_resize=method), unflatten_params(flat))


@pytest.mark.parametrize(
    "fmt,px",
    [
        ("mae", 96),
        ("dino", 96),
        ("dino", 40),
        ("dinov2", 96),
        ("clip", 96),
        ("siglip", 96),
        ("eva02", 96),
        ("eva02", 40),
        ("sam", 96),
        ("sam", 40),
    ],  # fmt: skip
)
def test_following_teacher_equals_the_teacher_converted_at_that_size(fmt, px):
    """A teacher following a student at px runs at px cut to its patch size, equal (features, summary)
    to the same teacher converted at that size; the teacher beside it keeps its own size, unchanged."""
    teacher = random_teacher(fmt)
    other = Teacher(teacher.spec, jax.tree.map(lambda a: a * 0.9, teacher.params))  # same group unless split
    stack = TeacherStack([teacher, other], dtype=jnp.float32, follow=[METHOD[fmt], None])
    size = px // teacher.spec.patch_size * teacher.spec.patch_size
    assert (
        stack.img_sizes(px) == [size, teacher.spec.img_size]
        and stack.img_sizes() == [teacher.spec.img_size] * 2
    )
    pixels = jax.random.randint(jax.random.PRNGKey(1), (2, 80, 80, 3), 0, 256).astype(jnp.uint8)
    followed, kept = jax.jit(stack.features, static_argnums=2)(stack.params, pixels, px)

    reference = converted_at(teacher, size)
    (at_size,) = TeacherStack([reference], dtype=jnp.float32).features(
        TeacherStack([reference], dtype=jnp.float32).params, pixels
    )
    assert followed.patches.shape == at_size.patches.shape == (2, (size // teacher.spec.patch_size) ** 2,
                                                                 teacher.spec.width)  # fmt: skip
    assert relative_error(followed.tokens(), at_size.tokens()) <= TOLERANCE
    if at_size.summary is not None:
        assert relative_error(followed.summary, at_size.summary) <= TOLERANCE
    (alone,) = TeacherStack([other], dtype=jnp.float32).features(
        TeacherStack([other], dtype=jnp.float32).params, pixels
    )
    assert relative_error(kept.tokens(), alone.tokens()) <= TOLERANCE


def test_bad_follow_methods_are_refused():
    teacher = random_teacher("sam")
    with pytest.raises(ValueError, match="also names its relative-position interpolation"):
        TeacherStack([teacher], follow=["bicubic_size_antialias"])
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic\+rel_pos_linear'"):
        TeacherStack([teacher], follow=["cubic+rel_pos_linear"])


# ---------------------------------------------------------------- the DMT path's EVA


def test_dmt_path_runs_evas_last_block_only_at_the_visible_patches():
    """stack.apply(keep) equals the full forward's CLS and visible patches, and costs less: the last
    block's queries, projection, SwiGLU and final norm run at 1 + n of 1 + N tokens."""
    teacher = random_teacher("eva02")
    c = teacher.spec.config
    stack = TeacherStack([teacher], dtype=jnp.float32)
    pixels = jax.random.randint(jax.random.PRNGKey(0), (2, 56, 56, 3), 0, 256).astype(jnp.uint8)
    keep = jnp.asarray([[0, 3, 5, 9], [1, 2, 15, 7]], jnp.int32)
    (tokens,) = jax.jit(stack.apply)(stack.params, pixels, keep)
    full = teacher.forward(teacher.normalize(pixels))
    visible = jnp.take_along_axis(full.patches, keep[:, :, None], axis=1)
    assert relative_error(tokens, jnp.concatenate([full.prefix[:, :1], visible], axis=1)) <= TOLERANCE

    def cost(k):
        compiled = jax.jit(stack.apply).lower(stack.params, pixels, k).compile()
        analysis = compiled.cost_analysis()
        return float((analysis[0] if isinstance(analysis, list | tuple) else analysis)["flops"])

    saved = cost(None) - cost(keep)
    n, tokens_all = keep.shape[1], c.num_tokens
    # One block's linear layers (q, proj: 2 w^2; SwiGLU: 3 w m) and half its attention, per image.
    expected = (
        2 * (tokens_all - 1 - n) * (2 * c.width**2 + 3 * c.width * c.mlp_dim + tokens_all * 2 * c.width)
    )
    assert 0.9 * 2 * expected <= saved <= 1.2 * 2 * expected, (saved, 2 * expected)
