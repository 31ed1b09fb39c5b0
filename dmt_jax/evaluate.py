"""Evaluation on frozen features: k-NN and linear-probe top-1, per-teacher alignment, CKA.

Features stay where they are computed: a Bank holds one split's features sharded over the mesh's
batch axes (devices and processes), never gathered on one host or device, so an ImageNet-sized bank
(1.28M x 768) costs each of 8 devices an eighth of it (bench/RESULTS.md has the programs' memory).
k-NN follows DINO's protocol: cosine similarity on L2-normalized CLS features, the k nearest bank
features vote with weight exp(sim / T); each device finds the top k of its own rows and the
candidates are merged. The linear probe is a softmax classifier trained with minibatch AdamW, data
parallel over the bank's shards. Alignment is the mean cosine between each head's output and its
teacher's normalized targets on held-out images (same masking as in training).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dmt_jax import objective, parallel
from dmt_jax.errors import UserError
from dmt_jax.progress import Progress


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
    features = agg.stack_features(setup.stack, names, teacher_params, pixels, px=cfg.img_size)
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

    For small outputs only (predicted classes, alignment scores): every process gets the whole
    result. Features go to collect_banks, which keeps them sharded. Labels and the valid mask travel
    with the images as global arrays of the same sharding, so the rows of every output line up with
    them whatever the mesh's device order (every process must call this).
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
        raise UserError(_NOTHING_READ)
    return (cols if len(cols) > 1 else cols[0]), labels


_NOTHING_READ = (
    "no image of an evaluation split could be read (all undecodable or over data.max_image_pixels): "
    "check its files"
)


def eval_batch_size(requested: int, device_count: int) -> int:
    """The eval batch rounded up to a multiple of the device count (every device gets whole rows)."""
    return -(-max(requested, 1) // device_count) * device_count


# Work below these sizes takes seconds: it prints no progress (the demo's evaluations print none).
_MIN_IMAGES = 10_000  # a feature pass
_MIN_SIMILARITIES = 10**9  # k-NN: queries x bank rows
_MIN_ROW_EPOCHS = 10**7  # linear probe: bank rows x epochs


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(what: str, total: int, unit: str, work: int, threshold: int):
    """dmt_jax/progress.py's report (process 0 prints it) for work of at least `threshold`."""
    return Progress(what, total, unit) if work >= threshold else _Quiet()


# ---------------------------------------------------------------- feature banks, sharded over the mesh

BANK_SPEC = P(None, parallel.BATCH_AXES)  # [batches, rows, ...]: each device holds its rows of every batch


@flax.struct.dataclass
class Bank:
    """The features of one split, sharded over the mesh's batch axes and never gathered: device d
    holds its rows of every evaluation batch, as the batch arrived (no data moved to build it).

    x [batches, B, D] float32; y [batches, B] int32, -1 for padding and unreadable images. k-NN and
    the probe do not depend on the order of the rows, only on which rows there are.
    """

    x: jax.Array
    y: jax.Array

    @property
    def mesh(self):
        return self.x.sharding.mesh

    def count(self) -> int:
        return int(jnp.sum(self.y >= 0))


def bank_from_host(x: np.ndarray, y: np.ndarray, mesh, batch: int) -> Bank:
    """A Bank of host rows (one process: tests, benchmarks): batches of `batch` rows, the last padded."""
    n, batch = len(x), eval_batch_size(batch, mesh.size)
    num = -(-n // batch)
    xs = np.zeros((num * batch, x.shape[1]), np.float32)
    ys = np.full(num * batch, -1, np.int32)
    xs[:n], ys[:n] = x, y
    sharding = NamedSharding(mesh, BANK_SPEC)
    return Bank(
        *parallel.place_from_host((xs.reshape(num, batch, -1), ys.reshape(num, batch)), (sharding, sharding))
    )


def collect_banks(fn, batches, mesh, *args, what: str = "features") -> list[Bank]:
    """fn(*args, pixels) -> features [B, D] (or a list of them) over every batch of an evaluation pass
    (an EvalInput: its len() is its number of batches), kept where they were computed: one Bank per
    output. Every process must call this."""
    num_batches = len(batches)
    if not num_batches:
        raise ValueError("the evaluation split is empty")
    banks, write, progress = None, _bank_writer(mesh), None
    try:
        for i, b in enumerate(batches):
            batch = parallel.global_batch({k: b[k] for k in ("image", "label", "valid")}, mesh)
            out = fn(*args, batch["image"])
            features = list(out) if isinstance(out, list | tuple) else [out]
            if banks is None:
                banks = [_empty_bank(mesh, num_batches, f.shape) for f in features]
                images = num_batches * batch["image"].shape[0]
                progress = _progress(what, images, "img", work=images, threshold=_MIN_IMAGES)
            banks = write(banks, jnp.int32(i), features, batch["label"], batch["valid"])
            progress.update(batch["image"].shape[0])
    finally:
        if progress is not None:
            progress.close()
    if banks[0].count() == 0:  # every image was dropped as unreadable: k-NN of nothing is no result
        raise UserError(_NOTHING_READ)
    return banks


def _empty_bank(mesh, num_batches: int, row_shape) -> Bank:
    """A bank of zeros made where it lives (each device its shard; never on a host)."""
    return _zeros_program(mesh, (num_batches, *row_shape))()


@functools.cache
def _zeros_program(mesh, shape: tuple[int, ...]):
    sharding = NamedSharding(mesh, BANK_SPEC)
    return jax.jit(
        lambda: Bank(jnp.zeros(shape, jnp.float32), jnp.full(shape[:2], -1, jnp.int32)),
        out_shardings=Bank(sharding, sharding),
    )


@functools.cache
def _bank_writer(mesh):
    """(banks, i, features, labels, valid) -> banks with batch i written in place, on each device its
    own rows (the banks are donated: no second copy)."""
    row = P(parallel.BATCH_AXES)

    def write(banks, i, features, labels, valid):
        y = jnp.where(valid, labels, -1)[None]
        return [
            Bank(
                jax.lax.dynamic_update_slice_in_dim(b.x, f.astype(b.x.dtype)[None], i, 0),
                jax.lax.dynamic_update_slice_in_dim(b.y, y, i, 0),
            )
            for b, f in zip(banks, features, strict=True)
        ]

    local = jax.shard_map(write, mesh=mesh, in_specs=(BANK_SPEC, P(), row, row, row), out_specs=BANK_SPEC)
    return jax.jit(local, donate_argnums=(0,))


def num_classes_of(*banks: Bank) -> int:
    return int(max(jnp.max(b.y) for b in banks)) + 1


# ---------------------------------------------------------------- k-NN: top-k per shard, then merged


def knn_top1(
    bank: Bank,
    queries: Bank,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int = 0,
    what: str = "k-NN",
):
    """Weighted k-NN (cosine) top-1 accuracy of `queries` against `bank`, in percent (DINO's protocol).

    Each query batch is gathered (B rows: small); every device takes the top k of its own bank rows,
    and the k x devices candidates are merged into the global top k: the same neighbours as one top k
    over the whole bank, which is never gathered. One compiled program serves every query batch.
    """
    num_classes = num_classes or num_classes_of(bank, queries)
    k = min(k, bank.x.shape[0] * bank.x.shape[1])
    program = _knn_program(bank.mesh, k, float(temperature), num_classes)
    correct = 0
    batches, rows = queries.x.shape[:2]
    similarities = batches * rows * bank.x.shape[0] * bank.x.shape[1]
    with _progress(what, batches * rows, "queries", similarities, _MIN_SIMILARITIES) as progress:
        for i in range(batches):
            correct += int(program(bank, queries, jnp.int32(i)))
            progress.update(rows)
    return 100.0 * correct / queries.count()


def _query_chunk(rows: int, limit: int = 512) -> int:
    """The largest divisor of `rows` not above `limit`: queries scored at once (bounds [chunk, bank rows])."""
    return max(c for c in range(1, min(rows, limit) + 1) if rows % c == 0)


@functools.cache
def _knn_program(mesh, k: int, temperature: float, num_classes: int):
    axes = parallel.BATCH_AXES

    def local(bank, queries, i):
        x = bank.x.reshape(-1, bank.x.shape[-1])  # this device's rows
        y = bank.y.reshape(-1)
        inverse_norm = jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=1), 1e-24))  # no normalized copy
        q = jax.lax.all_gather(queries.x[i], axes, tiled=True)  # [B, D]: the batch's queries, everywhere
        q_y = jax.lax.all_gather(queries.y[i], axes, tiled=True)
        chunk = _query_chunk(q.shape[0])
        local_k = min(k, x.shape[0])

        def score(q):
            q = q / jnp.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
            sims = (q @ x.T) * inverse_norm[None]
            sims = jnp.where(y[None] >= 0, sims, -jnp.inf)  # padding rows are nobody's neighbour
            sims, idx = jax.lax.top_k(sims, local_k)
            # Merge: every device's candidates, then the top k of them.
            sims = jax.lax.all_gather(sims, axes, axis=1, tiled=True)
            labels = jax.lax.all_gather(y[idx], axes, axis=1, tiled=True)
            sims, j = jax.lax.top_k(sims, k)
            labels = jnp.take_along_axis(labels, j, axis=1)
            weights = jnp.where(jnp.isfinite(sims), jnp.exp(sims / temperature), 0.0)
            # One-hot of the k neighbours only ([Q, k, C]), not of the whole bank ([N, C]).
            votes = (weights[:, :, None] * jax.nn.one_hot(labels, num_classes)).sum(1)
            return votes.argmax(-1)

        pred = jax.lax.map(score, q.reshape(-1, chunk, q.shape[-1])).reshape(-1)
        return jnp.sum((pred == q_y) & (q_y >= 0))

    bank_specs = Bank(BANK_SPEC, BANK_SPEC)
    program = jax.shard_map(
        local, mesh=mesh, in_specs=(bank_specs, bank_specs, P()), out_specs=P(), check_vma=False
    )
    return jax.jit(program)


# ---------------------------------------------------------------- linear probe: minibatch AdamW


def linear_probe_top1(
    bank: Bank,
    queries: Bank,
    epochs: int = 150,
    batch_size: int = 256,
    lr: float = 1e-2,
    wd: float = 1e-4,
    num_classes: int = 0,
    seed: int = 0,
    what: str = "linear probe",
):
    """Top-1 (percent) of a softmax classifier trained on frozen features: AdamW, cosine lr, `epochs`
    passes over the bank in minibatches of `batch_size` rows (all devices together; at most the bank).

    Features are standardized with the bank's statistics (MAE's probe puts a BatchNorm without
    affine parameters before its linear layer: the same thing, once). Data parallel: each device
    draws its minibatch rows from its own bank rows (a fresh permutation each epoch) and the
    gradients are summed over devices, so no feature leaves its device; the classifier is replicated.
    """
    num_classes = num_classes or num_classes_of(bank, queries)
    mesh, devices = bank.mesh, bank.mesh.size
    local_rows = bank.x.shape[0] * bank.x.shape[1] // devices
    local_batch = max(1, min(-(-batch_size // devices), local_rows))
    steps_per_epoch = -(-local_rows // local_batch)
    stats = _stats_program(mesh)(bank)
    optimizer = _probe_optimizer(float(lr), float(wd), epochs * steps_per_epoch)
    dim = bank.x.shape[-1]
    params = {"w": jnp.zeros((dim, num_classes)), "b": jnp.zeros((num_classes,))}
    opt_state = optimizer.init(params)
    epoch_program = _probe_epoch_program(mesh, float(lr), float(wd), epochs * steps_per_epoch, local_batch)
    key = jax.random.PRNGKey(seed)
    row_epochs = epochs * local_rows * devices
    with _progress(what, epochs, "epochs", row_epochs, _MIN_ROW_EPOCHS) as progress:
        for epoch in range(epochs):
            params, opt_state = epoch_program(params, opt_state, bank, stats, jax.random.fold_in(key, epoch))
            jax.block_until_ready(params)
            progress.update(1)
    correct = _probe_eval_program(mesh)(params, queries, stats)
    return 100.0 * int(correct) / queries.count()


def _weighted_sum(value, weight):
    return jax.lax.psum(jnp.sum(value * weight), parallel.BATCH_AXES)


@functools.cache
def _stats_program(mesh):
    """The bank's per-feature mean and standard deviation (valid rows; numpy's std, ddof 0). Summed one
    evaluation batch at a time: no temporary the size of the bank."""
    axes = parallel.BATCH_AXES

    def local(bank):
        w = (bank.y >= 0).astype(jnp.float32)  # [batches, rows]

        def weighted_sum(f):
            def add(total, batch):
                x, weight = batch
                return total + weight @ f(x), None

            total, _ = jax.lax.scan(add, jnp.zeros(bank.x.shape[-1]), (bank.x, w))
            return jax.lax.psum(total, axes)

        count = jax.lax.psum(jnp.sum(w), axes)
        mean = weighted_sum(lambda x: x) / count
        var = weighted_sum(lambda x: jnp.square(x - mean)) / count
        return {"mean": mean, "std": jnp.sqrt(var) + 1e-6}

    spec = Bank(BANK_SPEC, BANK_SPEC)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=P(), check_vma=False))


def _probe_optimizer(lr: float, wd: float, total_steps: int):
    return optax.adamw(optax.cosine_decay_schedule(lr, total_steps), weight_decay=wd)


@functools.cache
def _probe_epoch_program(mesh, lr: float, wd: float, total_steps: int, local_batch: int):
    axes = parallel.BATCH_AXES
    optimizer = _probe_optimizer(lr, wd, total_steps)

    def local(params, opt_state, bank, stats, key):
        x = bank.x.reshape(-1, bank.x.shape[-1])
        y = bank.y.reshape(-1)
        order = jax.random.permutation(jax.random.fold_in(key, jax.lax.axis_index(axes)), x.shape[0])
        steps = -(-x.shape[0] // local_batch)
        # The last step of an epoch tops its rows up from the start of the permutation.
        order = jnp.concatenate([order, order])[: steps * local_batch].reshape(steps, local_batch)

        def loss_fn(p, rows):
            features = (x[rows] - stats["mean"]) / stats["std"]
            labels = y[rows]
            weight = (labels >= 0).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(
                features @ p["w"] + p["b"], jnp.maximum(labels, 0)
            )
            return _weighted_sum(ce, weight) / jnp.maximum(_weighted_sum(1.0, weight), 1.0)

        def step(carry, rows):
            p, s = carry
            grads = jax.lax.psum(jax.grad(loss_fn)(p, rows), axes)  # each device's share of the mean
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state

    spec = Bank(BANK_SPEC, BANK_SPEC)
    program = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), spec, P(), P()), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(program, donate_argnums=(0, 1))


@functools.cache
def _probe_eval_program(mesh):
    def local(params, queries, stats):
        x = (queries.x.reshape(-1, queries.x.shape[-1]) - stats["mean"]) / stats["std"]
        y = queries.y.reshape(-1)
        pred = (x @ params["w"] + params["b"]).argmax(-1)
        return jax.lax.psum(jnp.sum((pred == y) & (y >= 0)), parallel.BATCH_AXES)

    spec = Bank(BANK_SPEC, BANK_SPEC)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, P()), out_specs=P(), check_vma=False))


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
    - agreement(params, stats, teacher_params, pixels) -> [summary [B, K], dense [B, K]]: per image and
      teacher the cosine of the student's summary head with the teacher's summary target (NaN where
      the teacher has none) and the mean cosine over patches of its dense head with the teacher's dense
      targets, compared where training compares them (on the teacher's grid with resample
      'student_to_teacher'; targets normalized as in training, with the statistics in `stats`).
    - teachers(teacher_params, pixels) -> per teacher its summary [B, S], or its mean patch token for a
      family without one (SAM): what the teachers' k-NN and probe read.
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
        return [jnp.stack(summary, axis=1), jnp.stack(dense, axis=1)]

    @jax.jit
    def teacher_summaries(teacher_params, pixels):
        features = agg.stack_features(stack, names, teacher_params, pixels)
        pooled = [f.summary if t.summary_dim else f.patches.mean(1) for t in specs if (f := features[t.name])]
        return [p.astype(jnp.float32) for p in pooled]

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

    return dict(
        student=student_summaries,
        agreement=agreement,
        teachers=teacher_summaries,
        tokens=tokens_and_cka,
        summary_names=slots,
    )
