"""Fine-tuning augmentations on uint8 images inside tf.data: timm's RandAugment and random erasing.

RandAugment follows timm's `rand-m9-mstd0.5-inc1` (MAE / BEiT fine-tuning): `n` ops drawn with
replacement from timm's 15 "increasing" ops, each applied with probability 0.5, at a magnitude
drawn per op from N(m, mstd) clipped to [0, 10]. Geometric ops fill with the ImageNet mean in pixels,
(124, 116, 104), as timm's (`img_mean` of create_transform), and resample bilinearly: timm resamples
with the recipe's interpolation (bicubic in MAE's), which TF's projective transform does not offer
(nearest and bilinear only). Random erasing (timm's mode 'pixel', one box, area 2-33%,
log-uniform aspect 0.3-3.3) fills the box with per-pixel noise of the ImageNet pixel statistics in
uint8 (timm draws N(0, 1) after normalization; the same noise, rounded to pixels).

All randomness is stateless, from the seed each image is given (exact resume).
"""

from __future__ import annotations

import functools
import math
import re

import tensorflow as tf

_MEAN = (124.0, 116.0, 104.0)  # timm: round(255 * IMAGENET_DEFAULT_MEAN), the fill of geometric ops
_STD = (58.4, 57.1, 57.4)


def parse_randaugment(spec: str) -> tuple[int, float, float]:
    """'rand-m9-mstd0.5-inc1' -> (num_ops 2, magnitude 9, magnitude std 0.5); only the increasing set."""
    fields = spec.split("-")
    if fields[0] != "rand":
        raise ValueError(f"randaugment {spec!r}: write timm's string, e.g. 'rand-m9-mstd0.5-inc1'")
    num_ops, magnitude, mstd = 2, 10.0, 0.0
    for field in fields[1:]:
        m = re.fullmatch(r"(mstd|inc|m|n)([0-9.]+)", field)
        if not m:
            raise ValueError(f"randaugment {spec!r}: unknown part {field!r} (known: m, n, mstd, inc1)")
        key, value = m.group(1), float(m.group(2))
        if key == "inc" and value != 1:
            raise ValueError(f"randaugment {spec!r}: only the increasing op set (inc1) is implemented")
        num_ops = int(value) if key == "n" else num_ops
        magnitude = value if key == "m" else magnitude
        mstd = value if key == "mstd" else mstd
    return num_ops, magnitude, mstd


def make_augment(randaugment: str, random_erasing: float):
    """(uint8 image [H, W, 3], seed [2]) -> uint8 image, or None when both are off."""
    rand = parse_randaugment(randaugment) if randaugment else None
    if not rand and random_erasing <= 0:
        return None

    def apply(image, seed):
        x = tf.cast(image, tf.float32)
        if rand:
            x = rand_augment(x, seed, *rand)
        if random_erasing > 0:
            x = erase(x, tf.random.experimental.stateless_fold_in(seed, 7), random_erasing)
        return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

    return apply


# ---------------------------------------------------------------- the ops (float32 pixels in [0, 255])


def _blend(degenerate, image, factor):
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grey(image):
    return tf.reduce_sum(image * [0.299, 0.587, 0.114], axis=-1, keepdims=True)


def _auto_contrast(x, _m, _sign):
    lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
    return tf.where(hi > lo, (x - lo) * scale, x)


def _equalize_channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.cast(tf.where(step > 0, tf.gather(lut, c), c), tf.float32)


def _equalize(x, _m, _sign):
    x = tf.round(x)
    return tf.stack([_equalize_channel(x[..., i]) for i in range(3)], axis=-1)


def _invert(x, _m, _sign):
    return 255.0 - x


def _posterize(x, m, _sign):
    bits = 4 - tf.cast(m / 10.0 * 4.0, tf.int32)  # timm's increasing posterize: 4 .. 0 bits kept
    shift = 8 - bits
    x = tf.cast(tf.round(x), tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.float32)


def _solarize(x, m, _sign):
    threshold = 256.0 - tf.floor(m / 10.0 * 256.0)
    return tf.where(x >= threshold, 255.0 - x, x)


def _solarize_add(x, m, _sign):
    return tf.where(x < 128.0, tf.minimum(x + tf.floor(m / 10.0 * 110.0), 255.0), x)


def _enhance_factor(m, sign):
    return 1.0 + sign * m / 10.0 * 0.9


def _color(x, m, sign):
    return _blend(_grey(x), x, _enhance_factor(m, sign))


def _contrast(x, m, sign):
    return _blend(tf.reduce_mean(_grey(x)), x, _enhance_factor(m, sign))


def _brightness(x, m, sign):
    return _blend(tf.zeros_like(x), x, _enhance_factor(m, sign))


def _sharpness(x, m, sign):
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.zeros(tf.shape(smooth)[:2] - 2), [[1, 1], [1, 1]], constant_values=1.0)[..., None]
    smooth = border * x + (1.0 - border) * smooth  # PIL leaves the border pixels as they are
    return _blend(smooth, x, _enhance_factor(m, sign))


def _affine(x, a0, a1, a2, b0, b1, b2):
    """PIL's Image.transform(AFFINE): output point (u, v) reads input (a0 u + a1 v + a2, b0 u + b1 v + b2),
    in PIL's continuous coordinates (pixel centres at +0.5), bilinear."""
    # TF maps pixel indices, not centres: shift the offsets so both sample the same points.
    a2 = a2 + 0.5 * (a0 + a1) - 0.5
    b2 = b2 + 0.5 * (b0 + b1) - 0.5
    transform = tf.cast(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), tf.float32)[None]
    # The fill is one number for every channel: transform x - mean with fill 0, then add the mean back
    # (bilinear sampling is linear, so this is a fill of the mean per channel).
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=(x - _MEAN)[None],
        transforms=transform,
        output_shape=tf.shape(x)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0] + _MEAN


def _rotate(x, m, sign):
    """PIL's Image.rotate(degrees) about the image centre (counter-clockwise for positive degrees)."""
    angle = sign * m / 10.0 * 30.0 * math.pi / 180.0
    cy, cx = tf.cast(tf.shape(x)[0], tf.float32) / 2, tf.cast(tf.shape(x)[1], tf.float32) / 2
    cos, sin = tf.cos(angle), tf.sin(angle)
    return _affine(x, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def _shear_x(x, m, sign):
    return _affine(x, 1.0, sign * m / 10.0 * 0.3, 0.0, 0.0, 1.0, 0.0)


def _shear_y(x, m, sign):
    return _affine(x, 1.0, 0.0, 0.0, sign * m / 10.0 * 0.3, 1.0, 0.0)


def _translate_x(x, m, sign):
    pixels = sign * m / 10.0 * 0.45 * tf.cast(tf.shape(x)[1], tf.float32)
    return _affine(x, 1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def _translate_y(x, m, sign):
    pixels = sign * m / 10.0 * 0.45 * tf.cast(tf.shape(x)[0], tf.float32)
    return _affine(x, 1.0, 0.0, 0.0, 0.0, 1.0, pixels)


# timm's _RAND_INCREASING_TRANSFORMS, in its order: op(x, magnitude, sign); the sign (random, as timm
# negates a level) matters only to the ops whose level has a direction.
_OPS = [
    _auto_contrast, _equalize, _invert, _rotate, _posterize, _solarize, _solarize_add, _color, _contrast,
    _brightness, _sharpness, _shear_x, _shear_y, _translate_x, _translate_y,
]  # fmt: skip


def rand_augment(x, seed, num_ops: int, magnitude: float, mstd: float):
    for i in range(num_ops):
        s = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, i), 4)
        op = tf.random.stateless_uniform([], s[0], 0, len(_OPS), tf.int32)
        m = magnitude + (mstd * tf.random.stateless_normal([], s[1]) if mstd > 0 else 0.0)
        m = tf.clip_by_value(m, 0.0, 10.0)
        sign = tf.where(tf.random.stateless_uniform([], s[2]) < 0.5, -1.0, 1.0)
        applied = tf.switch_case(op, [functools.partial(f, x, m, sign) for f in _OPS])
        x = tf.where(tf.random.stateless_uniform([], s[3]) < 0.5, applied, x)  # each op with p = 0.5
        x.set_shape([None, None, 3])
    return x


def erase(x, seed, probability: float):
    """timm RandomErasing(probability, mode='pixel', max_count=1): one box, 10 tries to fit it."""
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    area = tf.cast(h * w, tf.float32)
    s = tf.random.experimental.stateless_split(seed, 4)
    targets = tf.random.stateless_uniform([10], s[0], 0.02, 1 / 3) * area
    ratios = tf.exp(tf.random.stateless_uniform([10], s[1], math.log(0.3), math.log(1 / 0.3)))
    bh = tf.cast(tf.round(tf.sqrt(targets * ratios)), tf.int32)
    bw = tf.cast(tf.round(tf.sqrt(targets / ratios)), tf.int32)
    fits = (bh < h) & (bw < w)
    first = tf.argmax(tf.cast(fits, tf.int32))
    bh, bw = bh[first], bw[first]
    corner = tf.random.stateless_uniform([2], s[2], 0.0, 1.0)
    top = tf.cast(corner[0] * tf.cast(h - bh + 1, tf.float32), tf.int32)
    left = tf.cast(corner[1] * tf.cast(w - bw + 1, tf.float32), tf.int32)
    rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
    box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    noise = tf.random.stateless_normal(tf.shape(x), s[3]) * _STD + _MEAN
    do = tf.reduce_any(fits) & (tf.random.stateless_uniform([], tf.reverse(s[3], [0])) < probability)
    return tf.where(do & box[..., None], noise, x)
