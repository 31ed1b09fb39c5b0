"""Training crops and resizing (dmt_jax/data/augment.py) against their references: timm's (torchvision's)
RandomResizedCrop box sampler, PIL's antialiased bilinear and bicubic resizing, TF's ScaleAndTranslate."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dmt_jax.data import augment

SHAPES = [
    ((300, 280), (224, 224), None, (0, 0)),  # downscale
    ((37, 41), (56, 48), None, (0, 0)),  # upscale, not square
    ((20, 500), (24, 24), None, (0, 0)),  # extreme aspect
    ((64, 128), (28, 28), (32, 64), (2, 18)),  # a window of a resized image (eval)
    ((90, 61), (32, 32), (53, 36), (10, 2)),
]


@pytest.mark.parametrize("in_hw, out_hw, resized_hw, offset_hw", SHAPES)
def test_banded_bicubic_equals_tf_antialiased_bicubic(in_hw, out_hw, resized_hw, offset_hw):
    # Values in [64, 192): no bicubic overshoot reaches 0 or 255 (TF does not clip between passes; PIL does).
    image = np.random.default_rng(0).integers(64, 192, (*in_hw, 3), dtype=np.uint8)
    reference = tf.image.resize(image, resized_hw or out_hw, method="bicubic", antialias=True).numpy()
    reference = reference[offset_hw[0] : offset_hw[0] + out_hw[0], offset_hw[1] : offset_hw[1] + out_hw[1]]
    ours = augment.resize_window(tf.constant(image), *out_hw, resized_hw, offset_hw, "bicubic").numpy()
    np.testing.assert_allclose(ours, reference, atol=0.05)


@pytest.mark.parametrize("interpolation, pil", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
@pytest.mark.parametrize(
    "in_hw, out_hw", [((300, 280), (224, 224)), ((37, 41), (56, 48)), ((97, 203), (32, 32))]
)
def test_resize_equals_pil(interpolation, pil, in_hw, out_hw):
    """PIL (what timm and torchvision resize with) rounds to uint8 between its two passes: 1 level."""
    rng = np.random.default_rng(1)
    smooth = np.cumsum(np.cumsum(rng.normal(0, 0.5, (*in_hw, 3)), 0), 1)  # photo-like, some of it saturated
    image = np.clip(128 + smooth - smooth.mean((0, 1)) + rng.normal(0, 20, (*in_hw, 3)), 0, 255)
    image = image.astype(np.uint8)
    want = np.asarray(Image.fromarray(image).resize(out_hw[::-1], pil)).astype(float)
    ours = augment._to_uint8(augment.resize_window(tf.constant(image), *out_hw, interpolation=interpolation))
    diff = np.abs(ours.numpy().astype(float) - want)
    assert diff.max() <= 2 and (diff <= 1).mean() > 0.99, (diff.max(), (diff <= 1).mean())


def _ours(shape, scale, ratio, n):
    boxes = [augment.sample_crop(shape, tf.constant([11, g], tf.int64), scale, ratio) for g in range(n)]
    return np.array([[*b.numpy(), *s.numpy()] for b, s in boxes])  # top, left, height, width


def _timms(shape, scale, ratio, n):
    import random

    from timm.data.transforms import RandomResizedCropAndInterpolation

    random.seed(0)
    image = Image.new("RGB", (shape[1], shape[0]))
    return np.array([RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(n)])


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (64, 64)])
def test_crop_boxes_follow_timms_distribution(shape):
    """Same distribution as timm's get_params (torchvision's): area fraction, log aspect ratio and
    position, compared by quantiles over 1500 draws each."""
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 1500
    ours, want = _ours(shape, scale, ratio, n), _timms(shape, scale, ratio, n)
    assert (ours[:, 0] + ours[:, 2] <= shape[0]).all() and (ours[:, 1] + ours[:, 3] <= shape[1]).all()
    assert (ours >= 0).all()

    def stats(boxes):
        area = boxes[:, 2] * boxes[:, 3] / (shape[0] * shape[1])
        log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
        centre = (boxes[:, 0] + boxes[:, 2] / 2) / shape[0]
        return [np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9]) for v in (area, log_aspect, centre)]

    for got, expected, tolerance in zip(stats(ours), stats(want), (0.04, 0.04, 0.04), strict=True):
        np.testing.assert_allclose(got, expected, atol=tolerance)
    # Log-uniform aspect (not uniform): as many boxes wider than tall as taller than wide.
    wider = (ours[:, 3] > ours[:, 2]).mean()
    assert abs(wider - (want[:, 3] > want[:, 2]).mean()) < 0.05


@pytest.mark.parametrize("shape", [(40, 400), (400, 40), (100, 110)])
def test_crop_falls_back_to_timms_central_crop(shape):
    """No box fits in 10 attempts (scale near 1, an image outside the ratio range): the central crop of
    the nearest ratio, exactly timm's (deterministic)."""
    scale, ratio = (0.99, 1.0), (3 / 4, 4 / 3)
    if shape == (100, 110):  # inside the ratio range: no box fits a too-large area, the whole image
        scale = (1.5, 1.5)
    ours, want = _ours(shape, scale, ratio, 5), _timms(shape, scale, ratio, 5)
    np.testing.assert_array_equal(ours, want)
