"""Per-image transforms (graph ops, used inside tf.data maps): train crop + flip, eval resize + crop.

All randomness is stateless and comes from an explicit seed, so an image's view depends only on the
seed it is given, never on thread scheduling or on how many processes read the data.
"""

from __future__ import annotations

import math

import tensorflow as tf

_BAND = 16  # output pixels per band: narrow bands waste few multiplies, wide ones need fewer ops


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _triangle(distance):
    return tf.maximum(0.0, 1.0 - tf.abs(distance))


def _keys_cubic(distance):
    """Keys' cubic convolution with a = -0.5: PIL's BICUBIC filter (and TF's 'keyscubic')."""
    d = tf.abs(distance)
    a = -0.5
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return tf.where(d <= 1.0, near, tf.where(d < 2.0, far, 0.0))


# name -> (kernel, radius): PIL's BILINEAR and BICUBIC filters, both antialiased when downscaling.
_KERNELS = {"bilinear": (_triangle, 1.0), "bicubic": (_keys_cubic, 2.0)}
INTERPOLATIONS = tuple(_KERNELS)


def _band_weights(in_size, resized_size, out_size: int, offset, interpolation: str = "bilinear"):
    """Weights of output pixels [offset, offset + out_size) of one axis resized from in_size to
    resized_size, in bands of _BAND outputs that read `span` consecutive inputs from `start`:
    returns (input index [bands, span], weight [bands, _BAND, span])."""
    kernel, radius = _KERNELS[interpolation]
    scale = tf.cast(in_size, tf.float32) / tf.cast(resized_size, tf.float32)
    support = tf.maximum(scale, 1.0)  # antialiasing: the kernel widens with the downscale factor
    bands = -(-out_size // _BAND)
    span = tf.minimum(tf.cast(tf.math.ceil(_BAND * scale + 2.0 * radius * support), tf.int32) + 1, in_size)
    centers = (tf.cast(tf.range(bands * _BAND) + offset, tf.float32) + 0.5) * scale
    centers = tf.reshape(centers, [bands, _BAND])
    start = tf.cast(tf.math.ceil(centers[:, 0] - radius * support - 0.5), tf.int32)
    index = tf.clip_by_value(start, 0, in_size - span)[:, None] + tf.range(span)
    distance = (tf.cast(index, tf.float32)[:, None, :] + 0.5 - centers[:, :, None]) / support
    weight = kernel(distance)  # taps outside the image are absent: the others are renormalized (PIL)
    return index, weight / tf.reduce_sum(weight, axis=2, keepdims=True)


def _resample_rows(image: tf.Tensor, resized_size, out_size: int, offset, interpolation: str) -> tf.Tensor:
    """[H, W, C] -> [out_size, W, C] float32: one small matmul per band of output rows."""
    index, weight = _band_weights(tf.shape(image)[0], resized_size, out_size, offset, interpolation)
    width_channels = tf.shape(image)[1] * tf.shape(image)[2]
    rows = tf.cast(tf.gather(image, index, axis=0), tf.float32)  # [bands, span, W, C]
    rows = tf.reshape(rows, tf.concat([tf.shape(index), [width_channels]], 0))
    rows = tf.matmul(weight, rows)  # [bands, _BAND, W * C]
    return tf.reshape(rows, [-1, tf.shape(image)[1], tf.shape(image)[2]])[:out_size]


def resize_window(
    image: tf.Tensor,
    height: int,
    width: int,
    resized_hw=None,
    offset_hw=(0, 0),
    interpolation: str = "bilinear",
) -> tf.Tensor:
    """The height x width window at offset_hw of `image` resized to resized_hw (default: the window's
    size), antialiased 'bilinear' or 'bicubic' as PIL resizes; float32.

    Equal (to float rounding) to tf.image.resize(method='bilinear' | 'bicubic', antialias=True)
    followed by the crop, i.e. TF's ScaleAndTranslate with the triangle or Keys cubic kernel, PIL's
    filters when downscaling; for pixels in [0, 255], as PIL also stores its first pass (columns) in
    8 bits, that pass is clipped to [0, 255] (only a bicubic overshoot reaches past). Computed as
    banded matmuls (about 1.7x faster than ScaleAndTranslate on CPU), only for the window's pixels.
    """
    resized_h, resized_w = resized_hw if resized_hw is not None else (height, width)
    # Columns first, as PIL, which stores that pass in 8 bits: a bicubic overshoot past 0 or 255 is
    # clipped before the rows are resampled.
    columns = _resample_rows(tf.transpose(image, [1, 0, 2]), resized_w, width, offset_hw[1], interpolation)
    columns = tf.clip_by_value(tf.transpose(columns, [1, 0, 2]), 0.0, 255.0)
    out = _resample_rows(columns, resized_h, height, offset_hw[0], interpolation)
    out.set_shape([height, width, image.shape[-1]])
    return out


# PIL's default decompression-bomb limit: larger images are refused from their header, never decoded.
MAX_IMAGE_PIXELS = 89_478_485


def _header_ints(encoded: tf.Tensor, offset: int, count: int, size: int, big_endian: bool) -> tf.Tensor:
    """`count` unsigned integers of `size` bytes at `offset` of the encoded bytes, as int64."""
    raw = tf.io.decode_raw(tf.strings.substr(encoded, offset, count * size), tf.uint8)
    raw = tf.reshape(tf.cast(raw, tf.int64), [count, size])
    powers = tf.constant([256**k for k in range(size)], tf.int64)
    return tf.reduce_sum(raw * (powers[::-1] if big_endian else powers), axis=1)


def header_pixels(encoded: tf.Tensor) -> tf.Tensor:
    """width * height from the header of a JPEG, PNG, GIF or BMP (int64; 0 for another format), read
    without decoding; a PNG/GIF/BMP cut short inside its header raises (an unreadable image)."""
    magic = tf.strings.substr(encoded, 0, 4)

    def area(dims):
        return tf.reduce_prod(tf.abs(tf.cast(dims, tf.int64)))

    def bmp():  # signed 32-bit width and height (a negative height means top-down rows)
        dims = _header_ints(encoded, 18, 2, 4, big_endian=False)
        return area(tf.where(dims >= 2**31, 2**32 - dims, dims))

    return tf.case(
        [
            (tf.io.is_jpeg(encoded), lambda: area(tf.io.extract_jpeg_shape(encoded, tf.int64)[:2])),
            (tf.equal(magic, b"\x89PNG"), lambda: area(_header_ints(encoded, 16, 2, 4, big_endian=True))),
            (tf.equal(tf.strings.substr(magic, 0, 3), b"GIF"),
             lambda: area(_header_ints(encoded, 6, 2, 2, big_endian=False))),
            (tf.equal(tf.strings.substr(magic, 0, 2), b"BM"), bmp),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )  # fmt: skip


def check_pixels(encoded: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """`encoded`, or an error (the image is then skipped and counted as unreadable) when its header
    claims more than max_pixels pixels: a 48 KB PNG can claim 20000 x 20000 and take 8 GB to decode."""
    if max_pixels <= 0:
        return encoded
    pixels = header_pixels(encoded)
    check = tf.debugging.assert_less_equal(
        pixels, tf.constant(max_pixels, tf.int64), message="image has more pixels than data.max_image_pixels"
    )
    with tf.control_dependencies([check]):
        return tf.identity(encoded)


def sample_crop(image_shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params (timm's too), stateless: up to `attempts` boxes of
    area uniform in `scale` x the image's and aspect ratio log-uniform in `ratio`, the first that fits
    placed uniformly; if none fits, the central crop of the ratio range's nearest ratio. Returns
    (begin [top, left], size [height, width]), int32."""
    height = tf.cast(image_shape[0], tf.float32)
    width = tf.cast(image_shape[1], tf.float32)
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    areas = tf.random.stateless_uniform([attempts], s[0], scale[0], scale[1]) * height * width
    log_ratio = tf.random.stateless_uniform([attempts], s[1], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    w, h = tf.round(tf.sqrt(areas * aspect)), tf.round(tf.sqrt(areas / aspect))  # half to even, as round()
    fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = tf.argmax(tf.cast(fits, tf.int32))
    w, h = w[first], h[first]
    corner = tf.random.stateless_uniform([2], s[2], 0.0, 1.0)  # randint(0, H - h) and randint(0, W - w)
    top = tf.minimum(tf.floor(corner[0] * (height - h + 1)), height - h)
    left = tf.minimum(tf.floor(corner[1] * (width - w + 1)), width - w)
    # The fallback: the whole image, cut to the nearest ratio of the range, centred.
    in_ratio = width / height
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    found = tf.reduce_any(fits)
    h, w = tf.where(found, h, fallback_h), tf.where(found, w, fallback_w)
    top = tf.where(found, top, tf.floor((height - h) / 2))
    left = tf.where(found, left, tf.floor((width - w) / 2))
    return tf.cast(tf.stack([top, left]), tf.int32), tf.cast(tf.stack([h, w]), tf.int32)


def decode_random_resized_crop(
    encoded: tf.Tensor,
    seed: tf.Tensor,
    img_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
) -> tf.Tensor:
    """RandomResizedCrop (torchvision's box, sample_crop) as big_vision's inception crop: the box is
    sampled from the header's shape, then only that window is decoded for JPEG (most of the decode
    cost saved), decode + slice otherwise."""

    def jpeg_crop():
        begin, size = sample_crop(tf.io.extract_jpeg_shape(encoded), seed, scale, ratio)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)

    def other_crop():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        begin, size = sample_crop(tf.shape(image), seed, scale, ratio)
        return tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([size, [3]], 0))

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg_crop, other_crop)
    crop.set_shape([None, None, 3])
    return _to_uint8(resize_window(crop, img_size, img_size, interpolation=interpolation))


def train_transform(
    encoded: tf.Tensor, seed: tf.Tensor, img_size: int, max_pixels: int = MAX_IMAGE_PIXELS, **crop_kwargs
) -> tf.Tensor:
    """One view per image (METHOD.md): random resized crop, then a horizontal flip with p = 0.5."""
    encoded = check_pixels(encoded, max_pixels)
    crop_seed = seed
    flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    image = decode_random_resized_crop(encoded, crop_seed, img_size, **crop_kwargs)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image.set_shape([img_size, img_size, 3])
    return image


def eval_resize_size(img_size: int, crop_fraction: float) -> int:
    """Shorter side before the center crop (224 -> 256 at 0.875), floored as timm does."""
    return int(math.floor(img_size / crop_fraction + 1e-6))


def eval_transform(
    encoded: tf.Tensor,
    img_size: int,
    crop_fraction: float = 0.875,
    max_pixels: int = MAX_IMAGE_PIXELS,
    interpolation: str = "bilinear",
) -> tf.Tensor:
    """Resize the shorter side to img_size / crop_fraction, then take the central img_size square
    (only the square's pixels are computed)."""
    image = tf.io.decode_image(check_pixels(encoded, max_pixels), channels=3, expand_animations=False)
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    factor = eval_resize_size(img_size, crop_fraction) / tf.minimum(height, width)
    resized_h = tf.maximum(img_size, tf.cast(tf.round(height * factor), tf.int32))
    resized_w = tf.maximum(img_size, tf.cast(tf.round(width * factor), tf.int32))
    offsets = ((resized_h - img_size) // 2, (resized_w - img_size) // 2)
    window = resize_window(image, img_size, img_size, (resized_h, resized_w), offsets, interpolation)
    return _to_uint8(window)
