"""Evaluation of the student on frozen features: k-NN top-1 and per-teacher alignment.

k-NN follows DINO's protocol: cosine similarity on L2-normalized CLS features, the k nearest
training features vote with weight exp(sim / T). Alignment is the mean cosine between each head's
output and its teacher's normalized targets on held-out images (same masking as in training).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dmt_jax import objective, parallel
from dmt_jax.errors import UserError


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
    def alignment(state, teacher_params, pixels):
        keep = objective.keep_indices(
            jax.random.PRNGKey(1234), pixels.shape[0], setup.num_patches, cfg.mask_ratio
        )
        if setup.targets is not None:  # agglomerative: per teacher (by name), its dense features
            return agglomerative_alignment(setup, state, teacher_params, pixels, images_of(pixels), keep)
        tokens = stack.apply(teacher_params, pixels)
        targets = objective.teacher_targets(tokens, stack.num_reg_tokens, keep, cfg.target_norm_eps)
        preds = student.apply({"params": state.params}, images_of(pixels), keep)
        return jnp.stack(objective.alignment_per_example(preds, targets, stack.widths), axis=1)

    return dict(student=student_features, teachers=teacher_features, alignment=alignment)


def agglomerative_alignment(setup, state, teacher_params, pixels, images, keep):
    """[B, K]: per image and teacher (in config.teachers order), the mean cosine between the student's
    dense head and the teacher's normalized dense targets (its statistics as trained, not updated)."""
    from dmt_jax import train
    from dmt_jax.objective import agglomerative as agg
    from dmt_jax.objective import align, losses

    cfg, specs = setup.config, setup.targets
    keep = keep if cfg.mask_ratio > 0 else None
    grid = cfg.img_size // setup.student.encoder.patch_size
    names = train.teacher_names(cfg)
    features = agg.stack_features(setup.stack, names, teacher_params, pixels)
    options = train.agglomerative_options(cfg, setup.steps)
    targets, _ = agg.make_targets(
        specs, features, state.stats, options, student_grid=(grid, grid), keep=keep, update=False
    )
    preds = setup.student.apply({"params": state.params}, images, keep)
    out = {}
    for t in specs:
        if not t.dense_dim:
            out[t.name] = jnp.full((pixels.shape[0],), jnp.nan, jnp.float32)
            continue
        dense = preds[t.name]["dense"]
        if keep is None and options.resample == "student_to_teacher":
            dense = align.resample(dense, grid, t.grid)
        out[t.name] = 1.0 - losses.cosine_distance(dense, targets[t.name]["dense"]).mean(-1)
    return jnp.stack([out[n] for n in names], axis=1)


def collect(fn, batches: Iterable[dict], mesh, *args):
    """Run fn(*args, pixels) over eval batches; returns (outputs concatenated on host, labels).

    Labels and the valid mask travel with the images as global arrays of the same sharding, so the
    rows of every output line up with them whatever the mesh's device order; every process gets
    the whole result (every process must call this).
    """
    outs, labels = [], []
    for b in batches:
        batch = parallel.global_batch({k: b[k] for k in ("image", "label", "valid")}, mesh)
        y = fn(*args, batch["image"])
        ys = list(y) if isinstance(y, list | tuple) else [y]
        host_ys, label, valid = parallel.to_host((ys, batch["label"], batch["valid"]))
        valid = np.asarray(valid, bool)
        outs.append([np.asarray(v)[valid] for v in host_ys])
        labels.append(np.asarray(label)[valid])
    if not outs:
        raise ValueError("the evaluation split is empty")
    cols = [np.concatenate(c) for c in zip(*outs, strict=True)]
    labels = np.concatenate(labels)
    if not len(labels):  # every image was dropped as unreadable: k-NN of nothing is no result
        raise UserError(
            "no image of an evaluation split could be read (all undecodable or over data.max_image_pixels): "
            "check its files"
        )
    return (cols if len(cols) > 1 else cols[0]), labels


def eval_batch_size(requested: int, device_count: int) -> int:
    """The eval batch rounded up to a multiple of the device count (every device gets whole rows)."""
    return -(-max(requested, 1) // device_count) * device_count


def knn_top1(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024):
    """Weighted k-NN (cosine) top-1 accuracy, in percent.

    The bank goes to the device once, as an argument (never a compiled-in constant), and the queries
    in chunks of one shape (the last one padded), so one program serves every chunk and call.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    bank = jnp.asarray(_unit_rows(np.asarray(train_x, np.float32)))
    bank_y = jnp.asarray(train_y, jnp.int32)
    chunk = min(chunk, len(test_x))
    correct = 0
    for i in range(0, len(test_x), chunk):
        q = np.asarray(test_x[i : i + chunk], np.float32)
        n = len(q)
        q = np.pad(q, ((0, chunk - n), (0, 0)))
        pred = np.asarray(_knn_predict(bank, bank_y, jnp.asarray(q), k, float(temperature), num_classes))
        correct += int((pred[:n] == test_y[i : i + n]).sum())
    return 100.0 * correct / len(test_x)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


@functools.partial(jax.jit, static_argnames=("k", "temperature", "num_classes"))
def _knn_predict(bank, bank_y, q, k: int, temperature: float, num_classes: int):
    q = q / jnp.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    sims, idx = jax.lax.top_k(q @ bank.T, k)
    # One-hot of the k neighbours only ([Q, k, C]), not of the whole bank ([N, C]).
    votes = (jnp.exp(sims / temperature)[:, :, None] * jax.nn.one_hot(bank_y[idx], num_classes)).sum(1)
    return votes.argmax(-1)


def linear_probe_top1(train_x, train_y, test_x, test_y, steps: int = 300, lr: float = 1e-2, wd: float = 1e-4):
    """Top-1 (percent) of a softmax classifier trained on frozen features, full batch, AdamW.

    Features are standardized with the training set's statistics (MAE's probe puts a BatchNorm
    without affine parameters before its linear layer: the same thing, once). The features are
    arguments of the compiled program, not constants in it.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = jnp.asarray((train_x - mean) / std, jnp.float32)
    params = _probe_train(x, jnp.asarray(train_y, jnp.int32), num_classes, steps, float(lr), float(wd))
    logits = jnp.asarray((test_x - mean) / std, jnp.float32) @ params["w"] + params["b"]
    return 100.0 * float((np.asarray(logits.argmax(-1)) == test_y).mean())


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "lr", "wd"))
def _probe_train(x, y, num_classes: int, steps: int, lr: float, wd: float):
    import optax

    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=wd)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params


# ---------------------------------------------------------------- feature similarity (CKA) and PCA maps


def linear_cka(x, y, weights=None) -> jax.Array:
    """Linear CKA (Kornblith et al., 2019) between two representations of the same rows, in [0, 1].

    x [N, Dx], y [N, Dy]; `weights` [N] of 0/1 leaves rows out (padding). Invariant to rotations
    and isotropic scaling of either side, so it compares what two encoders represent without any
    head in between: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc.
    """
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    w = jnp.ones(x.shape[0], jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)
    x = (x - (w @ x) / count) * w[:, None]
    y = (y - (w @ y) / count) * w[:, None]
    cross = jnp.sum(jnp.square(y.T @ x))
    return cross / jnp.maximum(jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y), 1e-30)


def make_token_fn(setup):
    """Jitted (params, teacher_params, pixels, valid, picked) -> (CKA per teacher [K], patch tokens).

    Tokens are the student encoder's on the whole image (no masking) and each teacher's final-norm
    tokens, registers dropped: CLS + patches, the tokens the heads map between. CKA is taken over
    every (image, token) row of the valid images. `picked` [n] selects the images whose patch tokens
    come back, per model (teachers, then the student), for the PCA pictures.
    """
    cfg, stack, student = setup.config, setup.stack, setup.student
    dtype = jnp.dtype(cfg.dtype)

    def without_registers(tokens, r):
        return jnp.concatenate([tokens[:, :1], tokens[:, 1 + r :]], axis=1).astype(jnp.float32)

    @jax.jit
    def tokens_and_cka(params, teacher_params, pixels, valid, picked):
        images = objective.normalize_pixels(pixels, objective.IMAGENET_MEAN, objective.IMAGENET_STD, dtype)
        s = student.encoder.apply({"params": params["encoder"]}, images)
        s = without_registers(s, student.encoder.num_reg_tokens)
        teachers = [
            without_registers(t, r)
            for t, r in zip(stack.apply(teacher_params, pixels), stack.num_reg_tokens, strict=True)
        ]
        rows = jnp.repeat(valid.astype(jnp.float32), s.shape[1])
        cka = [
            linear_cka(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), rows)
            if t.shape[1] == s.shape[1]
            else jnp.float32(jnp.nan)  # different token grids: no row-to-row match
            for t in teachers
        ]
        patches = [m[picked, 1:] for m in [*teachers, s]]
        return jnp.stack(cka), patches

    return tokens_and_cka


# ---------------------------------------------------------------- the agglomerative student, per teacher


def make_agglomerative_fns(setup):
    """Jitted functions evaluating an agglomerative student (setup.targets) against each teacher, by name.
    Every function takes the views at setup.view_size (0..255 pixels); the student sees them at its
    img_size and each teacher at its own size, as in training.

    - student(params, pixels) -> per teacher with a summary target (agg.summary_teachers order), the
      student encoder's summary token for it [B, D]: what k-NN and the probe read.
    - agreement(params, stats, teacher_params, pixels) -> [summary [B, K], dense [B, K], *teachers]:
      per image and teacher the cosine of the student's summary head with the teacher's summary target
      (NaN where the teacher has none) and the mean cosine over patches of its dense head with the
      teacher's dense targets, compared where training compares them (on the teacher's grid with
      resample 'student_to_teacher'; targets normalized as in training, with the statistics in
      `stats`); then per teacher its summary [B, S], or its mean patch token for a family without one
      (SAM): what the teachers' k-NN and probe read (one program runs the teachers for both).
    - tokens(params, stats, teacher_params, pixels, valid, picked) -> (cka [K, 2], pictures): per
      teacher the linear CKA with its dense targets of the student encoder's patch tokens, and of the
      student's adapted features (its dense head), where training compares them (on the teacher's grid
      with resample 'student_to_teacher'), over the valid images' patches (NaN for a teacher without
      dense target); and for the `picked` images, per teacher its patch tokens, then the student's
      adapted features on its grid, and last the student encoder's patch tokens.
    """
    from dmt_jax import train
    from dmt_jax.objective import agglomerative as agg
    from dmt_jax.objective import align, losses

    cfg, stack, student, specs = setup.config, setup.stack, setup.student, setup.targets
    dtype = jnp.dtype(cfg.dtype)
    names = train.teacher_names(cfg)
    grid = cfg.img_size // student.encoder.patch_size
    options = train.agglomerative_options(cfg, setup.steps)
    slots = agg.summary_teachers(specs)

    def images_of(pixels):
        pixels = train.resize_view(pixels, cfg.img_size)
        return objective.normalize_pixels(pixels, objective.IMAGENET_MEAN, objective.IMAGENET_STD, dtype)

    def encoder_tokens(params, pixels):
        tokens = student.encoder.apply({"params": params["encoder"]}, images_of(pixels))
        return tokens.astype(jnp.float32), student.encoder.num_prefix_tokens

    @jax.jit
    def student_summaries(params, pixels):
        tokens, _ = encoder_tokens(params, pixels)
        return [tokens[:, slot] for slot in range(len(slots))]

    @jax.jit
    def agreement(params, stats, teacher_params, pixels):
        features = agg.stack_features(stack, names, teacher_params, pixels)
        targets, _ = agg.make_targets(
            specs, features, stats, options, student_grid=(grid, grid), update=False
        )
        preds = student.apply({"params": params}, images_of(pixels))
        summary, dense = [], []
        for t in specs:
            p, y = preds[t.name], targets[t.name]
            nan = jnp.full((pixels.shape[0],), jnp.nan, jnp.float32)
            summary.append(1.0 - losses.cosine_distance(p["summary"], y["summary"]) if t.summary_dim else nan)
            if t.dense_dim:
                d = p["dense"]
                if options.resample == "student_to_teacher":
                    d = align.resample(d, grid, t.grid)
                dense.append(1.0 - losses.cosine_distance(d, y["dense"]).mean(-1))
            else:
                dense.append(nan)
        pooled = [
            features[t.name].summary if t.summary_dim else features[t.name].patches.mean(1) for t in specs
        ]
        return [
            jnp.stack(summary, axis=1),
            jnp.stack(dense, axis=1),
            *(p.astype(jnp.float32) for p in pooled),
        ]

    @jax.jit
    def tokens_and_cka(params, stats, teacher_params, pixels, valid, picked):
        features = agg.stack_features(stack, names, teacher_params, pixels)
        targets, _ = agg.make_targets(
            specs, features, stats, options, student_grid=(grid, grid), update=False
        )
        tokens, prefix = encoder_tokens(params, pixels)
        patches = tokens[:, prefix:]
        preds = student.apply({"params": params}, images_of(pixels))
        on_teacher_grid = options.resample == "student_to_teacher"
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        cka, columns = [], []
        for t in specs:
            columns.append(features[t.name].patches[picked].astype(jnp.float32))
            if not t.dense_dim:
                cka.append(jnp.full((2,), jnp.nan, jnp.float32))
                continue
            theirs = targets[t.name]["dense"]
            rows = jnp.repeat(valid.astype(jnp.float32), theirs.shape[1])
            mine = align.resample(patches, grid, t.grid) if on_teacher_grid else patches
            adapted = preds[t.name]["dense"].astype(jnp.float32)
            adapted = align.resample(adapted, grid, t.grid) if on_teacher_grid else adapted
            cka.append(jnp.stack([linear_cka(flat(mine), flat(theirs), rows),
                                  linear_cka(flat(adapted), flat(theirs), rows)]))  # fmt: skip
            columns.append(align.resample(preds[t.name]["dense"], grid, t.grid)[picked].astype(jnp.float32))
        return jnp.stack(cka), [*columns, patches[picked]]

    return dict(student=student_summaries, agreement=agreement, tokens=tokens_and_cka, summary_names=slots)
