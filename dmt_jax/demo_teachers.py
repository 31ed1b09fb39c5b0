"""Small teachers for the demo, trained in process from a fixed seed (no downloads).

A teacher with random weights knows nothing the student does not: its features sort the demo's
images by colour, not by pattern. So each demo teacher is a tiny ViT trained for a few hundred
steps to classify the demo's training images (labels stand in for the self-supervision of the real
teachers; the student never sees a label). Trained teachers are cached as converted-teacher
directories beside the demo dataset, so later runs load them.

Teacher entry: 'demo:VARIANT@PX:SEED', e.g. 'demo:mu/8@64:3' (a /8 ViT fed 64 px).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmt_jax import objective
from dmt_jax.models.vit import ViT
from dmt_jax.teachers import Teacher, load_teacher, make_random_teacher, save_teacher

STEPS, BATCH, LR = 500, 64, 3e-3


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

    cache = (
        data.demo_dataset_root(data_config)
        / "teachers"
        / f"{variant.replace('/', '_')}_{img_size}px_seed{seed}_steps{STEPS}"
    )
    if (cache / "spec.json").exists():
        return load_teacher(cache)
    start = make_random_teacher(variant, img_size, seed)
    source = data.make_source(data_config, "train")
    model = _Classifier(start.spec.model(), source.num_classes)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, img_size, img_size, 3)))["params"]
    params["encoder"] = start.params
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, LR, STEPS // 10, STEPS), weight_decay=0.05)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, pixels, labels):
        if pixels.shape[1] != img_size:
            pixels = jax.image.resize(
                pixels.astype(jnp.float32), (pixels.shape[0], img_size, img_size, 3), "bilinear"
            )
        images = objective.normalize_pixels(pixels, start.spec.mean, start.spec.std)

        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    stream = data.make_train_input(
        data_config, source, global_batch=BATCH, img_size=student_img_size, seed=seed
    )
    print(f"training demo teacher {variant} at {img_size}px (seed {seed}) for {STEPS} steps", flush=True)
    for _, batch in zip(range(STEPS), stream, strict=False):
        params, opt_state, loss = step(params, opt_state, batch["image"], source.labels[batch["id"]])
    print(f"  final training loss {float(loss):.3f}", flush=True)
    teacher = Teacher(start.spec, jax.tree.map(np.asarray, params["encoder"]))
    save_teacher(cache, teacher.spec, teacher.params, overwrite=True)
    return teacher
