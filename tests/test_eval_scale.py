"""Evaluation at scale: no data baked into compiled programs, one program per shape, labels that travel
with their images whatever the mesh's device order, an eval batch that fits any device count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dmt_jax import evaluate, parallel

MB = 1 << 20


def test_knn_and_probe_programs_hold_no_large_constant():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((4096, 128)).astype(np.float32)  # 2 MB: would show if baked in
    labels = rng.integers(0, 100, 4096)
    lowered = [
        evaluate._knn_predict.lower(
            jnp.asarray(bank), jnp.asarray(labels, jnp.int32), jnp.zeros((64, 128)), 20, 0.07, 100
        ),
        evaluate._probe_train.lower(jnp.asarray(bank), jnp.asarray(labels, jnp.int32), 100, 3, 0.01, 1e-4),
    ]
    for program in lowered:
        assert len(program.as_text()) < MB / 4


def test_a_baked_in_constant_would_be_seen():
    """The check above can fail: a closed-over array shows in the lowered text at full size."""
    bank = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 128)).astype(np.float32))
    assert len(jax.jit(lambda q: q @ bank.T).lower(jnp.zeros((64, 128))).as_text()) > MB


def test_knn_compiles_once_for_every_chunk_and_call():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((5, 16))
    y_train, y_test = rng.integers(0, 5, 300), rng.integers(0, 5, 70)
    x_train = (centers[y_train] + 0.2 * rng.standard_normal((300, 16))).astype(np.float32)
    x_test = (centers[y_test] + 0.2 * rng.standard_normal((70, 16))).astype(np.float32)
    evaluate._knn_predict.clear_cache()
    top1 = evaluate.knn_top1(x_train, y_train, x_test, y_test, chunk=32)  # chunks 32, 32, 6 (padded)
    assert evaluate.knn_top1(x_train, y_train, x_test, y_test, chunk=32) == top1 > 95
    assert evaluate._knn_predict._cache_size() == 1


@pytest.mark.parametrize(
    "requested,devices,expected", [(12, 8, 16), (256, 512, 512), (128, 8, 128), (1, 3, 3)]
)
def test_eval_batch_rounds_up_to_the_device_count(requested, devices, expected):
    assert evaluate.eval_batch_size(requested, devices) == expected


def test_labels_line_up_with_features_on_a_shuffled_mesh():
    devices = np.asarray(jax.devices())[[5, 2, 7, 0, 3, 6, 1, 4]].reshape(4, 2)
    mesh = Mesh(devices, parallel.BATCH_AXES)
    rng = np.random.default_rng(2)

    def batches():
        for _ in range(3):
            label = rng.integers(0, 200, 16).astype(np.int32)
            image = np.broadcast_to(label[:, None, None, None], (16, 4, 4, 3)).astype(np.uint8)
            yield {"image": image, "label": label, "valid": np.arange(16) < 13}

    features, labels = evaluate.collect(jax.jit(lambda pixels: pixels[:, 0, 0, 0]), batches(), mesh)
    assert len(labels) == 39
    np.testing.assert_array_equal(features.astype(np.int32), labels)
