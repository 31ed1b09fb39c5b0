"""Evaluation of the student on frozen features: k-NN top-1 and per-teacher alignment.

k-NN follows DINO's protocol: cosine similarity on L2-normalized CLS features, the k nearest
training features vote with weight exp(sim / T). Alignment is the mean cosine between each head's
output and its teacher's normalized targets on held-out images (same masking as in training).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dmt_jax import objective, parallel


def make_eval_fns(setup):
    """Jitted feature and alignment functions for a train Setup."""
    cfg, stack, student = setup.config, setup.stack, setup.student
    dtype = jnp.dtype(cfg.dtype)

    def images_of(pixels):
        return objective.normalize_pixels(pixels, objective.IMAGENET_MEAN, objective.IMAGENET_STD, dtype)

    @jax.jit
    def student_features(params, pixels):
        tokens = student.encoder.apply({"params": params["encoder"]}, images_of(pixels))
        return tokens[:, 0].astype(jnp.float32)

    @jax.jit
    def teacher_features(teacher_params, pixels):
        return [t[:, 0].astype(jnp.float32) for t in stack.apply(teacher_params, pixels)]

    @jax.jit
    def alignment(params, teacher_params, pixels):
        keep = objective.keep_indices(
            jax.random.PRNGKey(1234), pixels.shape[0], setup.num_patches, cfg.mask_ratio
        )
        tokens = stack.apply(teacher_params, pixels)
        targets = objective.teacher_targets(tokens, stack.num_reg_tokens, keep, cfg.target_norm_eps)
        preds = student.apply({"params": params}, images_of(pixels), keep)
        return jnp.stack(objective.alignment_per_example(preds, targets, stack.widths), axis=1)

    return dict(student=student_features, teachers=teacher_features, alignment=alignment)


def collect(fn, batches: Iterable[dict], mesh, *args):
    """Run fn(*args, pixels) over eval batches; returns (outputs concatenated on host, labels)."""
    outs, labels = [], []
    for b in batches:
        pixels = parallel.global_batch({"image": b["image"]}, mesh)["image"]
        valid = np.asarray(_gather(b["valid"]))
        y = fn(*args, pixels)
        ys = y if isinstance(y, list | tuple) else [y]
        outs.append([np.asarray(jax.device_get(_fully(v)))[valid] for v in ys])
        labels.append(np.asarray(_gather(b["label"]))[valid])
    if not outs:
        raise ValueError("the evaluation split is empty")
    cols = [np.concatenate(c) for c in zip(*outs, strict=True)]
    return (cols if len(cols) > 1 else cols[0]), np.concatenate(labels)


def _gather(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).reshape((-1,) + x.shape[1:])


def _fully(x: jax.Array):
    if jax.process_count() == 1 or x.is_fully_addressable:
        return x
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def knn_top1(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024):
    """Weighted k-NN (cosine) top-1 accuracy, in percent."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    train = jnp.asarray(train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-12))
    train_onehot = jax.nn.one_hot(jnp.asarray(train_y), num_classes)

    @jax.jit
    def predict(q):
        q = q / jnp.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        sims, idx = jax.lax.top_k(q @ train.T, k)
        votes = (jnp.exp(sims / temperature)[:, :, None] * train_onehot[idx]).sum(1)
        return votes.argmax(-1)

    correct = 0
    for i in range(0, len(test_x), chunk):
        correct += int(
            (np.asarray(predict(jnp.asarray(test_x[i : i + chunk]))) == test_y[i : i + chunk]).sum()
        )
    return 100.0 * correct / len(test_x)


def linear_probe_top1(train_x, train_y, test_x, test_y, steps: int = 300, lr: float = 1e-2, wd: float = 1e-4):
    """Top-1 (percent) of a softmax classifier trained on frozen features, full batch, AdamW.

    Features are standardized with the training set's statistics (MAE's probe puts a BatchNorm
    without affine parameters before its linear layer: the same thing, once).
    """
    import optax

    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = jnp.asarray((train_x - mean) / std)
    y = jnp.asarray(train_y)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=wd)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return params

    params = train(params)
    logits = jnp.asarray((test_x - mean) / std) @ params["w"] + params["b"]
    return 100.0 * float((np.asarray(logits.argmax(-1)) == test_y).mean())
