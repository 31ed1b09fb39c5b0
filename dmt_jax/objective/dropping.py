"""Teacher dropping (UNIC, Sariyildiz et al. 2024, naver/unic modeling/teacher_dropping.py).

Per image, the teacher with the highest loss always stays; each other teacher is dropped with
probability p; the kept teachers' losses are averaged with renormalized weights, so every image
weighs alike in the batch. UNIC draws the coin flips on the host (`random.random()` per image and
teacher); here they come from the step's rng inside the jitted step, so every process and a resumed
run draw the same ones. UNIC's code divides by the number of kept (teacher, image) pairs of the whole
batch, which lets an image with more teachers kept weigh more; we renormalize per image (what its
comment says: "each image contributes to the loss with equal weight").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_mask(rng, losses, p: float):
    """losses [K, B] (per teacher, per image; only their order matters) -> float32 [K, B] of 0/1: the
    highest-loss teacher of each image kept, every other kept with probability 1 - p."""
    k, b = losses.shape
    hardest = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(losses), axis=0), k, axis=0, dtype=jnp.bool_)
    if p <= 0:
        return jnp.ones((k, b), jnp.float32)
    survive = jax.random.bernoulli(rng, 1.0 - p, (k, b))
    return (hardest | survive).astype(jnp.float32)


def combine(losses, keep, weights=None):
    """Per image, the weighted mean of its kept teachers' losses; then the mean over images.

    losses, keep [K, B]; weights [K] (default equal). Without dropping (keep all ones) this is
    sum_k w_k L_k / sum_k w_k averaged over images."""
    k = losses.shape[0]
    w = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    kept = keep * w[:, None]
    per_image = (kept * losses).sum(0) / jnp.maximum(kept.sum(0), 1e-12)
    return per_image.mean()
