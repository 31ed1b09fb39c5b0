"""EVA-02 (models/eva.py) against timm's Eva: full-size B/14, L/14 at reduced depth, EVA-CLIP towers."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.models.eva import Eva as TimmEva

from dmt_jax.models.eva import Eva, EvaConfig, rope_tables
from dmt_jax.teachers import unflatten_params

try:
    from tests import checkpoint_layouts as layouts
except ImportError:  # tests/ is not a package
    import checkpoint_layouts as layouts

TOLERANCE = 1e-5
TINY = EvaConfig(width=64, depth=2, num_heads=2, mlp_dim=170, patch_size=14, img_size=56, rope_ref_grid=16)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def random_timm_eva(config: EvaConfig, seed: int = 0) -> TimmEva:
    """timm's Eva shaped by `config` (global_pool='token': the final norm on every token, as the MIM
    and EVA-CLIP files have it), random values everywhere."""
    model = TimmEva(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.num_heads,
        qkv_fused=False,
        qkv_bias=config.qv_bias,
        mlp_ratio=(config.mlp_dim + 0.5) / config.width,  # timm takes int(width * ratio)
        swiglu_mlp=True,
        swiglu_align_to=1,  # separate fc1_g / fc1_x also without the hidden norm (EVA's w1 / w2)
        scale_mlp=config.mlp_norm,
        scale_attn_inner=config.attn_norm,
        use_rot_pos_emb=True,
        ref_feat_shape=(config.rope_ref_grid, config.rope_ref_grid),
        num_reg_tokens=config.num_reg_tokens,
        global_pool="token",
        num_classes=config.proj_dim,
    )
    assert model.blocks[0].mlp.fc1_g.out_features == config.mlp_dim
    layouts.randomize_(model, seed)
    return model.eval()


def flax_params(timm_model: TimmEva) -> dict:
    """timm Eva state dict -> the Flax Eva's params (Linear transposed, conv OIHW -> HWIO)."""
    flat = {}
    for name, tensor in timm_model.state_dict().items():
        a = tensor.detach().numpy()
        path = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1/", name).replace(".", "/")
        if path.endswith("/weight"):  # Linear / conv kernels, LayerNorm scales
            path = path[: -len("weight")] + ("kernel" if a.ndim >= 2 else "scale")
        flat[path] = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a
    return unflatten_params(flat)


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
    timm_model = random_timm_eva(config, seed)
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


def test_rope_tables_equal_timm():
    config = dataclasses.replace(TINY, img_size=448)
    timm_model = random_timm_eva(config)
    sin, cos = np.split(timm_model.rope.get_embed().numpy(), 2, axis=-1)
    ours_sin, ours_cos = rope_tables(config)
    p = config.num_prefix_tokens
    np.testing.assert_allclose(ours_sin[p:], sin, atol=1e-6)
    np.testing.assert_allclose(ours_cos[p:], cos, atol=1e-6)
    assert (ours_sin[:p] == 0).all() and (ours_cos[:p] == 1).all()


def test_output_patches_equal_the_full_forward():
    """The teacher's last-block-only-at-visible-patches path: the same values as gathering after."""
    config = dataclasses.replace(TINY, num_reg_tokens=1)
    timm_model = random_timm_eva(config, seed=5)
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
    params = {"params": flax_params(random_timm_eva(config, seed=2))}
    images = nhwc(random_images(config))
    full = jax.jit(Eva(config).apply)(params, images).tokens()
    half = jax.jit(Eva(config, dtype=jnp.bfloat16).apply)(params, images.astype(jnp.bfloat16)).tokens()
    assert half.dtype == jnp.bfloat16
    assert relative_error(half, full) < 3e-2


def test_wrong_image_size_is_one_line():
    with pytest.raises(ValueError, match="--img-size"):
        Eva(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 70, 70, 3)))


def test_config_round_trip_and_errors():
    config = EvaConfig.preset("CLIP-L/14-336")
    assert EvaConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(EvaConfig.from_dict(config.to_dict()))
    assert (config.grid, config.head_dim, config.num_tokens) == (24, 64, 1 + 24 * 24)
    d = config.to_dict()
    with pytest.raises(ValueError, match=r"unknown \['extra'\], missing \['width'\]"):
        EvaConfig.from_dict({**{k: v for k, v in d.items() if k != "width"}, "extra": 1})
    with pytest.raises(ValueError, match="head width divisible by 4"):
        EvaConfig(width=60, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="not a multiple"):
        EvaConfig(width=64, depth=1, num_heads=2, mlp_dim=8, img_size=100)
    with pytest.raises(ValueError, match="unknown EVA-02 preset"):
        EvaConfig.preset("G/14")
