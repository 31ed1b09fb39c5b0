"""The fine-tuning recipe's pieces (MAE/BEiT, timm): layer-wise lr decay, AdamW, label smoothing,
Mixup/CutMix."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

from dmt_jax import train


def layer_id(path: tuple[str, ...], depth: int) -> int:
    """timm/BEiT layer ids: embeddings 0, block i -> i + 1, everything after the blocks depth + 1."""
    if path[0] == "encoder" and path[1] in ("cls_token", "reg_token", "pos_embed", "patch_embed"):
        return 0
    if path[0] == "encoder" and path[1].startswith("blocks_"):
        return int(path[1].removeprefix("blocks_")) + 1
    return depth + 1


def layer_lr_scales(params, depth: int, decay: float):
    """The lr multiplier of every parameter: decay^(depth + 1 - layer_id) (1 for the head)."""
    flat = flax.traverse_util.flatten_dict(params)
    scales = {k: float(decay ** (depth + 1 - layer_id(k, depth))) for k in flat}
    return flax.traverse_util.unflatten_dict(scales)


def make_optimizer(config, params, depth: int, steps: int, steps_per_epoch: float):
    """AdamW whose lr (and so its decoupled weight decay) is scaled per parameter by layer_lr_scales,
    as timm's layer-decay parameter groups do; the distillation's schedule and decay mask."""
    schedule = train.lr_schedule(config, steps, steps_per_epoch)
    scales = layer_lr_scales(params, depth, config.layer_decay)
    scale_per_layer = optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda updates, state, _=None: (jax.tree.map(lambda u, s: u * s, updates, scales), state),
    )
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts += [
        optax.scale_by_adam(config.b1, config.b2, eps=1e-8),
        optax.add_decayed_weights(config.weight_decay, train.decay_mask),
        optax.scale_by_learning_rate(schedule),
        scale_per_layer,
    ]
    return optax.chain(*parts), schedule


def smooth_one_hot(labels, num_classes: int, smoothing: float):
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes


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
    """Each example mixed with the batch's mirror image (timm: x.flip(0)); CutMix pastes the box."""
    flipped = pixels[::-1]
    rows = jnp.arange(pixels.shape[1])[:, None]
    cols = jnp.arange(pixels.shape[2])[None, :]
    inside = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
    cut = jnp.where(inside[None, :, :, None], flipped, pixels)
    blend = lam * pixels + (1.0 - lam) * flipped
    return jnp.where(use_cutmix, cut, blend), lam * targets + (1.0 - lam) * targets[::-1]
