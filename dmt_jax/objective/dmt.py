"""The DMT objective (METHOD.md 3-7), the default: masking, teacher targets, student heads, per-teacher
loss."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmt_jax.models.vit import ViT, dense_init

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    return max(1, int(num_patches * (1.0 - mask_ratio)))  # MAE's rounding


def keep_indices(rng, batch: int, num_patches: int, mask_ratio: float) -> jax.Array:
    """Per-image random subset of patch indices to encode, [batch, num_visible] int32."""
    n_keep = num_visible(num_patches, mask_ratio)
    if n_keep == num_patches:
        return jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), (batch, num_patches))
    noise = jax.random.uniform(rng, (batch, num_patches))
    return jnp.argsort(noise, axis=1)[:, :n_keep].astype(jnp.int32)


def normalize_pixels(pixels, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32):
    """uint8 (or float 0..255) NHWC pixels -> normalized images, done on device inside the step."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return ((pixels.astype(jnp.float32) - mean) / std).astype(dtype)


def layer_norm_no_params(x, eps: float):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def teacher_targets(tokens: Sequence[jax.Array], num_reg: Sequence[int], keep, eps: float) -> jax.Array:
    """Final-norm tokens of each teacher -> CLS + visible patches, normalized, concatenated on channels.

    tokens[k]: [B, 1 + R_k + N, D_k] (checkpoint order); registers are dropped. Returns float32
    [B, 1 + n_visible, sum D_k], under stop_gradient.
    """
    out = []
    for t, r in zip(tokens, num_reg, strict=True):
        patches = t[:, 1 + r :]
        if keep is not None:
            patches = jnp.take_along_axis(patches, keep[:, :, None], axis=1)
        out.append(layer_norm_no_params(jnp.concatenate([t[:, :1], patches], axis=1), eps))
    return jax.lax.stop_gradient(jnp.concatenate(out, axis=-1))


class Heads(nn.Module):
    """One head per teacher on the student's tokens; outputs concatenated in teacher order."""

    widths: tuple[int, ...]
    kind: str = "ln_linear"
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init)
        outs = []
        for k, width in enumerate(self.widths):
            y = x
            if self.kind in ("ln_linear", "mlp"):
                y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"head_{k}_norm")(y)
            if self.kind == "mlp":
                y = nn.gelu(
                    dense(int(x.shape[-1] * self.mlp_ratio), name=f"head_{k}_fc1")(y), approximate=False
                )
            elif self.kind not in ("linear", "ln_linear"):
                raise ValueError(f"head must be 'linear', 'ln_linear' or 'mlp', got {self.kind!r}")
            outs.append(dense(width, name=f"head_{k}_out")(y))
        return jnp.concatenate(outs, axis=-1)


class Student(nn.Module):
    """ViT encoder on CLS + visible patches, then the per-teacher heads: [B, 1 + n, sum D_k]."""

    encoder: ViT
    heads: Heads

    def __call__(self, images, keep, train: bool = False):
        tokens = self.encoder(images, keep, train=train)
        r = self.encoder.num_reg_tokens
        tokens = jnp.concatenate([tokens[:, :1], tokens[:, 1 + r :]], axis=1) if r else tokens
        return self.heads(tokens)


def per_token_loss(pred, target, kind: str, beta: float):
    """[B, T, D] x [B, T, D] -> [B, T], averaged over channels (float32)."""
    pred = pred.astype(jnp.float32)
    if kind == "smooth_l1":
        diff = jnp.abs(pred - target)
        return jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).mean(-1)
    if kind == "mse":
        return jnp.square(pred - target).mean(-1)
    if kind == "cosine":
        cos = (pred * target).sum(-1) / (
            jnp.maximum(jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1), 1e-8)
        )
        return 1.0 - cos
    raise ValueError(f"loss must be 'smooth_l1', 'mse' or 'cosine', got {kind!r}")


def distill_loss(preds, targets, widths, weights, *, kind="smooth_l1", beta=1.0, cls_weight=-1.0):
    """Weighted sum over teachers of the token-averaged loss; returns (total, [loss per teacher])."""
    per_teacher, start = [], 0
    for width in widths:
        sl = slice(start, start + width)
        tok = per_token_loss(preds[..., sl], targets[..., sl], kind, beta)
        if cls_weight < 0:
            per_teacher.append(tok.mean())
        else:
            per_teacher.append(cls_weight * tok[:, 0].mean() + (1.0 - cls_weight) * tok[:, 1:].mean())
        start += width
    total = sum(w * loss for w, loss in zip(weights, per_teacher, strict=True))
    return total, per_teacher


def alignment_per_example(preds, targets, widths):
    """Per teacher, each example's mean cosine between head outputs and targets over tokens: [B] each."""
    out, start = [], 0
    for width in widths:
        sl = slice(start, start + width)
        out.append(1.0 - per_token_loss(preds[..., sl], targets[..., sl], "cosine", 1.0).mean(-1))
        start += width
    return out


def teacher_weights(configured: Sequence[float], k: int) -> tuple[float, ...]:
    if not configured:
        return (1.0 / k,) * k
    if len(configured) != k:
        raise ValueError(
            f"teacher_weights has {len(configured)} entries for {k} teachers: give one per teacher"
        )
    total = float(sum(configured))
    return tuple(float(w) / total for w in configured)
