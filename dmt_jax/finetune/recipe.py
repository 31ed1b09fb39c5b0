"""The fine-tuning recipe's pieces (MAE/BEiT, timm): layer-wise lr decay, AdamW, label smoothing
(Mixup/CutMix: dmt_jax/mixup.py)."""

from __future__ import annotations

import flax
import jax
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
