"""k-NN and linear probe on features whose separability is known (banks sharded over a 4 x 2 mesh)."""

import functools

import numpy as np
import pytest

from dmt_jax import evaluate, parallel


def features(rng, labels, centers, noise):
    return (centers[labels] + noise * rng.standard_normal((len(labels), centers.shape[1]))).astype(np.float32)


@pytest.mark.parametrize(
    "probe", [evaluate.knn_top1, functools.partial(evaluate.linear_probe_top1, epochs=60, batch_size=64)]
)
def test_probes_separate_clusters_and_find_nothing_in_noise(probe):
    mesh = parallel.make_mesh(4, 2)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 32))
    y_train, y_test = rng.integers(0, 10, 500), rng.integers(0, 10, 200)

    def score(x_train, x_test, labels):
        bank = evaluate.bank_from_host(x_train, y_train, mesh, 64)
        return probe(bank, evaluate.bank_from_host(x_test, labels, mesh, 64))

    clean = score(features(rng, y_train, centers, 0.3), features(rng, y_test, centers, 0.3), y_test)
    assert clean > 95
    # Labels unrelated to the features: chance level (10%).
    shuffled = rng.permutation(y_test)
    noise = score(features(rng, y_train, centers, 0.3), features(rng, y_test, centers, 0.3), shuffled)
    assert noise < 25
