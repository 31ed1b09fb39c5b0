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
from dmt_jax.teachers import Teacher, TeacherSpec, load_teacher, make_random_teacher, save_teacher

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

    def prepare(pixels):
        if pixels.shape[1] != img_size:
            pixels = jax.image.resize(
                pixels.astype(jnp.float32), (pixels.shape[0], img_size, img_size, 3), "bilinear"
            )
        return objective.normalize_pixels(pixels, mean, std)

    return _classifier_step(model, prepare, steps, lr)


def _classifier_step(model, prepare, steps: int, lr: float):
    """A demo teacher's jitted AdamW step (cross-entropy on `prepare(pixels)`) and its optimizer."""
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps), weight_decay=0.05)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, pixels, labels):
        images = prepare(pixels)

        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx


# ---------------------------------------------------------------- demo teachers of other families
#
# 'demo:FAMILY:VARIANT@PX:SEED' (and 'random:FAMILY:...'): a small model of that family's architecture,
# the agglomerative demo's teachers. VARIANT gives the size (NAME/PATCH as for the ViT); each family
# keeps what makes it that family, as its converted teachers have it (README, Teachers):
#   clip    ViT with ln_pre, no patch bias, QuickGELU, eps 1e-5 and a projection (summary = projected
#           CLS), OpenAI's mean/std, bicubic input
#   siglip  ViT without CLS, tanh GELU, a MAP head (summary = its output), mean = std = 0.5, squashed
#   eva     EVA-02: RoPE, SwiGLU with sub-LN, q/v bias (summary = CLS), OpenAI's mean/std, bicubic
#   sam     SAM's windowed encoder with relative positions, global last block and a conv neck; no
#           summary (the classifier reads its mean token), ImageNet's mean/std, longest side + pad
DEMO_FAMILIES = ("clip", "siglip", "eva", "sam")
# Learning rates: the ViT demo teachers' 3e-3 where it works, 1e-3 where it does not. Measured here
# (k-NN top-1 of the summary, or mean token, on the demo's val split after 1000 steps): SigLIP-like
# mu/4@32 48.8% at 1e-3, at 3e-3 its MAP head stays near chance for 700 steps; SAM-like mu/4@48 36% at
# 1e-3, 17.5% at 3e-3; EVA-like mu/4@32 53% at 3e-3, 36% at 1e-3; CLIP-like mu/4@32 64% either way.
FAMILY_LR = {"clip": 3e-3, "siglip": 1e-3, "eva": 3e-3, "sam": 1e-3}


def family_spec(family: str, variant: str, img_size: int, source: str = "") -> TeacherSpec:
    """The TeacherSpec of a small teacher of `family` shaped by `variant` ('mu/4': width 64, depth 2)."""
    from dmt_jax.models import family as fam
    from dmt_jax.models.vit import ViTConfig, parse_variant

    arch = parse_variant(variant)
    width = arch["width"]
    resize, mean, std = "bicubic", fam.OPENAI_MEAN, fam.OPENAI_STD
    if family == "clip":  # CLIP's projection narrows the width (ViT-L/14: 1024 -> 768)
        config = ViTConfig(**arch, img_size=img_size, pre_norm=True, patch_bias=False, act="quick_gelu",
                           ln_eps=1e-5, proj_dim=width * 3 // 4)  # fmt: skip
        kind = "vit"
    elif family == "siglip":
        config = ViTConfig(**arch, img_size=img_size, class_token=False, act="gelu_tanh", pool="map")
        kind, resize, mean, std = "vit", "squash", fam.HALF, fam.HALF
    elif family == "eva":  # SwiGLU's hidden width as EVA-02's: 4 * 2/3 of the width
        from dmt_jax.models.eva import EvaConfig

        fields = {k: arch[k] for k in ("width", "depth", "num_heads", "patch_size")}
        grid = img_size // arch["patch_size"]
        config = EvaConfig(**fields, mlp_dim=width * 8 // 3, img_size=img_size, rope_ref_grid=grid)
        kind = "eva"
    elif family == "sam":  # windows a quarter of the grid's side, the last block global, a 3/4-width neck
        from dmt_jax.models.sam import SamConfig

        grid = img_size // arch["patch_size"]
        config = SamConfig(embed_dim=width, depth=arch["depth"], num_heads=arch["num_heads"],
                           mlp_dim=arch["mlp_dim"], patch_size=arch["patch_size"], img_size=img_size,
                           window_size=max(grid // 4, 1), global_attn_indexes=(arch["depth"] - 1,),
                           out_chans=width * 3 // 4)  # fmt: skip
        kind, resize, mean, std = "sam", "longest_pad", fam.IMAGENET_MEAN, fam.IMAGENET_STD
    else:
        raise ValueError(f"demo teacher family must be one of {', '.join(DEMO_FAMILIES)}, got {family!r}")
    return TeacherSpec(format=f"demo-{family}", family=kind, config=config, mean=mean, std=std,
                       input_resize=resize, source=source)  # fmt: skip


def family_lr(spec: TeacherSpec) -> float:
    return FAMILY_LR[spec.format.removeprefix("demo-")]


def random_family_teacher(family: str, variant: str, img_size: int, seed: int) -> Teacher:
    """A teacher of the family with random weights from `seed` ('random:FAMILY:VARIANT@PX:SEED')."""
    spec = family_spec(family, variant, img_size, source=f"random(seed={seed})")
    init = _family_init(spec.features_model(), img_size)
    return Teacher(spec, init(jax.random.PRNGKey(seed)))


@functools.cache
def _family_init(model, img_size: int):
    """The jitted initializer of a family's model, compiled once per architecture (not per seed)."""
    images = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
    return jax.jit(lambda rng: model.init(rng, images)["params"])


class _FamilyClassifier(nn.Module):
    """A linear classifier on a teacher's summary (CLIP's projected CLS, SigLIP's MAP output, EVA's CLS),
    or on its mean patch token for a family without one (SAM); thrown away after training."""

    encoder: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool = False):
        features = self.encoder(images)
        pooled = features.summary if features.summary is not None else features.patches.mean(1)
        return nn.Dense(self.num_classes, name="head")(pooled)


def demo_family_cache_name(spec: TeacherSpec, seed: int) -> str:
    """The cache folder of a family's demo teacher: readable, and keyed by everything that changes its
    weights (the whole spec but its source, the seed and the training recipe)."""
    import hashlib
    import json

    recipe = {k: v for k, v in spec.to_dict().items() if k != "source"}
    recipe.update(seed=seed, steps=STEPS, batch=BATCH, lr=family_lr(spec), pool="summary or mean", version=1)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.format}_{spec.variant.replace('/', '_')}_{spec.img_size}px_seed{seed}_{digest}"


def demo_family_teacher(family: str, variant: str, img_size: int, seed: int, data_config) -> Teacher:
    """The trained demo teacher of a family, from the cache or trained now: the ViT demo teachers' recipe
    (STEPS steps of BATCH demo images, labels through a linear head) at its FAMILY_LR, fed the demo's views
    at its own img_size and by its own input rule."""
    from dmt_jax import data  # TensorFlow: only the demo path needs it here

    entry = f"demo:{family}:{variant}@{img_size}:{seed}"
    spec = family_spec(family, variant, img_size)
    cache = data.demo_dataset_root(data_config) / "teachers" / demo_family_cache_name(spec, seed)
    if (cache / "spec.json").exists():
        return load_teacher(cache)
    print(f"training demo teacher {entry} ({spec.describe()}); cached in {cache} for later runs", flush=True)
    start = random_family_teacher(family, variant, img_size, seed)
    source = data.make_source(data_config, "train")
    model = _FamilyClassifier(spec.features_model(), source.num_classes)
    kernel = nn.initializers.lecun_normal()(
        jax.random.PRNGKey(seed), (spec.summary_dim or spec.width, source.num_classes)
    )
    params = {"encoder": start.params, "head": {"kernel": kernel, "bias": jnp.zeros(source.num_classes)}}
    step, tx = _family_train_step(model, spec, STEPS, family_lr(spec))
    opt_state = tx.init(params)
    stream = data.make_train_input(data_config, source, global_batch=BATCH, img_size=img_size, seed=seed)
    with Progress(f"demo teacher {entry}", total=STEPS, unit="steps") as progress:
        for i, batch in zip(range(1, STEPS + 1), stream, strict=False):
            params, opt_state, loss = step(params, opt_state, batch["image"], source.labels[batch["id"]])
            progress.update(1, note=f"loss {float(loss):.3f}" if i % LOSS_EVERY == 0 or i == STEPS else None)
    trained = f"{entry}, trained {STEPS} steps of {BATCH} on the demo dataset"
    teacher = Teacher(dataclasses.replace(spec, source=trained), jax.tree.map(np.asarray, params["encoder"]))
    save_teacher(cache, teacher.spec, teacher.params, overwrite=True)
    return teacher


@functools.cache
def _family_train_step(model: _FamilyClassifier, spec: TeacherSpec, steps: int, lr: float):
    """The jitted classifier step of a family's teacher: its input prepared as TeacherStack prepares it."""
    from dmt_jax.teachers import prepare_images

    mean, std = np.asarray(spec.mean, np.float32) * 255.0, np.asarray(spec.std, np.float32) * 255.0
    return _classifier_step(
        model, lambda pixels: prepare_images(pixels, spec.img_size, spec.input_resize, mean, std), steps, lr
    )
