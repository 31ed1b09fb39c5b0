"""Student export: Flax ViT params -> timm state dict (safetensors) -> strict timm load, same features."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dmt_jax import formats
from dmt_jax.export import export_timm, timm_state_dict
from dmt_jax.models.vit import ViT

try:
    from tests import checkpoint_layouts as layouts
except ImportError:  # tests/ is not a package
    import checkpoint_layouts as layouts

STUDENTS = {
    "mu_sincos": dict(variant="mu/16", img_size=64, pos_embed="sincos"),
    "mu_registers_layerscale": dict(variant="mu/16", img_size=64, num_reg_tokens=4, layerscale_init=0.1),
    "mu14_no_embed_class": dict(variant="mu/14", img_size=56, num_reg_tokens=1, no_embed_class=True),
}


def random_student(variant, img_size, seed=0, **kwargs):
    """A student ViT whose every parameter is random (LayerNorm scales and biases too)."""
    model = ViT.from_variant(variant, img_size=img_size, **kwargs)

    @jax.jit
    def init(rng):
        params = model.init(rng, jnp.zeros((1, img_size, img_size, 3)))["params"]
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(treedef, leaves)

    return model, init(jax.random.PRNGKey(seed))


@pytest.mark.parametrize("name", list(STUDENTS))
def test_exported_student_loads_strictly_into_timm_with_equal_features(name, tmp_path):
    config = dict(STUDENTS[name])
    model, params = random_student(config.pop("variant"), **config)
    kwargs = export_timm(params, tmp_path / "student.safetensors")
    with safe_open(str(tmp_path / "student.safetensors"), "np") as f:
        assert json.loads(f.metadata()["timm_kwargs"]) == kwargs

    timm_model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    timm_model.load_state_dict(load_file(tmp_path / "student.safetensors"), strict=True)
    size = config["img_size"]
    images = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = timm_model.forward_features(images).numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(
            jax.jit(model.apply)({"params": params}, jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
        )
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) <= 1e-5


def test_conversion_in_and_export_out_are_exact_inverses():
    timm_model = layouts.random_timm_vit(layouts.TINY_14_REG)
    state = {k: v.numpy() for k, v in timm_model.state_dict().items()}
    back = timm_state_dict(formats.timm_to_flax(state))
    assert back.keys() == state.keys()
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.fixture(scope="module")
def small_student_params():
    return random_student("mu/16", 32)[1]


def test_export_refuses_params_that_are_not_a_plain_vit(tmp_path, small_student_params):
    params = dict(small_student_params)
    with pytest.raises(formats.FormatError, match="no timm name for: head_0/kernel"):
        export_timm({**params, "head_0": {"kernel": np.zeros((64, 8))}}, tmp_path / "s.safetensors")
    del params["norm"]
    with pytest.raises(formats.FormatError, match="missing tensors: norm.weight, norm.bias"):
        export_timm(params, tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_export_does_not_replace_a_file_unless_asked(tmp_path, small_student_params):
    params = small_student_params
    export_timm(params, tmp_path / "s.safetensors")
    with pytest.raises(FileExistsError):
        export_timm(params, tmp_path / "s.safetensors")
    export_timm(params, tmp_path / "s.safetensors", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
