"""Small teachers for the demo, trained in process from a fixed seed (no downloads).

A teacher with random weights knows nothing the student does not: its features sort the demo's
images by colour, not by pattern. So each demo teacher is a tiny ViT trained for a thousand small
steps to classify the demo's training images (labels stand in for the self-supervision of the real
teachers; the student never sees a label). Trained teachers are cached as converted-teacher
directories beside the demo dataset, so later runs load them.

Teacher entry: 'demo:VARIANT@PX:SEED', e.g. 'demo:mu/8@64:3' (a /8 ViT fed 64 px).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmt_jax import objective
from dmt_jax.models.vit import ViT
from dmt_jax.progress import Progress
from dmt_jax.teachers import Teacher, load_teacher, make_random_teacher, save_teacher

# Small batches: on a CPU a ViT this small costs 0.9 ms of CPU per image at batch 16 against 1.35
# at batch 64 (activations that fit the cache), and more updates help on 640 images. 1000 steps of
# 16 reach k-NN 50-65% (500 steps of 64, at twice the CPU time, reached 62-73%).
STEPS, BATCH, LR = 1000, 16, 3e-3
LOSS_EVERY = 50  # steps between readings of the loss for the progress report


class _Classifier(nn.Module):
    encoder: ViT
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool = False):
        tokens = self.encoder(images, train=train)
        return nn.Dense(self.num_classes, name="head")(tokens[:, 0])


def demo_teacher(variant: str, img_size: int, seed: int, data_config, student_img_size: int) -> Teacher:
    """The trained demo teacher for this entry, from the cache or trained now (about 20 s on 2 cores)."""
    from dmt_jax import data  # TensorFlow: only the demo path needs it here

    name = f"{variant.replace('/', '_')}_{img_size}px_seed{seed}_steps{STEPS}_batch{BATCH}_lr{LR:g}"
    cache = data.demo_dataset_root(data_config) / "teachers" / name
    if (cache / "spec.json").exists():
        cached = load_teacher(cache)  # caches written before teachers were named 'demo' say 'mae'
        return Teacher(dataclasses.replace(cached.spec, format="demo"), cached.params)
    print(
        f"training demo teacher {variant} at {img_size}px (seed {seed}); cached in {cache} for later runs",
        flush=True,
    )
    start = make_random_teacher(variant, img_size, seed, fmt="demo")
    source = data.make_source(data_config, "train")
    model = _Classifier(start.spec.model(), source.num_classes)
    # The encoder comes initialized; only the linear head is new (model.init would re-initialize
    # the whole ViT op by op: seconds of CPU for nothing).
    kernel = nn.initializers.lecun_normal()(jax.random.PRNGKey(seed), (start.spec.width, source.num_classes))
    params = {"encoder": start.params, "head": {"kernel": kernel, "bias": jnp.zeros(source.num_classes)}}
    step, tx = _train_step(model, img_size, start.spec.mean, start.spec.std, STEPS, LR)
    opt_state = tx.init(params)
    stream = data.make_train_input(
        data_config, source, global_batch=BATCH, img_size=student_img_size, seed=seed
    )
    with Progress(f"demo teacher {variant}@{img_size} seed {seed}", total=STEPS, unit="steps") as progress:
        for i, batch in zip(range(1, STEPS + 1), stream, strict=False):
            params, opt_state, loss = step(params, opt_state, batch["image"], source.labels[batch["id"]])
            # The loss only now and then: reading it waits for the step (the device runs ahead otherwise).
            progress.update(1, note=f"loss {float(loss):.3f}" if i % LOSS_EVERY == 0 or i == STEPS else None)
    trained = f"demo:{variant}@{img_size}:{seed}, trained {STEPS} steps of {BATCH} on the demo dataset"
    spec = dataclasses.replace(start.spec, source=trained)
    teacher = Teacher(spec, jax.tree.map(np.asarray, params["encoder"]))
    save_teacher(cache, teacher.spec, teacher.params, overwrite=True)
    return teacher


@functools.cache
def _train_step(model: _Classifier, img_size: int, mean: tuple, std: tuple, steps: int, lr: float):
    """The jitted classifier step and its optimizer, compiled once for teachers of one architecture."""
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps), weight_decay=0.05)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, pixels, labels):
        if pixels.shape[1] != img_size:
            pixels = jax.image.resize(
                pixels.astype(jnp.float32), (pixels.shape[0], img_size, img_size, 3), "bilinear"
            )
        images = objective.normalize_pixels(pixels, mean, std)

        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx
