"""PCA feature maps, linear CKA, and what a user touches first: Teacher.features input checks,
file permissions of teachers and exports, the exported student's timm pretrained_cfg."""

from __future__ import annotations

import io
import json
import os
import stat
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from dmt_jax import evaluate, export, pictures
from dmt_jax.errors import UserError
from dmt_jax.models.vit import ViT
from dmt_jax.teachers import make_random_teacher, save_teacher


def halves_tokens(n=3, grid=4, width=8, seed=0):
    """Patch tokens whose left and right halves of every image point in two different directions."""
    rng = np.random.default_rng(seed)
    left, right = rng.normal(size=width) * 5, rng.normal(size=width) * 5
    tokens = rng.normal(size=(n, grid, grid, width)) * 0.1
    tokens[:, :, : grid // 2] += left
    tokens[:, :, grid // 2 :] += right
    return tokens.reshape(n, grid * grid, width)


def test_pca_rgb_colours_alike_tokens_alike_and_stays_in_range():
    rgb = pictures.pca_rgb(halves_tokens())
    assert rgb.shape == (3, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0]
    # The first component separates the halves: every left pixel on one side of every right pixel.
    assert first[:, :, :2].max() < first[:, :, 2:].min() or first[:, :, :2].min() > first[:, :, 2:].max()
    # A fixed sign: the same tokens give the same picture after a sign flip of the features.
    np.testing.assert_allclose(pictures.pca_rgb(-halves_tokens()), rgb, atol=1e-6)


def test_pca_grid_has_a_row_per_image_and_a_column_per_model_and_decodes_as_png(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    titles = pictures.column_titles(2)
    grid = pictures.pca_grid(pixels, [halves_tokens(seed=s) for s in range(3)], titles)
    cell, gap, top = pictures.CELL, pictures.GAP, pictures.TITLE_HEIGHT
    assert titles == ["input", "teacher 0", "teacher 1", "student"]
    assert grid.shape == (top + 3 * cell + 2 * gap, 4 * cell + 3 * gap, 3) and grid.dtype == np.uint8
    pictures.save_png(grid, tmp_path / "pictures" / "step_5.png")
    decoded = np.asarray(Image.open(tmp_path / "pictures" / "step_5.png"))
    np.testing.assert_array_equal(decoded, grid)
    # The input column shows the image itself (nearest-neighbour upscaling).
    np.testing.assert_array_equal(grid[top, 0], pixels[0, 0, 0])


def test_pick_images_takes_one_image_per_class_first():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(pictures.pick_images(labels, 3), [0, 3, 5])
    np.testing.assert_array_equal(pictures.pick_images(labels, 5), [0, 1, 2, 3, 5])
    assert len(pictures.pick_images(labels, 0)) == 0


def test_linear_cka_is_one_for_rotated_scaled_copies_and_low_for_unrelated_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert float(evaluate.linear_cka(x, 3.0 * x @ rotation + 1.0)) == pytest.approx(1.0, abs=1e-5)
    assert float(evaluate.linear_cka(x, rng.normal(size=(500, 24)))) < 0.1
    # Rows with weight 0 (padding) are left out entirely.
    y = x @ rotation
    y_padded = np.concatenate([y, rng.normal(size=(100, 16)) * 100])
    x_padded = np.concatenate([x, rng.normal(size=(100, 16))])
    weights = np.r_[np.ones(500), np.zeros(100)]
    assert float(evaluate.linear_cka(x_padded, y_padded, weights)) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- Teacher.features input


@pytest.fixture(scope="module")
def teacher():
    return make_random_teacher("mu/16", 32, 0)


def test_features_refuses_nchw_integer_and_0_255_input(teacher):
    normalized = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    assert teacher.features(normalized).shape == (2, 1 + 4, 64)
    with pytest.raises(UserError, match="NCHW"):
        teacher.features(normalized.transpose(0, 3, 1, 2))
    with pytest.raises(UserError, match="got shape"):
        teacher.features(normalized[:, :16, :16])
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(UserError, match="normalize"):
        teacher.features(pixels)
    with pytest.raises(UserError, match="0..255"):
        teacher.features(pixels.astype(np.float32))
    # normalize() is what features() wants: the teacher's own mean/std on 0..255 pixels.
    expected = (pixels / 255.0 - np.array(teacher.spec.mean)) / np.array(teacher.spec.std)
    np.testing.assert_allclose(teacher.normalize(pixels), expected, rtol=1e-5, atol=1e-5)


def test_features_warns_on_unnormalized_0_1_input_but_not_inside_jit(teacher):
    unit = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match="mean/std"):
        teacher.features(unit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(teacher.features)(unit)  # traced values are unknown: no check, no error


# ---------------------------------------------------------------- files others can read


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_teachers_and_exports_get_the_umask_permissions_of_plain_files(tmp_path, teacher, umask_022):
    out = save_teacher(tmp_path / "teacher", teacher.spec, teacher.params)
    assert _mode(out) == 0o755
    assert {p.name: _mode(p) for p in out.iterdir()} == {"spec.json": 0o644, "params.safetensors": 0o644}
    path = tmp_path / "student.safetensors"
    export.export_timm(teacher.params, path)
    assert _mode(path) == 0o644


def test_export_carries_a_timm_pretrained_cfg_that_timm_turns_into_a_transform(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = ViT.from_variant("mu/8", img_size=32)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    path = tmp_path / "student.safetensors"
    cfg = export.timm_pretrained_cfg(32, crop_pct=0.9)
    export.export_timm(params, path, pretrained_cfg=cfg)

    # The README's "Using the student" snippet.
    metadata = safe_open(str(path), "pt").metadata()
    vit = timm.models.vision_transformer.VisionTransformer(**json.loads(metadata["timm_kwargs"]))
    vit.load_state_dict(load_file(str(path)))
    vit.pretrained_cfg = json.loads(metadata["pretrained_cfg"])
    data_config = timm.data.resolve_model_data_config(vit)
    assert tuple(data_config["input_size"]) == (3, 32, 32) and data_config["crop_pct"] == 0.9
    assert data_config["interpolation"] == "bilinear"
    np.testing.assert_allclose(data_config["mean"], (0.485, 0.456, 0.406))
    transform = timm.data.create_transform(**data_config)
    image = Image.open(io.BytesIO(pictures.png_bytes(np.zeros((48, 40, 3), np.uint8))))
    assert tuple(transform(image).shape) == (3, 32, 32)
