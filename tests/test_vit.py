"""The Flax ViT against timm: full forward, masked forward, LayerNorm numerics, bf16."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dmt_jax import formats
from dmt_jax.models import vit
from dmt_jax.teachers import num_heads_for_width, unflatten_params, variant_name

try:
    from tests import checkpoint_layouts as layouts
except ImportError:  # tests/ is not a package
    import checkpoint_layouts as layouts

TOLERANCE = 1e-5
CONFIGS = {
    "plain": layouts.TINY,
    "registers": dataclasses.replace(layouts.TINY, reg_tokens=2),
    "registers_no_embed_class_layerscale": layouts.TINY_14_REG,
    "patch14_layerscale": layouts.TINY_14,
}


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def flax_twin(timm_model, config: layouts.VitConfig, dtype=jnp.float32):
    """The Flax ViT and its params holding the timm model's weights (through the name table)."""
    state = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    params = unflatten_params(formats.timm_to_flax(state))
    model = vit.ViT(
        width=config.width,
        depth=config.depth,
        num_heads=num_heads_for_width(config.width),
        mlp_dim=4 * config.width,
        patch_size=config.patch,
        img_size=config.img_size,
        num_reg_tokens=config.reg_tokens,
        no_embed_class=config.no_embed_class,
        layerscale_init=1.0 if config.layerscale else None,
        dtype=dtype,
    )
    return model, params


def random_images(config, batch=2, seed=0) -> torch.Tensor:
    return torch.randn(
        (batch, 3, config.img_size, config.img_size), generator=torch.Generator().manual_seed(seed)
    )


def nhwc(images: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_timm_forward_features(name):
    config = CONFIGS[name]
    timm_model = layouts.random_timm_vit(config, seed=4)
    model, params = flax_twin(timm_model, config)
    images = random_images(config)
    with torch.no_grad():
        reference = timm_model.forward_features(images).numpy()
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(model.apply)({"params": params}, nhwc(images))
    assert (
        ours.shape
        == reference.shape
        == (2, 1 + config.reg_tokens + (config.img_size // config.patch) ** 2, 64)
    )
    assert relative_error(ours, reference) <= TOLERANCE


@pytest.mark.parametrize("name", ["plain", "registers_no_embed_class_layerscale"])
def test_masked_forward_equals_the_same_layers_on_the_kept_tokens(name):
    config = dataclasses.replace(CONFIGS[name], img_size=4 * CONFIGS[name].patch)  # 16 patches
    timm_model = layouts.random_timm_vit(config, seed=5)
    model, params = flax_twin(timm_model, config)
    images = random_images(config)
    rng = np.random.default_rng(0)
    keep = np.stack([np.sort(rng.permutation(16)[:5]) for _ in range(2)])  # another subset per image

    with torch.no_grad():  # timm's own layers: embed + pos-embed, keep the chosen patches, blocks, norm
        x = timm_model._pos_embed(timm_model.patch_embed(images))
        prefix, patches = x[:, : timm_model.num_prefix_tokens], x[:, timm_model.num_prefix_tokens :]
        kept = torch.stack([patches[b, torch.from_numpy(keep[b])] for b in range(2)])
        reference = timm_model.norm(timm_model.blocks(torch.cat([prefix, kept], dim=1))).numpy()
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(model.apply)({"params": params}, nhwc(images), jnp.asarray(keep))
    assert ours.shape == reference.shape == (2, timm_model.num_prefix_tokens + 5, 64)
    assert relative_error(ours, reference) <= TOLERANCE


def test_layernorm_is_exact_on_tokens_with_a_large_mean():
    """Flax's default one-pass variance E[x^2] - E[x]^2 is off by 3e-4 here; two-pass (as torch) by 4e-6."""
    x = 100.0 + np.random.default_rng(0).standard_normal((4, 768)).astype(np.float32)
    exact = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (768,), eps=vit.LN_EPS).numpy()
    norm = vit.LayerNorm()
    assert relative_error(norm.apply(norm.init(jax.random.PRNGKey(0), x), x), exact) <= TOLERANCE


def test_bfloat16_forward_is_close_to_float32():
    config = layouts.TINY
    timm_model = layouts.random_timm_vit(config, seed=6)
    images = nhwc(random_images(config))
    model32, params = flax_twin(timm_model, config)
    model16, _ = flax_twin(timm_model, config, dtype=jnp.bfloat16)
    out32 = jax.jit(model32.apply)({"params": params}, images)
    out16 = jax.jit(model16.apply)({"params": params}, images.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    assert relative_error(out16.astype(jnp.float32), out32) < 0.03


def test_variant_names_and_heads():
    assert variant_name(768, 12, 3072, 16) == "B/16" and variant_name(768, 2, 3072, 14) == "w768-d2-m3072/14"
    assert [num_heads_for_width(w) for w in (192, 384, 768, 1024, 1280, 1536)] == [3, 6, 12, 16, 16, 24]


def test_a_config_builds_the_same_vit_as_the_students_constructor():
    """ViTConfig.module (the teacher path) and ViT(...) (the student path) are one module: same parameter
    paths and tokens; output 'features' splits those tokens and adds the summary."""
    config = vit.ViTConfig(64, 2, 2, 256, 8, 32, num_reg_tokens=2, layerscale=True)
    student = vit.ViT(64, 2, 2, 256, 8, 32, num_reg_tokens=2, layerscale_init=1.0)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params = student.init(jax.random.PRNGKey(1), images)["params"]
    assert student.config == config
    tokens = student.apply({"params": params}, images)
    features = config.module().apply({"params": params}, images)
    np.testing.assert_array_equal(features.tokens(), tokens)
    assert features.prefix.shape == (2, 3, 64) and features.patches.shape == (2, 16, 64)
    np.testing.assert_array_equal(features.summary, tokens[:, 0])


def test_config_fields_are_checked_in_one_line():
    with pytest.raises(ValueError, match="act must be one of gelu, gelu_tanh, quick_gelu, got 'relu'"):
        vit.ViTConfig(64, 2, 2, 256, act="relu")
    message = "depth must be a positive integer, got 0; num_heads must be a positive integer, got -1"
    with pytest.raises(ValueError, match=message) as info:
        vit.ViTConfig(64, 0, -1, 256)
    assert "\n" not in str(info.value)
    with pytest.raises(
        ValueError, match=r"ViTConfig lacks the fields \['mlp_dim'\] and has unknown fields \['x'\]"
    ):
        vit.ViTConfig.from_dict(dict(width=64, depth=2, num_heads=2, x=1))
    config = vit.ViTConfig(64, 2, 2, 256, class_token=False, pool="map", proj_dim=8)
    assert vit.ViTConfig.from_dict(config.to_dict()) == config and hash(config) == hash(
        vit.ViTConfig.from_dict(config.to_dict())
    )
