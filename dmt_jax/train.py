"""Train state, sharded initialization and the jitted distillation step (METHOD.md 5-8).

`build(config, mesh)` gives everything a loop or a benchmark needs: the student, the teacher stack,
the optimizer, a jitted `step(state, teacher_params, batch) -> (state, metrics)` with explicit
shardings and a donated state, and `init_state(rng)` that creates the state directly in its
sharded layout. The loop itself is in loop.py.

One step function serves both objectives: DMT's (the default, exactly as before) and the
agglomerative one (objective='agglomerative', dmt_jax/objective/agglomerative.py), whose state also
carries the target normalization's statistics and whose resolution stages each get their own
compiled step (`StagedStep`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dmt_jax import flops, objective, parallel, storage
from dmt_jax.config import TEACHER_BLOCK as BLOCK_FIELDS
from dmt_jax.config import entry as config_entry
from dmt_jax.config import split_teacher_name
from dmt_jax.errors import UserError
from dmt_jax.models.vit import ViT, parse_variant
from dmt_jax.objective import agglomerative as agg
from dmt_jax.objective import align
from dmt_jax.teachers import TeacherStack, fingerprint, load_teacher, make_random_teacher


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'encoder': ..., 'heads': ...}
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold a plain array


@flax.struct.dataclass
class StatsTrainState(TrainState):
    """The agglomerative objective's state: also the target normalization's statistics, per teacher name
    (objective/normalize.py). Updated inside the step, checkpointed, never given to the optimizer. DMT
    keeps TrainState, so its checkpoints keep their layout."""

    stats: Any = None


def build_teachers(
    entries, img_size: int, student_patch: int, data_config=None, same_grid: bool = True
) -> list:
    """Teacher entries -> Teachers: converted directories, 'random:VARIANT@PX:SEED' (random weights),
    or 'demo:VARIANT@PX:SEED' (trained in process on the demo dataset; see demo_teachers.py), a family
    after the kind for other architectures ('demo:clip:mu/4@32:1'), each optionally named, NAME=ENTRY.

    With same_grid (DMT), each teacher must produce the student's patch grid; a /14 teacher is
    converted for 196 px (`dmt-convert --img-size 196`) when the student is /16 at 224 px.
    """
    entries = [split_teacher_name(e)[1] for e in entries if e]
    if not entries:
        raise UserError("no teachers configured: set --config.teachers to converted teacher directories")
    grid = img_size // student_patch
    teachers = []
    for entry in entries:
        if generated := parse_teacher_entry(entry):
            kind, family, variant, px, seed = generated
            if family != "vit":  # a small teacher of another family (demo_teachers.family_spec)
                from dmt_jax import demo_teachers

                if kind == "random":
                    teacher = demo_teachers.random_family_teacher(family, variant, px, seed)
                else:
                    teacher = demo_teachers.demo_family_teacher(family, variant, px, seed, data_config)
            elif kind == "random":
                teacher = make_random_teacher(variant, px, seed)
            else:
                from dmt_jax.demo_teachers import demo_teacher

                teacher = demo_teacher(variant, px, seed, data_config, img_size)
        else:
            if not storage.path(entry).is_dir():  # local or gs://
                raise UserError(
                    f"teacher {entry!r} does not exist: convert the official checkpoint first, "
                    f"e.g. `dmt-convert mae_pretrain_vit_base.pth {entry}` (see README, Teachers)"
                )
            teacher = load_teacher(entry)
        t_grid = teacher.spec.img_size // teacher.spec.patch_size
        if same_grid and t_grid != grid:
            px = grid * teacher.spec.patch_size
            raise UserError(
                f"teacher {entry!r} has a {t_grid}x{t_grid} patch grid but the student has {grid}x{grid}: "
                f"re-convert it with `dmt-convert SRC OUT --img-size {px}`"
            )
        teachers.append(teacher)
    return teachers


def _is_count(path) -> bool:
    """An optax state's step counter (ScaleByAdamState.count, ScaleByScheduleState.count)."""
    return bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "count"


def parse_teacher_entry(entry: str) -> tuple[str, str, str, int, int] | None:
    """'random:VARIANT@PX:SEED' / 'demo:...' -> (kind, family, variant, px, seed), family 'vit'; with a
    family, 'demo:FAMILY:VARIANT@PX:SEED' (FAMILY: clip, siglip, eva, sam); None for a directory."""
    if not entry.startswith(("random:", "demo:")):
        return None
    from dmt_jax.demo_teachers import DEMO_FAMILIES

    m = re.fullmatch(r"(random|demo):(?:([a-z]+):)?([^@:]+)@(\d+):(\d+)", entry)
    if not m or (m.group(2) is not None and m.group(2) not in DEMO_FAMILIES):
        raise UserError(
            f"teacher entry {entry!r}: write 'random:VARIANT@PX:SEED' or 'demo:VARIANT@PX:SEED' (a ViT), or "
            f"'demo:FAMILY:VARIANT@PX:SEED' with FAMILY one of {', '.join(DEMO_FAMILIES)}"
        )
    return m.group(1), m.group(2) or "vit", m.group(3), int(m.group(4)), int(m.group(5))


def student_encoder(config, num_reg_tokens: int) -> ViT:
    """The student's ViT from `config.student` (both objectives; the agglomerative one adds summary tokens
    to the registers)."""
    s = config.student
    return ViT(
        **parse_variant(s.variant),
        img_size=config.img_size,
        num_reg_tokens=num_reg_tokens,
        layerscale_init=s.layerscale_init if s.layerscale_init > 0 else None,
        pos_embed=s.pos_embed,
        drop_path=s.drop_path,
        dtype=jnp.dtype(config.dtype),
        attention=config.attention,
        remat=config.remat,
    )


def build_student(config, head_widths) -> objective.Student:
    dtype = jnp.dtype(config.dtype)
    encoder = student_encoder(config, config.student.num_reg_tokens)
    heads = objective.Heads(tuple(head_widths), config.head, config.head_mlp_ratio, dtype)
    return objective.Student(encoder, heads)


def total_steps(config, num_train_examples: int | None) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    if not num_train_examples:
        raise UserError("set --config.total_steps: the training set size is unknown")
    return int(math.ceil(config.epochs * num_train_examples / config.batch_size))


def warmup_steps(config, steps: int, steps_per_epoch: float) -> int:
    """warmup_steps if set; else warmup_epochs, or, when total_steps sets the run's length, the same
    fraction of the run as warmup_epochs / epochs (20 of 300 epochs: the first 1/15 of 20 steps too)."""
    if config.warmup_steps >= 0:
        warmup = config.warmup_steps
    elif config.total_steps > 0:
        warmup = int(round(steps * config.warmup_epochs / config.epochs))
    else:
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
    return max(0, min(warmup, steps - 1))


def lr_schedule(config, steps: int, steps_per_epoch: float):
    """lr = base_lr * batch / 256, linear warmup from 0, then cosine down to min_lr at `steps`."""
    peak = config.base_lr * config.batch_size / 256
    warmup = warmup_steps(config, steps, steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(steps, 1), config.min_lr)


def decay_mask(params):
    """Weight decay on matrices only: not on 1-D tensors (biases, norms) nor pos_embed/CLS/registers."""
    flat = flax.traverse_util.flatten_dict(params)
    no_decay = ("pos_embed", "cls_token", "reg_token")
    # getattr: inside multi_transform the frozen leaves arrive as optax MaskedNodes
    return flax.traverse_util.unflatten_dict(
        {k: getattr(v, "ndim", 0) >= 2 and k[-1] not in no_decay for k, v in flat.items()}
    )


def sharded_init(init_fn, mesh, fsdp_min_size: int):
    """(init_state, state_shardings, abstract_state) for `init_fn(rng) -> state`: the state is created
    directly in the partition rules' layout; abstract_state (shapes + shardings) is the restore target."""
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    state_shardings = parallel.tree_shardings(abstract, mesh, fsdp_min_size)
    init_state = jax.jit(init_fn, out_shardings=state_shardings)
    abstract_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, state_shardings
    )
    return init_state, state_shardings, abstract_state


def guarded_update(tx, grads, loss, params, opt_state):
    """One optimizer update, applied only if the loss and the gradient norm are finite: a non-finite
    step never touches the parameters or the moments (the loop then stops or goes on). Returns
    (params, opt_state, finite, grad_norm)."""
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_new = lambda new, old: jnp.where(finite, new, old)
    new_params = jax.tree.map(keep_new, new_params, params)
    # The optimizer's step counts advance even so: its lr schedule stays at state.step (the lr logged).
    new_opt_state = jax.tree_util.tree_map_with_path(
        lambda path, new, old: new if _is_count(path) else keep_new(new, old), new_opt_state, opt_state
    )
    return new_params, new_opt_state, finite, grad_norm


def make_optimizer(config, steps: int, steps_per_epoch: float):
    """AdamW, lr = base_lr * batch / 256, linear warmup then cosine; no decay on 1-D tensors, pos/CLS/regs."""
    schedule = lr_schedule(config, steps, steps_per_epoch)
    adamw = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask
    )
    if config.grad_clip > 0:
        adamw = optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    if config.student.pos_embed == "sincos":  # fixed table: never updated

        def labels(params):
            flat = flax.traverse_util.flatten_dict(params)
            return flax.traverse_util.unflatten_dict(
                {k: "frozen" if k[-1] == "pos_embed" else "train" for k in flat}
            )

        return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), schedule
    return adamw, schedule


@dataclasses.dataclass
class Setup:
    """What the loop and the benchmarks need, built once from a config on a mesh."""

    config: Any
    mesh: Any
    student: objective.Student
    stack: TeacherStack
    tx: Any
    schedule: Any
    steps: int
    init_state: Any  # rng -> sharded TrainState
    step: Any  # jitted (state, teacher_params, batch) -> (state, metrics)
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with the mesh's shardings (checkpoint restore target)
    teacher_params: Any  # placed on the mesh
    teacher_fingerprints: list = dataclasses.field(default_factory=list)  # teachers.fingerprint, in order
    view_size: int = 0  # side of the training views (the input pipeline's img_size)
    targets: tuple | None = None  # agglomerative: the teachers' agg.TeacherTarget, in name order

    @property
    def num_patches(self) -> int:
        return (self.config.img_size // self.student.encoder.patch_size) ** 2

    def flops_per_image(self, step: int | None = None) -> float:
        """Model FLOPs of one step per image (flops.py; what the progress line's MFU divides by).

        DMT: the count bench/torch_reference.py uses. Agglomerative: each teacher's forward at its input
        size with its family's own count, the view resized to it, the student (its summary tokens among
        the prefix) and its heads 3x, the grids' resampling and PHI-S; at the resolution stage of `step`,
        or, without a step, averaged over the run's stages by their numbers of steps."""
        if self.targets is not None:
            stages = stage_sizes(self.config) or ((0, self.config.img_size),)
            if step is not None:
                return self.agglomerative_flops([px for start, px in stages if start <= step][-1])
            ends = [start for start, _ in stages[1:]] + [self.steps]
            lengths = [
                max(min(end, self.steps) - start, 0) for (start, _), end in zip(stages, ends, strict=True)
            ]
            counts = [self.agglomerative_flops(px) for _, px in stages]
            weighted = sum(n * f for n, f in zip(lengths, counts, strict=True))
            return weighted / sum(lengths) if sum(lengths) else counts[0]
        enc = self.student.encoder
        student = dict(width=enc.width, depth=enc.depth, patch_size=enc.patch_size, mlp_dim=enc.mlp_dim)
        teachers = [
            dict(
                width=spec.width,
                depth=spec.depth,
                patch_size=spec.patch_size,
                mlp_dim=spec.mlp_dim,
                tokens=spec.num_tokens,
            )  # fmt: skip
            if spec.family == "vit"
            else dict(flops=flops.forward_flops(spec.family, spec.config))
            for spec in self.stack.specs
        ]
        visible = objective.num_visible(self.num_patches, self.config.mask_ratio)
        return flops.step_flops(student, teachers, visible, self.stack.widths, enc.width)

    def agglomerative_flops(self, px: int) -> float:
        """Per image, the agglomerative step with the student at px (flops.py counts matrix products)."""
        cfg, enc, stack = self.config, self.student.encoder, self.stack
        grid = px // enc.patch_size
        patches = grid * grid
        visible = objective.num_visible(patches, cfg.mask_ratio) if cfg.mask_ratio > 0 else patches
        view = (self.view_size, self.view_size)
        total = 0.0
        for spec, size in zip(stack.specs, stack.img_sizes(px), strict=True):  # frozen: forward only
            config = spec.config if size == spec.img_size else dataclasses.replace(spec.config, img_size=size)
            total += flops.image_resize_flops(view, (size, size)) + flops.forward_flops(spec.family, config)
        # The student: the stem over every patch (forward, weight gradient), the blocks over its prefix
        # (CLS, one summary token per teacher, registers) and visible patches (forward and backward: 3x).
        w = enc.width
        blocks = enc.depth * flops.block_flops(
            enc.num_prefix_tokens + visible, w, 2 * w * w + 2 * w * enc.mlp_dim
        )
        total += flops.image_resize_flops(view, (px, px)) + 2 * flops.stem_flops(patches, enc.patch_size, w)
        total += 3 * blocks
        a = cfg.agglomerative
        head = dict(hidden=a.head_hidden_dim if a.head_hidden_dim > 0 else w, num_inner=a.head_num_inner,
                    mlp_ratio=cfg.head_mlp_ratio)  # fmt: skip
        for t in stage_targets(self.targets, stack, teacher_names(cfg), px):
            if t.summary_dim:
                total += 3 * flops.head_flops(t.summary_head, w, t.summary_dim, **head)
                total += 2 * t.summary_dim**2 if t.summary_norm == "phi_s" else 0
            if t.dense_dim:
                total += 3 * visible * flops.head_flops(t.dense_head, w, t.dense_dim, **head)
                total += 2 * t.grid[0] * t.grid[1] * t.dense_dim**2 if t.norm == "phi_s" else 0
                if (
                    cfg.mask_ratio > 0 or a.resample == "teacher_to_student"
                ):  # the targets, to the student's grid
                    total += flops.resample_flops(t.grid, (grid, grid), t.dense_dim)
                else:  # the student's adapted features, to the teacher's grid (forward and backward)
                    total += 2 * flops.resample_flops((grid, grid), t.grid, t.dense_dim)
        return float(total)


def build(config, mesh, num_train_examples: int | None = None, teachers=None) -> Setup:
    student_patch = parse_variant(config.student.variant)["patch_size"]
    aggl = config.objective == "agglomerative"
    if teachers is None:
        teachers = build_teachers(
            config.teachers, config.img_size, student_patch, config.data, same_grid=not aggl
        )
    fingerprints = [fingerprint(t) for t in teachers]  # checkpoints record them (run_record.py)
    if len(set(fingerprints)) < len(fingerprints) and not config.get("allow_duplicate_teachers", False):
        first = [fingerprints.index(f) for f in fingerprints]
        pairs = ", ".join(f"{j} and {i}" for i, j in enumerate(first) if i != j)
        raise UserError(
            f"teachers {pairs} of --config.teachers have the same weights (copies of one teacher): it would "
            "silently weigh double; give it once, or pass --config.allow_duplicate_teachers=True"
        )
    stack = TeacherStack(
        teachers,
        dtype=jnp.dtype(config.teacher_dtype),
        attention=config.attention,
        follow=follow_methods(config, teachers) if aggl else None,
    )
    specs = teacher_targets(config, stack) if aggl else None
    student = build_agglomerative_student(config, specs) if aggl else build_student(config, stack.widths)
    steps = total_steps(config, num_train_examples)
    steps_per_epoch = num_train_examples / config.batch_size if num_train_examples else 1.0
    tx, schedule = make_optimizer(config, steps, steps_per_epoch)
    weights = objective.teacher_weights(tuple(config.teacher_weights), len(teachers))
    num_patches = (config.img_size // student_patch) ** 2
    if config.nonfinite not in ("stop", "skip"):
        raise UserError(f"nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
    if aggl:  # statistics summed over the batch in a fixed order: the same on any process layout
        options = dataclasses.replace(
            agglomerative_options(config, steps), sum_rows=parallel.ordered_batch_sum(mesh)
        )
    stages = stage_sizes(config)
    view = view_size(config, stack)

    def init_fn(rng):
        r_params, r_state = jax.random.split(rng)
        images = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
        keep = objective.keep_indices(r_params, 1, num_patches, config.mask_ratio)
        params = student.init(r_params, images, keep)["params"]
        if aggl:
            return StatsTrainState(
                jnp.zeros((), jnp.int32), params, tx.init(params), r_state, agg.init_stats(specs)
            )
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), r_state)

    init_state, state_shardings, abstract_state = sharded_init(init_fn, mesh, config.fsdp_min_size)

    def make_step_fn(px: int):
        """The step at a student input of px (the stage's; img_size without stages)."""
        grid = px // student_patch
        num_patches = grid * grid
        model = student if px == config.img_size else student_at(student, px)
        stage_specs = stage_targets(specs, stack, names, px) if aggl else None

        def step_fn(state: TrainState, teacher_params, batch):
            rng = jax.random.fold_in(state.rng, state.step)
            r_mask, r_drop = jax.random.split(rng)
            pixels = batch["image"]
            keep = objective.keep_indices(r_mask, pixels.shape[0], num_patches, config.mask_ratio)
            if not aggl:  # DMT (METHOD.md 3-7)
                # With keep, each teacher returns only CLS + the visible patches (its last block is cheaper).
                tokens = stack.apply(teacher_params, pixels, keep)
                targets = objective.teacher_targets(tokens, [0] * len(tokens), None, config.target_norm_eps)
                images = objective.normalize_pixels(
                    pixels, objective.IMAGENET_MEAN, objective.IMAGENET_STD, jnp.dtype(config.dtype)
                )
                params_of = lambda params: params

                def loss_of(preds):
                    total, per_teacher = objective.distill_loss(
                        preds,
                        targets,
                        stack.widths,
                        weights,
                        kind=config.loss,
                        beta=config.smooth_l1_beta,
                        cls_weight=config.cls_weight,
                    )
                    return total, {f"loss_teacher_{k}": v for k, v in enumerate(per_teacher)}

            else:  # agglomerative: each teacher on its own grid, targets keyed by name
                keep = keep if config.mask_ratio > 0 else None
                features = agg.stack_features(stack, names, teacher_params, pixels, px=px)
                goal, stats = agg.make_targets(
                    stage_specs,
                    features,
                    state.stats,
                    options,
                    student_grid=(grid, grid),
                    keep=keep,
                    step=state.step,
                )
                images = objective.normalize_pixels(
                    resize_view(pixels, px),
                    objective.IMAGENET_MEAN,
                    objective.IMAGENET_STD,
                    jnp.dtype(config.dtype),
                )
                params_of = lambda params: with_position_table(params, config.img_size // student_patch, grid)
                r_teachers = jax.random.fold_in(rng, 2)  # teacher dropping's own draws

                def loss_of(preds):
                    return agg.objective_loss(
                        stage_specs, preds, goal, r_teachers, options, student_grid=(grid, grid), keep=keep
                    )

            def loss_fn(params):
                variables = {"params": params_of(params)}
                preds = model.apply(variables, images, keep, train=True, rngs={"dropout": r_drop})
                return loss_of(preds)

            (loss, per_teacher), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            params, opt_state, finite, grad_norm = guarded_update(
                tx, grads, loss, state.params, state.opt_state
            )
            metrics = {
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": schedule(state.step),
                "nonfinite": 1 - finite.astype(jnp.int32),
                **per_teacher,
            }
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            if aggl:  # statistics of a non-finite step are not kept either
                new_state = new_state.replace(
                    stats=jax.tree.map(lambda n, o: jnp.where(finite, n, o), stats, state.stats)
                )
            return new_state, metrics

        return step_fn

    names = teacher_names(config)
    teacher_shardings = parallel.tree_shardings(stack.params, mesh, config.fsdp_min_size, skip_leading=1)
    teacher_params = parallel.place_from_host(stack.params, teacher_shardings)
    stack.params = None  # the placed shards are the only copy kept for the run
    batch_shardings = {"image": parallel.batch_sharding(mesh)}

    def compiled(px):
        return jax.jit(
            make_step_fn(px),
            in_shardings=(state_shardings, teacher_shardings, batch_shardings),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )

    if stages:
        step = StagedStep([start for start, _ in stages], [compiled(px) for _, px in stages])
    else:
        step = compiled(config.img_size)
    return Setup(
        config,
        mesh,
        student,
        stack,
        tx,
        schedule,
        steps,
        init_state,
        step,
        state_shardings,
        abstract_state,
        teacher_params,
        # An agglomerative run's teachers by name: listing them in another order is the same run.
        sorted(f"{n}:{f}" for n, f in zip(names, fingerprints, strict=True)) if aggl else fingerprints,
        view,
        specs,
    )


# ---------------------------------------------------------------- the agglomerative objective's parts


def teacher_names(config) -> list[str]:
    return [split_teacher_name(e)[0] for e in config.teachers if e]


def teacher_targets(config, stack) -> tuple[agg.TeacherTarget, ...]:
    """Per teacher (by name): its target widths, read off the shapes of its features, its grid (at the
    student's img_size for a teacher that follows the stages: `stage_targets` gives each stage's), and its
    options (config.agglomerative.per_teacher, defaults for a teacher absent there)."""
    names = teacher_names(config)
    if None in names:
        raise UserError("an agglomerative run names every teacher: --config.teachers=\"('clip=DIR', ...)\"")
    pixels = jax.ShapeDtypeStruct((1, max(stack_sizes(stack)), max(stack_sizes(stack)), 3), jnp.uint8)
    shapes = jax.eval_shape(lambda p, x: agg.stack_features(stack, names, p, x), stack.params, pixels)
    blocks = config.agglomerative.per_teacher
    out = []
    for name, grid in zip(names, stack.grids_at(config.img_size), strict=True):
        o = config_entry(blocks, name, BLOCK_FIELDS)
        f = shapes[name]
        summary = o.summary_head != "none" and f.summary is not None
        samples, width = (
            config.agglomerative.phi_s_steps * config.batch_size,
            f.summary.shape[-1] if summary else 0,
        )
        if summary and o.summary_norm == "phi_s" and samples <= width:
            raise UserError(
                f"teacher {name}: PHI-S of its {width}-wide summary from phi_s_steps x batch_size = "
                f"{samples} images has no full-rank covariance (its transform would not be unique): raise "
                f"--config.agglomerative.phi_s_steps above {width // config.batch_size}"
            )
        out.append(
            agg.TeacherTarget(
                name=name,
                summary_dim=int(f.summary.shape[-1]) if summary else None,
                dense_dim=int(f.patches.shape[-1]) if o.dense_head != "none" else None,
                grid=(grid, grid),
                norm=o.norm,
                summary_norm=o.summary_norm,
                summary_head=o.summary_head,
                dense_head=o.dense_head,
                summary_weight=float(o.summary_weight),
                dense_weight=float(o.dense_weight),
            )
        )
    return tuple(out)


def stack_sizes(stack) -> list[int]:
    return [spec.img_size for spec in stack.specs]


def follow_methods(config, teachers) -> list[str | None]:
    """Per teacher (config order): None, or, for one whose per-teacher block sets follow_stages, the
    interpolation of its position tables: its format's own (the one conversion records), timm's run-time
    resize for a teacher of no format (random, demo)."""
    from dmt_jax import formats
    from dmt_jax.models import resize

    blocks = config.agglomerative.per_teacher
    out = []
    for name, teacher in zip(teacher_names(config), teachers, strict=True):
        spec = teacher.spec
        if not config_entry(blocks, name, BLOCK_FIELDS).follow_stages:
            out.append(None)
            continue
        out.append(formats.resize_method(spec.format, spec.config) or resize.DEFAULT_METHOD[spec.family])
    return out


def stage_targets(specs, stack, names, px: int):
    """The targets at the student's stage px: a teacher following the stages on its grid at px."""
    grids = dict(zip(names, stack.grids_at(px), strict=True))
    return tuple(dataclasses.replace(t, grid=(grids[t.name], grids[t.name])) for t in specs)


def agglomerative_options(config, steps: int) -> agg.Options:
    a = config.agglomerative
    return agg.Options(
        resample=a.resample,
        summary_loss=tuple(float(w) for w in a.summary_loss),
        dense_loss=tuple(float(w) for w in a.dense_loss),
        smooth_l1_beta=float(config.smooth_l1_beta),
        teacher_drop=float(a.teacher_drop),
        norm_eps=float(config.target_norm_eps),
        momentum=tuple(float(m) for m in a.standardize_momentum),
        phi_s_steps=int(a.phi_s_steps),
        total_steps=steps,
    )


def build_agglomerative_student(config, targets) -> agg.AgglomerativeStudent:
    """The ViT with one summary token per teacher that has a summary (then its own registers) and the
    teachers' heads, keyed by name."""
    from dmt_jax.objective.heads import TeacherHeads

    dtype = jnp.dtype(config.dtype)
    s, a = config.student, config.agglomerative
    arch = parse_variant(s.variant)
    encoder = student_encoder(config, agg.student_register_tokens(targets, s.num_reg_tokens))
    hidden = a.head_hidden_dim if a.head_hidden_dim > 0 else arch["width"]
    heads = TeacherHeads(agg.head_specs(targets), hidden, a.head_num_inner, config.head_mlp_ratio, dtype)
    return agg.AgglomerativeStudent(encoder, heads)


def student_at(student, px: int):
    """The student at another input size (a resolution stage): the same parameters but the position table,
    which with_position_table resizes to the stage's grid."""
    return student.clone(encoder=student.encoder.clone(img_size=px))


def with_position_table(params, table_grid: int, grid: int):
    """params with the encoder's position table (kept at img_size's grid) resized to `grid` (bilinear,
    align_corners=False; prefix rows unchanged). Differentiable: the stored table learns through it."""
    if grid == table_grid:
        return params
    pos = params["encoder"]["pos_embed"]
    prefix = pos.shape[1] - table_grid * table_grid
    rows = align.resample(pos[:, prefix:], table_grid, grid).astype(pos.dtype)
    encoder = {**params["encoder"], "pos_embed": jnp.concatenate([pos[:, :prefix], rows], axis=1)}
    return {**params, "encoder": encoder}


def resize_view(pixels, px: int):
    """The input view (view_size) at the student's stage size, resized as TeacherStack resizes it for a
    teacher (bilinear, antialiased)."""
    if pixels.shape[1:3] == (px, px):
        return pixels
    x = jnp.asarray(pixels).astype(jnp.float32)
    return jax.image.resize(x, (x.shape[0], px, px, 3), "bilinear", antialias=True)


def stage_sizes(config) -> tuple[tuple[int, int], ...]:
    """((from step, student px), ...); () without stages (img_size throughout)."""
    return tuple((int(start), int(px)) for start, px in config.stages)


def view_size(config, stack) -> int:
    """The side of the training views the input pipeline gives: what the largest consumer needs (the
    student at its largest stage, or a teacher at its own resolution); each resizes it to its size."""
    if config.objective != "agglomerative":
        return config.img_size
    own = [spec.img_size for spec, follow in zip(stack.specs, stack.follow, strict=True) if not follow]
    return max([config.img_size, *(px for _, px in config.stages), *own])


class StagedStep:
    """The jitted step of each resolution stage (one compile per stage), chosen by the step number.

    Called as the single-stage step is: `step(state, teacher_params, batch)`. It counts the steps itself,
    reading the state's step (one host sync) only when given a state it did not return (the first call,
    a restore), so the loop keeps queueing steps without waiting for the device."""

    def __init__(self, starts: list[int], fns: list):
        self.starts, self.fns = list(starts), list(fns)
        self._last, self._next = None, 0

    def stage_of(self, step: int) -> int:
        return max(i for i, start in enumerate(self.starts) if start <= step)

    def __call__(self, state, teacher_params, batch):
        if state is not self._last:
            self._next = int(state.step)
        state, metrics = self.fns[self.stage_of(self._next)](state, teacher_params, batch)
        self._last, self._next = state, self._next + 1
        return state, metrics

    def lower(self, state, teacher_params, batch):
        """The first stage's program (what a benchmark inspects)."""
        return self.fns[0].lower(state, teacher_params, batch)
