"""Chunked reads of a tfds array_record source (one Python call per chunk) equal its Python reads."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from dmt_jax import data

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import input as bench_input  # noqa: E402


def test_chunked_fetch_then_decode_equals_reading_each_example(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "photos" / "all").mkdir(parents=True)
    for i in range(12):
        pixels = rng.integers(0, 256, (rng.integers(20, 40), rng.integers(20, 40), 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        (tmp_path / "photos" / "all" / f"{i:02d}.jpg").write_bytes(buffer.getvalue())
    data_dir = bench_input.make_tfds(tmp_path, tmp_path / "photos")  # as bench/input.py builds it
    source = data.TfdsSource("bench_photos", "train", str(data_dir))
    indices = [5, 0, 11, 5, 7]
    fetched = source.tf_fetch(tf.constant(indices, tf.int64))
    assert fetched["record"].shape == (5,)
    for k, i in enumerate(indices):
        encoded, label = source.tf_decode({"record": fetched["record"][k]})
        assert (encoded.numpy(), int(label)) == source[i]
    encoded, label = source.tf_lookup(tf.constant(7, tf.int64))  # the eval path: a chunk of one
    assert encoded.shape == () and (encoded.numpy(), int(label)) == source[7]
