"""Distances between a head's output and a teacher's target, per token: cosine and smooth-L1, mixed.

AM-RADIO and Theia: dense 0.9 cosine + 0.1 smooth-L1, summary cosine; UNIC: 0.5 / 0.5 for both.
Computed in float32; each returns one value per token (or per image for a summary), averaged over
channels, so the caller chooses how tokens and images are averaged.
"""

from __future__ import annotations

import jax.numpy as jnp


def cosine_distance(pred, target):
    """1 - cos(pred, target) over the last axis (torch's F.cosine_similarity, eps 1e-8 on the product)."""
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    norms = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1)
    return 1.0 - (pred * target).sum(-1) / jnp.maximum(norms, 1e-8)


def smooth_l1(pred, target, beta: float = 1.0):
    """torch's F.smooth_l1_loss(reduction='none', beta), averaged over the last axis."""
    diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).mean(-1)


def mixed(pred, target, cosine_weight: float, smooth_l1_weight: float, beta: float = 1.0):
    """cosine_weight * (1 - cos) + smooth_l1_weight * smooth-L1, per token; a zero weight costs nothing."""
    out = jnp.zeros(pred.shape[:-1], jnp.float32)
    if cosine_weight:
        out = out + cosine_weight * cosine_distance(pred, target)
    if smooth_l1_weight:
        out = out + smooth_l1_weight * smooth_l1(pred, target, beta)
    return out
