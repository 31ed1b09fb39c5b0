"""Mixup / CutMix inside the fine-tuning step, within each device's shard of the batch.

timm's Mixup in 'batch' mode (one lambda and one kind per batch; every example mixed with the batch's
mirror image, `x.flip(0)`), applied as MAE applies it: each GPU mixes its own batch with its own draw.
Here each device's shard of the global batch is that batch: it is paired with its own mirror image
and draws its own lambda, box and kind (the step's key folded with the shard's index), so the
compiled step holds no collective for mixing. Flipping the global batch instead sends every
device's images to the mirror device (a collective-permute of the whole batch each step, across
hosts on a pod). Images stay uint8 until the mix (the flipped copy and the CutMix paste are uint8).

Which examples are paired therefore depends on the number of batch shards (as in MAE, on the number
of GPUs); a device holding one example mixes it with itself (lambda then changes nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dmt_jax import parallel


def sample_mix(rng, config, height: int, width: int):
    """timm Mixup in 'batch' mode: (lam, box (top, bottom, left, right), use_cutmix) for one batch;
    lam is already corrected to the box's area under CutMix (timm's correct_lam)."""
    r_switch, r_lam, r_apply, r_y, r_x = jax.random.split(rng, 5)
    both = config.mixup_alpha > 0 and config.cutmix_alpha > 0
    switch = jax.random.uniform(r_switch) < config.mixup_switch_prob
    use_cutmix = switch if both else jnp.asarray(config.cutmix_alpha > 0)
    lam_mixup = jax.random.beta(r_lam, max(config.mixup_alpha, 1e-6), max(config.mixup_alpha, 1e-6))
    lam_cutmix = jax.random.beta(r_lam, max(config.cutmix_alpha, 1e-6), max(config.cutmix_alpha, 1e-6))
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    lam = jnp.where(jax.random.uniform(r_apply) < config.mixup_prob, lam, 1.0)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
    cy, cx = jax.random.randint(r_y, (), 0, height), jax.random.randint(r_x, (), 0, width)
    box = (
        jnp.clip(cy - cut_h // 2, 0, height),
        jnp.clip(cy + cut_h // 2, 0, height),
        jnp.clip(cx - cut_w // 2, 0, width),
        jnp.clip(cx + cut_w // 2, 0, width),
    )
    area = (box[1] - box[0]) * (box[3] - box[2])
    lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam)
    return lam, box, use_cutmix


def mix_batch(pixels, targets, lam, box, use_cutmix):
    """Each example mixed with the batch's mirror image (timm: x.flip(0)); CutMix pastes the box.
    pixels: uint8 (or float) [B, H, W, C] -> float32; targets [B, classes] (already smoothed)."""
    flipped = pixels[::-1]
    rows = jnp.arange(pixels.shape[1])[:, None]
    cols = jnp.arange(pixels.shape[2])[None, :]
    inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
    cut = jnp.where(inside[None, :, :, None], flipped, pixels).astype(jnp.float32)
    blend = lam * pixels.astype(jnp.float32) + (1.0 - lam) * flipped.astype(jnp.float32)
    return jnp.where(use_cutmix, cut, blend), lam * targets + (1.0 - lam) * targets[::-1]


def mix_per_shard(rng, config, pixels, targets, mesh):
    """mix_batch on each device's shard of a batch sharded over parallel.BATCH_AXES, each shard with
    its own sample_mix draw from fold_in(rng, shard index); no data leaves its device."""
    batch = P(parallel.BATCH_AXES)

    def local(rng, pixels, targets):
        shard = jax.lax.axis_index(parallel.BATCH_AXES)
        lam, box, use_cutmix = sample_mix(jax.random.fold_in(rng, shard), config, *pixels.shape[1:3])
        return mix_batch(pixels, targets, lam, box, use_cutmix)

    mixed = jax.shard_map(local, mesh=mesh, in_specs=(P(), batch, batch), out_specs=(batch, batch))
    return mixed(rng, pixels, targets)
