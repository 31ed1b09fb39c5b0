"""k-NN and linear probe on features whose separability is known."""

import numpy as np
import pytest

from dmt_jax.evaluate import knn_top1, linear_probe_top1


def features(rng, labels, centers, noise):
    return (centers[labels] + noise * rng.standard_normal((len(labels), centers.shape[1]))).astype(np.float32)


@pytest.mark.parametrize("probe", [knn_top1, linear_probe_top1])
def test_probes_separate_clusters_and_find_nothing_in_noise(probe):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 32))
    y_train, y_test = rng.integers(0, 10, 500), rng.integers(0, 10, 200)
    clean = probe(features(rng, y_train, centers, 0.3), y_train, features(rng, y_test, centers, 0.3), y_test)
    assert clean > 95
    # Labels unrelated to the features: chance level (10%).
    shuffled = rng.permutation(y_test)
    noise = probe(
        features(rng, y_train, centers, 0.3), y_train, features(rng, y_test, centers, 0.3), shuffled
    )
    assert noise < 25
