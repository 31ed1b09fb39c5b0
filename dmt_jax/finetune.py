"""Fine-tuning a distilled student (or a teacher, or a random ViT) as an image classifier.

    python -m dmt_jax.finetune --config=configs/finetune_vit_s.py --workdir=DIR --config.init=SRC

SRC is a distillation workdir (its newest checkpoint's student encoder), a student_timm.safetensors,
a converted teacher directory, or '' (random init). The recipe is MAE/BEiT's (every part a field of
config.FINETUNE_SCHEMA): AdamW with layer-wise lr decay, mean-pooled tokens + fc_norm (or CLS),
label smoothing, Mixup/CutMix on the device inside the step, RandAugment and random erasing in the
tf.data pipeline, optional EMA. Everything else is the distillation's: mesh and partition rules,
the sharded init and step (train.sharded_init, train.guarded_update), the input pipelines, orbax
checkpoints with exact resume, preemption, the progress line, TensorBoard, the flag parsing, and the
loop's protections (loop.with_workdir_lock, loop.resume_or_start's run_record check: a resume with
another init or changed training fields is refused unless resume_allow_changes, loop.next_batch's stop
while waiting for input).

The workdir gets checkpoints/, TensorBoard events, config.json, eval.jsonl (top-1/top-5 per
evaluation, and the best top-1 with its step) and classifier_timm.safetensors (timm loads it
strictly; its kwargs and pretrained_cfg are in the file's metadata).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from dmt_jax import checkpoint, data, evaluate, flops, formats, loop, objective, parallel, storage, train
from dmt_jax.errors import UserError
from dmt_jax.models.vit import LayerNorm, ViT, parse_variant
from dmt_jax.teachers import IMAGENET_MEAN, IMAGENET_STD, flatten_params, load_teacher, unflatten_params

_REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EXPORT_NAME = "classifier_timm.safetensors"
# The classifier's own parameters beside the encoder's (formats.NAME_TABLE): timm name, Flax path, change.
HEAD_NAMES = (
    ("fc_norm.weight", "fc_norm/scale", formats.COPY),
    ("fc_norm.bias", "fc_norm/bias", formats.COPY),
    ("head.weight", "head/kernel", formats.LINEAR),
    ("head.bias", "head/bias", formats.COPY),
)


class Classifier(nn.Module):
    """ViT encoder + (mean of the patch tokens, fc_norm) or the CLS token + a linear head, as timm's."""

    encoder: ViT
    num_classes: int
    global_pool: str = "avg"
    head_init_std: float = 2e-5

    @nn.compact
    def __call__(self, images, train: bool = False):
        tokens = self.encoder(images, train=train)
        if self.global_pool == "avg":
            pooled = tokens[:, self.encoder.num_prefix_tokens :].mean(axis=1)
            pooled = LayerNorm(dtype=self.encoder.dtype, name="fc_norm")(pooled)
        else:
            pooled = tokens[:, 0]
        head = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.truncated_normal(self.head_init_std), name="head"
        )
        return head(pooled.astype(jnp.float32))


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Any  # {'encoder': ..., 'fc_norm': ..., 'head': ...}
    opt_state: Any
    rng: jax.Array
    ema: Any  # EMA of params when ema_decay > 0, else a 0 placeholder


# ---------------------------------------------------------------- where the weights come from


@dataclasses.dataclass
class Pretrained:
    """An encoder's Flax params and what is needed to build and feed its ViT."""

    params: dict
    arch: formats.Architecture
    num_heads: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def load_pretrained(source: str) -> Pretrained:
    """A distillation workdir, a student_timm.safetensors or a converted teacher directory -> Pretrained."""
    path = storage.path(source, "--config.init")  # the form every reader of the init uses
    if (path / "spec.json").exists():
        teacher = load_teacher(path)
        if problem := not_a_plain_vit(teacher.spec):
            raise UserError(f"--config.init={source}: {problem}")
        spec, state = teacher.spec, formats.flax_to_timm(flatten_params(teacher.params))
        return Pretrained(
            teacher.params, formats.infer_architecture(state), spec.num_heads, spec.mean, spec.std
        )
    if (path / "checkpoints").is_dir():
        return _from_distillation(path)
    if path.is_file() and path.name.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), "np") as f:
            kwargs = json.loads((f.metadata() or {}).get("timm_kwargs", "{}"))
        state = load_file(str(path))
        return _pretrained_from_timm(state, kwargs.get("num_heads"))
    raise UserError(
        f"--config.init={source!r} is neither a distillation workdir (with checkpoints/), a "
        "student_timm.safetensors nor a converted teacher directory (with spec.json)"
    )


# What a fine-tuning builds is timm's plain ViT (Classifier's encoder). A teacher whose architecture differs
# (CLIP's ln_pre, QuickGELU, bias-free patch projection and eps 1e-5; SigLIP's missing CLS token and tanh
# GELU; EVA-02; SAM) would be built without its differences and run wrong: refused, never dropped.
PLAIN_VIT = dict(class_token=True, pre_norm=False, patch_bias=True, act="gelu", ln_eps=1e-6)


def not_a_plain_vit(spec) -> str:
    """'' for a teacher fine-tuning rebuilds exactly (MAE, MoCo v3, DINO, iBOT, DINOv2); else why not."""
    if spec.family == "vit":
        differs = [
            f"{k}={getattr(spec.config, k)!r}" for k, v in PLAIN_VIT.items() if getattr(spec.config, k) != v
        ]
        if not differs:
            return ""  # a projection or MAP head only feeds its summary: fine-tuning reads its tokens
        what = f"a ViT with {', '.join(differs)}"
    else:
        what = f"a{'n' if spec.family[0] in 'aeiou' else ''} {spec.family} model"
    return (
        f"its teacher ({spec.format}) is {what}, not the plain timm ViT fine-tuning builds (it would run "
        "without those differences): fine-tune from a distilled student, an MAE, MoCo v3, DINO, iBOT or "
        "DINOv2 teacher, or from random init (--config.init=)"
    )


def _pretrained_from_timm(state: dict, num_heads: int | None) -> Pretrained:
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    arch = formats.infer_architecture(state)
    params = unflatten_params(formats.timm_to_flax(state))
    return Pretrained(params, arch, num_heads or arch.num_heads)


def _from_distillation(workdir: epath.Path) -> Pretrained:
    """The student encoder of the newest checkpoint of a distillation workdir."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
        raise UserError(f"--config.init={str(workdir)!r} holds no checkpoint yet: distill first")
    encoder = checkpoint.read_state(str(workdir / "checkpoints"), steps[-1])["params"]["encoder"]
    num_heads = None
    if (workdir / "config.json").exists():
        variant = json.loads((workdir / "config.json").read_text())["student"]["variant"]
        num_heads = parse_variant(variant)["num_heads"]
    return _pretrained_from_timm(formats.flax_to_timm(flatten_params(encoder)), num_heads)


# ---------------------------------------------------------------- the recipe's pieces


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


# ---------------------------------------------------------------- build: model, state, step


@dataclasses.dataclass
class FinetuneSetup:
    config: Any
    mesh: Any
    model: Classifier
    pretrained: Pretrained | None
    num_classes: int
    steps: int
    init_state: Any  # rng -> sharded FinetuneState (pretrained weights placed)
    step: Any  # jitted (state, batch) -> (state, metrics)
    abstract_state: Any
    predict: Any  # jitted (params, pixels) -> top-5 class indices
    mean: tuple  # the input normalization (the init's; ImageNet's for a random init)
    std: tuple

    @property
    def flops_per_image(self) -> float:
        enc = self.model.encoder
        tokens = (self.config.img_size // enc.patch_size) ** 2 + enc.num_prefix_tokens
        return 3.0 * flops.vit_flops(enc.width, enc.depth, tokens, enc.patch_size, enc.mlp_dim)


def build_model(config, pretrained: Pretrained | None, num_classes: int) -> Classifier:
    variant = parse_variant(config.model.variant)
    if pretrained:
        a = pretrained.arch
        shape = dict(width=a.width, depth=a.depth, num_heads=pretrained.num_heads, mlp_dim=a.mlp_dim)
        if (a.width, a.depth, a.mlp_dim, a.patch_size) != tuple(
            variant[k] for k in ("width", "depth", "mlp_dim", "patch_size")
        ):
            raise UserError(
                f"--config.init is a ViT {a.variant} but --config.model.variant={config.model.variant!r}: "
                f"set --config.model.variant={a.variant!r}"
            )
        if a.grid * a.patch_size != config.img_size:
            raise UserError(
                f"--config.init has position embeddings for {a.grid * a.patch_size} px but "
                f"--config.img_size={config.img_size}: fine-tune at {a.grid * a.patch_size} px (or convert "
                "the teacher with `dmt-convert --img-size`)"
            )
        extra = dict(
            num_reg_tokens=a.num_reg_tokens,
            no_embed_class=a.no_embed_class,
            layerscale_init=1.0 if a.layerscale else None,
        )
    else:
        shape = {k: variant[k] for k in ("width", "depth", "num_heads", "mlp_dim")}
        extra = dict(
            num_reg_tokens=config.model.num_reg_tokens,
            layerscale_init=config.model.layerscale_init if config.model.layerscale_init > 0 else None,
        )
    encoder = ViT(
        **shape,
        **extra,
        patch_size=variant["patch_size"],
        img_size=config.img_size,
        pos_embed=config.model.pos_embed,
        drop_path=config.model.drop_path,
        dtype=jnp.dtype(config.dtype),
        attention=config.attention,
        remat=config.remat,
        final_norm=config.model.global_pool == "token",
    )
    return Classifier(encoder, num_classes, config.model.global_pool, config.model.head_init_std)


def build(config, mesh, num_train_examples: int, num_classes: int) -> FinetuneSetup:
    pretrained = load_pretrained(config.init) if config.init else None
    model = build_model(config, pretrained, num_classes)
    mean, std = (pretrained.mean, pretrained.std) if pretrained else (IMAGENET_MEAN, IMAGENET_STD)
    steps = train.total_steps(config, num_train_examples)
    dummy = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    param_shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy)["params"])
    tx, schedule = make_optimizer(
        config, param_shapes, model.encoder.depth, steps, num_train_examples / config.batch_size
    )
    use_ema = config.ema_decay > 0

    def init_fn(rng):
        r_params, r_state = jax.random.split(rng)
        params = model.init(r_params, dummy)["params"]
        ema = params if use_ema else jnp.zeros(())
        return FinetuneState(jnp.zeros((), jnp.int32), params, tx.init(params), r_state, ema)

    random_init, state_shardings, abstract_state = train.sharded_init(init_fn, mesh, config.fsdp_min_size)

    def init_state(rng):
        state = random_init(rng)
        params = state.params
        if pretrained:
            # The encoder's weights replace the random ones (Adam's moments start at zero either way);
            # a final norm the classifier does not use (mean pooling + fc_norm, as MAE) is left out.
            loaded = {k: v for k, v in pretrained.params.items() if k in params["encoder"]}
            shardings = {k: state_shardings.params["encoder"][k] for k in loaded}
            placed = parallel.place_from_host(loaded, shardings)
            params = dict(params, encoder={**params["encoder"], **placed})
        # The EMA starts as its own copy of the weights (the step donates both: they may not share buffers).
        ema = jax.tree.map(lambda p: p.copy(), params) if use_ema else state.ema
        return state.replace(params=params, ema=ema)

    def normalized(pixels):
        return objective.normalize_pixels(pixels, mean, std, jnp.dtype(config.dtype))

    def step_fn(state: FinetuneState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        r_mix, r_drop = jax.random.split(rng)
        pixels = batch["image"].astype(jnp.float32)
        targets = smooth_one_hot(batch["label"], num_classes, config.label_smoothing)
        if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
            lam, box, use_cutmix = sample_mix(r_mix, config, pixels.shape[1], pixels.shape[2])
            pixels, targets = mix_batch(pixels, targets, lam, box, use_cutmix)

        def loss_fn(params):
            logits = model.apply({"params": params}, normalized(pixels), train=True, rngs={"dropout": r_drop})
            return optax.softmax_cross_entropy(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        params, opt_state, finite, grad_norm = train.guarded_update(
            tx, grads, loss, state.params, state.opt_state
        )
        ema = state.ema
        if use_ema:
            ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, ema, params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "nonfinite": 1 - finite.astype(jnp.int32),
        }
        return FinetuneState(state.step + 1, params, opt_state, state.rng, ema), metrics

    batch_sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, {"image": batch_sharding, "label": batch_sharding}),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )

    @jax.jit
    def predict(params, pixels):
        logits = model.apply({"params": params}, normalized(pixels))
        return jax.lax.top_k(logits, min(5, num_classes))[1]

    return FinetuneSetup(
        config,
        mesh,
        model,
        pretrained,
        num_classes,
        steps,
        init_state,
        step,
        abstract_state,
        predict,
        mean,
        std,
    )


# ---------------------------------------------------------------- evaluation and export


def top1_top5(setup: FinetuneSetup, params, sources: dict) -> dict[str, float]:
    """On the validation split (loop.eval_batches' role 'knn_eval'; `sources` caches its source)."""
    batches = loop.eval_batches(setup.config, sources, "knn_eval")
    top5, labels = evaluate.collect(setup.predict, batches, setup.mesh, params)
    hits = top5 == labels[:, None]
    return {"top1": 100.0 * float(hits[:, 0].mean()), "top5": 100.0 * float(hits.any(axis=1).mean())}


def classifier_state_dict(params) -> dict[str, np.ndarray]:
    """The classifier's params -> timm names (the export name table plus HEAD_NAMES), float32."""
    flat = dict(flatten_params(params))
    state = {
        timm_name: formats.TO_TIMM[change](np.asarray(flat.pop(flax_name), np.float32))
        for timm_name, flax_name, change in HEAD_NAMES
        if flax_name in flat
    }
    encoder = {k.removeprefix("encoder/"): np.asarray(v, np.float32) for k, v in flat.items()}
    state.update(formats.flax_to_timm(encoder))
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def export_classifier(model: Classifier, params, path, *, img_size: int, mean, std, crop_pct: float) -> dict:
    """Writes the classifier as a timm state dict with its kwargs and pretrained_cfg (export.py's);
    returns the timm kwargs: `VisionTransformer(**kwargs).load_state_dict(file, strict=True)`."""
    from dmt_jax import export

    state = classifier_state_dict(params)
    kwargs = export.timm_model_kwargs(state, model.encoder.num_heads)
    kwargs.update(global_pool=model.global_pool, num_classes=model.num_classes)
    cfg = export.timm_pretrained_cfg(
        img_size, num_classes=model.num_classes, mean=mean, std=std, crop_pct=crop_pct
    )
    export.save_timm_file(state, path, kwargs, cfg)
    return kwargs


# ---------------------------------------------------------------- the loop


def finetune(config, workdir: str) -> dict[str, float]:
    """Runs (or resumes) a fine-tuning in workdir; returns the final evaluation (and the best top-1), or {}
    when stopped early. As the distillation (loop.py): the workdir is locked, a resume must continue the
    same run (same init, same training fields), a stop request is honoured while waiting for input."""
    workdir = storage.resolve(workdir, "--workdir")  # one form for every reader and writer (storage.py)
    return loop.with_workdir_lock(workdir, _finetune_locked, config, workdir)


def _finetune_locked(config, workdir: str) -> dict[str, float]:
    from clu import metric_writers

    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    train_source = data.make_source(config.data, "train")
    eval_sources = {"knn_eval": data.make_source(config.data, "knn_eval")}  # a missing split fails early
    num_classes = config.num_classes if config.num_classes > 0 else train_source.num_classes
    setup = build(config, mesh, len(train_source), num_classes)
    parallel.local_batch_size(config.batch_size)
    ckpt = checkpoint.for_run(workdir, config)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    preemption = loop.Preemption(agree_every=config.log_every)
    try:
        return _finetune(setup, ckpt, writer, preemption, train_source, eval_sources, workdir)
    finally:
        preemption.close()
        writer.flush()
        ckpt.close()


def _finetune(setup, ckpt, writer, preemption, train_source, eval_sources, workdir) -> dict[str, float]:
    config, mesh = setup.config, setup.mesh
    # The init is a config field: a resume from another one is refused, named (init: 'a' -> 'b').
    state, train_input, record = loop.resume_or_start(setup, ckpt, train_source, workdir)
    start = int(state.step)
    if start == 0 and config.init:
        _say(f"fine-tuning from {config.init}")
    progress = loop.Progress(setup.steps, start, config.batch_size, setup.flops_per_image)
    books = loop.Books(config, ckpt, writer, progress, train_input)
    books.record = record
    preemption.watch_input(train_input)
    evals = _Evaluations(setup, writer, workdir, eval_sources)
    pending, profile, batches = [], tuple(config.profile_steps), iter(train_input)

    for step in range(start, setup.steps):
        if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = loop.next_batch(batches, books, step, state)
        if batch is None:
            return {}
        state, metrics = setup.step(
            state, parallel.global_batch({k: batch[k] for k in ("image", "label")}, mesh)
        )
        pending.append(metrics)
        done = step + 1
        if profile and done == profile[1]:
            jax.profiler.stop_trace()
        last = done == setup.steps
        if loop.log_save_or_stop(books, preemption, state, done, last, pending):
            return {}
        if config.eval_every > 0 and done % config.eval_every == 0 and not last:
            evals.run(state, done)

    final = evals.run(state, int(state.step))
    if config.export_at_end:
        params = parallel.to_host(state.params)
        if jax.process_index() == 0:
            path = os.path.join(workdir, EXPORT_NAME)
            export_classifier(
                setup.model,
                params,
                path,
                img_size=config.img_size,
                mean=setup.mean,
                std=setup.std,
                crop_pct=config.data.eval_crop_fraction,
            )
            print(f"classifier exported for timm/PyTorch: {path}", flush=True)
    return final


class _Evaluations:
    """top-1/top-5 on the validation split (and of the EMA weights), to TensorBoard and eval.jsonl; the
    best top-1 so far and its step are kept in eval.jsonl's lines (read back on resume)."""

    def __init__(self, setup, writer, workdir: str, sources: dict):
        self.setup, self.writer, self.sources = setup, writer, sources
        self.path = os.path.join(workdir, "eval.jsonl")
        self.best = (-1.0, 0)
        if os.path.exists(self.path):
            for line in epath.Path(self.path).read_text().splitlines():
                entry = json.loads(line)
                self.best = max(self.best, (entry["top1"], entry["step"]))

    def run(self, state, step: int) -> dict[str, float]:
        out = top1_top5(self.setup, state.params, self.sources)
        if self.setup.config.ema_decay > 0:
            out.update({f"ema_{k}": v for k, v in top1_top5(self.setup, state.ema, self.sources).items()})
        self.best = max(self.best, (out["top1"], step))
        out["best_top1"], out["best_step"] = self.best
        self.writer.write_scalars(step, out)
        if jax.process_index() == 0:
            storage.append_line(self.path, json.dumps({"step": step, **out}))
            print(f"eval at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
        return out


def _say(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


def check_run(config, workdir: str) -> None:
    """The validation pass of a fine-tuning (validate.py's checks that apply), before anything is built:
    every field in its range, the devices, the training and validation data, the init, the workdir."""
    from dmt_jax import config as config_lib
    from dmt_jax import validate

    problems = config_lib.field_problems(config, config_lib.FINETUNE_SCHEMA)
    if not any(p.startswith("--config.distributed.") for p in problems):
        parallel.initialize_distributed(config.distributed)
        problems += validate.device_problems(config)
    problems += data.dataset_problems(config.data, ("train", "knn_eval"))
    if config.init and not _init_exists(config.init):
        problems.append(
            f"--config.init={config.init!r} does not exist: name a distillation workdir (e.g. the demo's, "
            "after `python -m dmt_jax.main --config=configs/demo.py --workdir=/tmp/dmt_demo`), a "
            "student_timm.safetensors or a converted teacher directory; --config.init= for random init"
        )
    problems += validate.workdir_problems(workdir)
    if problems:
        raise UserError(*problems)


def _init_exists(init: str) -> bool:
    try:
        return storage.path(init, "--config.init").exists()
    except UserError:  # blank, or a name too long for the filesystem: it does not exist either way
        return False


def run(argv=None):
    from dmt_jax import config as config_lib
    from dmt_jax import main

    main.run(
        argv,
        default_config=os.path.join(_REPO_CONFIG, "finetune_demo.py"),
        schema=config_lib.finetune_base_config,
        fields=config_lib.FINETUNE_SCHEMA,
        train=finetune,
        check=check_run,
    )


if __name__ == "__main__":
    run()
