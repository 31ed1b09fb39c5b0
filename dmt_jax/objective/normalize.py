"""Normalization of a teacher's targets, per teacher and per target kind (summary, dense).

Kinds:
- none: the teacher's features as they are.
- layernorm: DMT's LayerNorm without parameters, per token over channels (objective/dmt.py).
- standardize: per channel, (x - mean) / (std + eps) with running statistics (UNIC, DUNE, Theia): each
  step blends the global batch's mean and std into them, mean <- (1 - m) mean + m batch_mean, with m
  following a cosine from `momentum[0]` to `momentum[1]` over the run (UNIC: 1.0 -> 0.001). Our
  order: update, then normalize (UNIC normalizes with the statistics before the update, so its first
  step sees raw features).
- phi_s: PHI-S (Ranzinger et al. 2024, used by RADIOv2.5): x' = s H U^T (x - mu), U the eigenvectors
  of the features' covariance, s = 1 / sqrt(mean eigenvalue), H a normalized Hadamard matrix
  (objective/hadamard.py). Every channel of x' then has variance 1 (H spreads the eigenvalues evenly
  over the channels; the covariance is s^2 H diag(eigenvalues) H^T, not the identity: PHI-S
  equalizes, it does not whiten). mu and the covariance are estimated over the first `phi_s_steps`
  steps (pooled, with Chan's parallel update), the transform recomputed at each of them, then frozen.

Statistics are float32 arrays in the train state (never given to the optimizer), updated inside the
jitted step from the global batch (every process computes the same values), checkpointed with the
state, and foldable into the last Linear of a head at export (`fold_into_linear`): the head then
predicts the teacher's own features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dmt_jax.objective import hadamard as hadamard_lib
from dmt_jax.objective.dmt import layer_norm_no_params

KINDS = ("none", "layernorm", "standardize", "phi_s")
HIGHEST = jax.lax.Precision.HIGHEST


def init_stats(kind: str, dim: int) -> dict:
    """The statistics a kind keeps for features of width `dim` (an empty dict: none)."""
    if kind in ("none", "layernorm"):
        return {}
    if kind == "standardize":
        return {"mean": jnp.zeros((dim,), jnp.float32), "std": jnp.ones((dim,), jnp.float32)}
    if kind == "phi_s":
        return {
            "steps": jnp.zeros((), jnp.int32),  # steps pooled so far
            "count": jnp.zeros((), jnp.float32),  # feature vectors pooled so far
            "mean": jnp.zeros((dim,), jnp.float32),
            "m2": jnp.zeros((dim, dim), jnp.float32),  # sum of outer products of deviations
            "transform": jnp.eye(dim, dtype=jnp.float32),  # s H U^T
            "scale": jnp.ones((), jnp.float32),  # s
        }
    raise ValueError(f"normalization must be one of {', '.join(KINDS)}, got {kind!r}")


def momentum_at(step, total_steps: int, momentum: tuple[float, float]) -> jax.Array:
    """UNIC's cosine schedule of the statistics' momentum: momentum[0] at step 0 -> momentum[1] at the end."""
    start, end = momentum
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * t))


def normalize(kind: str, x, stats: dict, *, eps: float = 1e-6, momentum=0.0, phi_s_steps: int = 0,
              update: bool = True, sum_rows=None) -> tuple[jax.Array, dict]:  # fmt: skip
    """x [..., D] -> (normalized float32 x, new stats). Statistics are taken over every leading axis
    (images, tokens) of the global batch. update=False (evaluation) applies the stats as they are.
    sum_rows: `sum_rows(x, rows_sum)` sums x [M, ...] over its rows, rows_sum(a) being the sum of some
    rows a (default: rows_sum(x); in the train step parallel.ordered_batch_sum, the same bits on any
    process layout)."""
    sum_rows = sum_rows or _plain_sum
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    if kind == "none":
        return x, stats
    if kind == "layernorm":
        return layer_norm_no_params(x, eps), stats
    flat = x.reshape(-1, x.shape[-1])
    if kind == "standardize":
        if update:
            m = jnp.asarray(momentum, jnp.float32)
            batch_mean = sum_rows(flat) / flat.shape[0]
            batch_std = jnp.sqrt(sum_rows(jnp.square(flat - batch_mean)) / max(flat.shape[0] - 1, 1)) + eps
            stats = {
                "mean": (1 - m) * stats["mean"] + m * batch_mean,
                "std": (1 - m) * stats["std"] + m * batch_std,
            }
        return (x - stats["mean"]) / (stats["std"] + eps), stats
    if kind == "phi_s":
        if update:
            stats = jax.lax.cond(
                stats["steps"] < phi_s_steps,
                lambda s: phi_s_update(s, flat, sum_rows),
                lambda s: dict(s),
                stats,
            )
        return apply_phi_s(x, stats), stats
    raise ValueError(f"normalization must be one of {', '.join(KINDS)}, got {kind!r}")


def apply_phi_s(x, stats: dict):
    return jnp.einsum("...d,ed->...e", x - stats["mean"], stats["transform"], precision=HIGHEST)


def _plain_sum(x, rows_sum=lambda a: a.sum(0)):
    return rows_sum(x)


def _outer_sum(a):
    return jnp.einsum("md,me->de", a, a, precision=HIGHEST)


def phi_s_update(stats: dict, flat, sum_rows=None) -> dict:
    """Pools a batch [M, D] into (count, mean, m2) and recomputes the transform from the pooled estimate."""
    sum_rows = sum_rows or _plain_sum
    n_b = jnp.asarray(flat.shape[0], jnp.float32)
    mean_b = sum_rows(flat) / flat.shape[0]
    m2_b = sum_rows(flat - mean_b, _outer_sum)
    n = stats["count"]
    total = n + n_b
    delta = mean_b - stats["mean"]
    mean = stats["mean"] + delta * (n_b / total)
    m2 = stats["m2"] + m2_b + jnp.outer(delta, delta) * (n * n_b / total)
    transform, scale = phi_s_transform(m2 / jnp.maximum(total - 1.0, 1.0))
    return {"steps": stats["steps"] + 1, "count": total, "mean": mean, "m2": m2,
            "transform": transform, "scale": scale}  # fmt: skip


def phi_s_transform(cov) -> tuple[jax.Array, jax.Array]:
    """(s H U^T, s) for a covariance [D, D]: eigenvalues clipped at 0 (RADIO's examples/common/phi_s.py),
    each eigenvector's sign fixed (its largest-magnitude entry positive) so the transform does not
    depend on the eigen-solver's sign choice (CPU and GPU agree; a resume on another platform too)."""
    dim = cov.shape[0]
    cov = 0.5 * (cov + cov.T)
    eigenvalues, u = jnp.linalg.eigh(cov)
    eigenvalues = jnp.maximum(eigenvalues, 0.0)
    pivot = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None], axis=0)
    u = u * jnp.where(pivot < 0, -1.0, 1.0)
    scale = jax.lax.rsqrt(jnp.maximum(eigenvalues.mean(), 1e-12))
    h = hadamard_lib.hadamard(dim, jnp)
    return scale * jnp.matmul(h, u.T, precision=HIGHEST), scale


def denormalize(kind: str, y, stats: dict, eps: float = 1e-6):
    """The inverse of `normalize` (with frozen stats): normalized features -> the teacher's own."""
    if kind == "none":
        return y
    if kind == "standardize":
        return y * (stats["std"] + eps) + stats["mean"]
    if kind == "phi_s":  # transform = s H U^T, so its inverse is transform^T / s^2
        inverse = stats["transform"] / jnp.square(stats["scale"])
        return jnp.einsum("...e,ed->...d", y, inverse, precision=HIGHEST) + stats["mean"]
    raise ValueError(f"{kind!r} normalization has no inverse (layernorm drops each token's mean and scale)")


def fold_into_linear(kind: str, stats: dict, kernel, bias, eps: float = 1e-6):
    """(kernel [H, D], bias [D]) of a head's last Linear that predicts normalized targets -> the Linear
    that predicts the teacher's own features: denormalize(y @ kernel + bias) as one Linear."""
    if kind == "none":
        return kernel, bias
    if kind == "standardize":
        std = stats["std"] + eps
        return kernel * std, bias * std + stats["mean"]
    if kind == "phi_s":
        inverse = stats["transform"] / jnp.square(stats["scale"])
        fold = lambda a: jnp.matmul(a, inverse, precision=HIGHEST)
        return fold(kernel), fold(bias) + stats["mean"]
    raise ValueError(f"{kind!r} normalization cannot be folded into a Linear (it is per token and nonlinear)")
