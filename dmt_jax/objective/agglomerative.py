"""The agglomerative objective (AM-RADIO, RADIOv2.5, UNIC, Theia): per teacher, a summary target and
dense targets on its own grid, keyed by teacher name.

    targets, stats = make_targets(teachers, features, stats, options, student_grid=..., keep=..., step=...)
    preds = student.apply(params, images, keep)          # AgglomerativeStudent
    loss, metrics = objective_loss(teachers, preds, targets, rng, options, student_grid=...)

- The student carries one summary token per teacher that has a summary (RADIO keeps one CLS token per
  teacher): the ViT's CLS token is the first teacher's (in name order), its first register tokens the
  others', then its own registers. A summary head (an MLP) maps a teacher's token to its summary;
  cosine loss by default.
- A dense head per teacher on the student's patch tokens. Grids are matched by bilinear resampling
  (objective/align.py): the student's adapted features to the teacher's grid (resample =
  'student_to_teacher', RADIO) or the teacher's features to the student's ('teacher_to_student'),
  which is what a masked student (mask_ratio > 0) always gets: the comparison then happens at its
  visible tokens.
- Targets are normalized per teacher (objective/normalize.py), statistics in the train state.
- Per image and teacher: summary_weight * summary loss + dense_weight * dense loss; teachers dropped
  per image (objective/dropping.py), averaged over teachers and images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmt_jax.models.features import Features
from dmt_jax.models.vit import ViT
from dmt_jax.objective import align, dropping, losses, normalize
from dmt_jax.objective.heads import HeadSpec, TeacherHeads

RESAMPLE = ("student_to_teacher", "teacher_to_student")


@dataclasses.dataclass(frozen=True)
class TeacherTarget:
    """What the objective needs to know of one teacher (hashable: a static part of the step)."""

    name: str
    summary_dim: int | None  # None: no summary target (a teacher without one, as SAM, or not wanted)
    dense_dim: int | None  # None: no dense target
    grid: tuple[int, int]  # the teacher's patch grid (rows, columns)
    norm: str = "none"  # of the dense targets: normalize.KINDS
    summary_norm: str = "none"  # of the summary target
    summary_head: str = "mlp_v2"  # heads.KINDS
    dense_head: str = "mlp_v2"
    summary_weight: float = 1.0
    dense_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Options:
    """The objective's options that are not per teacher."""

    resample: str = "student_to_teacher"
    summary_loss: tuple[float, float] = (1.0, 0.0)  # (cosine, smooth-L1) weights
    dense_loss: tuple[float, float] = (0.9, 0.1)
    smooth_l1_beta: float = 1.0
    teacher_drop: float = 0.0
    norm_eps: float = 1e-6
    momentum: tuple[float, float] = (1.0, 0.001)  # standardize's EMA momentum, start -> end (cosine)
    phi_s_steps: int = 100
    total_steps: int = 1
    sum_rows: Any = None  # how statistics sum over the global batch (normalize.normalize)


def sorted_teachers(teachers) -> tuple[TeacherTarget, ...]:
    """Name order: slots, heads and metrics never depend on the order the teachers were listed in."""
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    return tuple(sorted(teachers, key=lambda t: t.name))


def summary_teachers(teachers) -> tuple[str, ...]:
    """Names of the teachers with a summary target, in name order: teacher i reads prefix token i."""
    return tuple(t.name for t in sorted_teachers(teachers) if t.summary_dim)


def head_specs(teachers) -> tuple[HeadSpec, ...]:
    slots = {name: i for i, name in enumerate(summary_teachers(teachers))}
    return tuple(
        HeadSpec(
            name=t.name,
            summary_kind=t.summary_head if t.summary_dim else None,
            summary_dim=t.summary_dim or 0,
            dense_kind=t.dense_head if t.dense_dim else None,
            dense_dim=t.dense_dim or 0,
            token_slot=slots.get(t.name, 0),
        )
        for t in sorted_teachers(teachers)
    )


def student_register_tokens(teachers, own_registers: int) -> int:
    """The ViT's num_reg_tokens: the summary tokens beyond its CLS token, then its own registers."""
    return max(len(summary_teachers(teachers)) - 1, 0) + own_registers


class AgglomerativeStudent(nn.Module):
    """A ViT whose prefix tokens carry one summary token per teacher, and the teachers' heads.

    __call__(images, keep) -> {teacher: {"summary": [B, S_t], "dense": [B, n, D_t]}} on the student's
    grid (its visible patches when keep is given). `backbone` gives the encoder's tokens for evaluation."""

    encoder: ViT
    heads: TeacherHeads

    def __call__(self, images, keep=None, train: bool = False):
        tokens = self.encoder(images, keep, train=train)
        prefix = self.encoder.num_prefix_tokens
        return self.heads(tokens[:, :prefix], tokens[:, prefix:])


def init_stats(teachers) -> dict:
    """{teacher: {"summary": stats, "dense": stats}} of every normalization that keeps statistics."""
    out = {}
    for t in sorted_teachers(teachers):
        one = {}
        if t.summary_dim and (s := normalize.init_stats(t.summary_norm, t.summary_dim)):
            one["summary"] = s
        if t.dense_dim and (s := normalize.init_stats(t.norm, t.dense_dim)):
            one["dense"] = s
        out[t.name] = one
    return out


def make_targets(
    teachers,
    features: dict[str, Features],
    stats: dict,
    options: Options,
    *,
    student_grid,
    keep=None,
    step=0,
    update: bool = True,
) -> tuple[dict, dict]:
    """Teachers' features -> ({teacher: {"summary": [B, S], "dense": [B, T, D]}}, new stats), float32,
    without gradient. Dense targets are on the teacher's grid, or on the student's (at its visible
    patches `keep` [B, n]) when the teacher's features go to the student's grid."""
    momentum = normalize.momentum_at(step, options.total_steps, options.momentum)
    kw = dict(eps=options.norm_eps, momentum=momentum, phi_s_steps=options.phi_s_steps, update=update,
              sum_rows=options.sum_rows)  # fmt: skip
    targets, new_stats = {}, {}
    for t in sorted_teachers(teachers):
        f, s, one = features[t.name], dict(stats.get(t.name, {})), {}
        if t.summary_dim:
            if f.summary is None:
                raise ValueError(f"teacher {t.name!r} has no summary: give it no summary target")
            one["summary"], s_new = normalize.normalize(t.summary_norm, f.summary, s.get("summary", {}), **kw)
            if s_new:
                s["summary"] = s_new
        if t.dense_dim:
            dense, s_new = normalize.normalize(t.norm, f.patches, s.get("dense", {}), **kw)
            if s_new:
                s["dense"] = s_new
            if _on_student_grid(t, options, keep):
                dense = align.gather(align.resample(dense, t.grid, student_grid), keep)
            one["dense"] = dense
        targets[t.name], new_stats[t.name] = one, s
    return jax.lax.stop_gradient(targets), new_stats


def _on_student_grid(t: TeacherTarget, options: Options, keep) -> bool:
    return keep is not None or options.resample == "teacher_to_student"


def per_image_losses(teachers, preds: dict, targets: dict, options: Options, *, student_grid, keep=None):
    """{teacher: {"summary": [B], "dense": [B]}}: each target kind's loss per image (tokens averaged)."""
    out = {}
    for t in sorted_teachers(teachers):
        p, y, one = preds[t.name], targets[t.name], {}
        if t.summary_dim:
            one["summary"] = losses.mixed(
                p["summary"], y["summary"], *options.summary_loss, options.smooth_l1_beta
            )
        if t.dense_dim:
            dense = p["dense"]
            if not _on_student_grid(t, options, keep):
                dense = align.resample(dense, student_grid, t.grid)
            per_token = losses.mixed(dense, y["dense"], *options.dense_loss, options.smooth_l1_beta)
            one["dense"] = per_token.mean(-1)
        out[t.name] = one
    return out


def objective_loss(teachers, preds: dict, targets: dict, rng, options: Options, *, student_grid, keep=None):
    """(scalar loss, metrics by name): per image and teacher, summary_weight * summary loss +
    dense_weight * dense loss; teachers dropped per image (teacher_drop), averaged over teachers
    and images."""
    ordered = sorted_teachers(teachers)
    parts = per_image_losses(ordered, preds, targets, options, student_grid=student_grid, keep=keep)
    per_teacher = []
    metrics: dict[str, Any] = {}
    for t in ordered:
        total = 0.0
        for kind, weight in (("summary", t.summary_weight), ("dense", t.dense_weight)):
            if kind in parts[t.name]:
                total = total + weight * parts[t.name][kind]
                metrics[f"loss_{kind}/{t.name}"] = parts[t.name][kind].mean()
        per_teacher.append(jnp.broadcast_to(jnp.asarray(total, jnp.float32), (_batch(parts),)))
    stacked = jnp.stack(per_teacher)  # [K, B]
    keep_mask = dropping.keep_mask(rng, stacked, options.teacher_drop)
    if options.teacher_drop > 0:
        for t, kept in zip(ordered, keep_mask, strict=True):
            metrics[f"teacher_kept/{t.name}"] = kept.mean()
    return dropping.combine(stacked, keep_mask), metrics


def _batch(parts: dict) -> int:
    return next(v.shape[0] for one in parts.values() for v in one.values())


def stack_features(stack, names, params, pixels, px: int | None = None) -> dict[str, Features]:
    """The teachers' Features (TeacherStack.features: each at its own resolution and input rule, or at the
    student's px for one that follows the stages), by name."""
    return dict(zip(names, stack.features(params, pixels, px), strict=True))
