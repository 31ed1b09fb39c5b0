"""The whole agglomerative loss (heads, target normalization, grid matching, per-teacher weights, teacher
dropping) and its gradients against a PyTorch transcription written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_agglomerative_parts import load_torch_head, randomized, rel_err, torch_head

from dmt_jax.models.features import Features
from dmt_jax.objective import agglomerative as agg
from dmt_jax.objective import dropping, hadamard, heads

B, D, HIDDEN, STUDENT_GRID = 16, 32, 48, (8, 8)
TEACHERS = (  # listed out of name order on purpose
    agg.TeacherTarget("sam", None, 12, (16, 16), norm="layernorm", dense_head="ln_linear", dense_weight=2.0),
    agg.TeacherTarget("clip", 8, 24, (4, 4), norm="phi_s", summary_norm="phi_s", dense_weight=0.5),
    agg.TeacherTarget(
        "dino",
        6,
        16,
        (8, 8),
        norm="standardize",
        summary_norm="standardize",
        summary_head="mlp_v1",
        dense_head="mlp_v1",
        summary_weight=0.7,
    ),  # fmt: skip
)
OPTIONS = dict(summary_loss=(0.8, 0.2), dense_loss=(0.9, 0.1), smooth_l1_beta=0.5, teacher_drop=0.5,
               momentum=(0.7, 0.01), phi_s_steps=5, total_steps=10)  # fmt: skip
STEP = 2


def teacher_features(rng, scale=1.0):
    out = {}
    for t in TEACHERS:
        n = t.grid[0] * t.grid[1]
        patches = (rng.standard_normal((B, n, t.dense_dim)) * 2 + 1) * scale
        summary = rng.standard_normal((B, t.summary_dim)) * 3 - 1 if t.summary_dim else None
        out[t.name] = Features(
            prefix=jnp.zeros((B, 0, t.dense_dim)),
            patches=jnp.asarray(patches, jnp.float32),
            summary=None if summary is None else jnp.asarray(summary, jnp.float32),
        )
    return out


def prior_stats(rng):
    """Statistics as after STEP earlier steps: pooled PHI-S estimates, blended running standardization."""
    stats = agg.init_stats(TEACHERS)
    earlier = [teacher_features(rng, scale=1.5) for _ in range(STEP)]
    options = agg.Options(**OPTIONS)
    update = jax.jit(
        lambda s, f, step: agg.make_targets(TEACHERS, f, s, options, student_grid=STUDENT_GRID, step=step)[1]
    )
    for step, feats in enumerate(earlier):
        stats = update(stats, feats, step)
    return stats, earlier


def torch_loss(head_modules, prefix, patches, feats, earlier, stats, keep, keep_fn):
    """The objective as a PyTorch user would write it: RADIO-style heads, PHI-S from torch.cov over every
    sample seen, UNIC's running standardization, F.interpolate, F.cosine_similarity, F.smooth_l1_loss."""
    o = OPTIONS
    m = o["momentum"][1] + 0.5 * (o["momentum"][0] - o["momentum"][1]) * (
        1 + np.cos(np.pi * STEP / o["total_steps"])
    )
    eps, beta = 1e-6, o["smooth_l1_beta"]

    def mixed(pred, target, weights):
        cos = 1 - F.cosine_similarity(pred, target, dim=-1)
        sl1 = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(-1)
        return weights[0] * cos + weights[1] * sl1

    def norm(t, kind, x, seen, s):
        if kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), eps=eps)
        flat = x.reshape(-1, x.shape[-1])
        if kind == "standardize":
            mean = (1 - m) * torch.tensor(np.asarray(s["mean"])) + m * flat.mean(0)
            std = (1 - m) * torch.tensor(np.asarray(s["std"])) + m * (flat.std(0) + eps)
            return (x - mean) / (std + eps)
        every = torch.cat([*(a.reshape(-1, a.shape[-1]) for a in seen), flat]).double()
        mean = every.mean(0)
        e, u = torch.linalg.eigh(torch.cov(every.T))
        e = torch.where(e >= 0, e, torch.zeros_like(e))
        pivot = u[u.abs().argmax(0), torch.arange(u.shape[1])]
        u = u * torch.where(pivot < 0, -1.0, 1.0).double()
        h = torch.tensor(hadamard.hadamard(x.shape[-1]), dtype=torch.float64)
        whiten = (h @ u.T) / e.mean().sqrt()
        return ((x.double() - mean) @ whiten.T).float()

    slots = {name: i for i, name in enumerate(agg.summary_teachers(TEACHERS))}
    per_teacher = []
    for t in sorted(TEACHERS, key=lambda t: t.name):
        f, total = feats[t.name], 0
        if t.summary_dim:
            seen = [_t(e[t.name].summary) for e in earlier]
            target = norm(t, t.summary_norm, _t(f.summary), seen, stats[t.name].get("summary"))
            pred = head_modules[f"{t.name}_summary"](prefix[:, slots[t.name]])
            total = total + t.summary_weight * mixed(pred, target, o["summary_loss"])
        seen = [_t(e[t.name].patches) for e in earlier]
        target = norm(t, t.norm, _t(f.patches), seen, stats[t.name].get("dense"))
        pred = head_modules[f"{t.name}_dense"](patches)
        grid = lambda x, g: x.reshape(B, *g, x.shape[-1]).permute(0, 3, 1, 2)
        flat = lambda x: x.permute(0, 2, 3, 1).reshape(B, -1, x.shape[1])
        if keep is None:  # the student's adapted features to the teacher's grid
            if t.grid != STUDENT_GRID:
                pred = flat(
                    F.interpolate(grid(pred, STUDENT_GRID), size=t.grid, mode="bilinear", align_corners=False)
                )
        else:  # the teacher's to the student's grid, at its visible patches
            if t.grid != STUDENT_GRID:
                target = flat(
                    F.interpolate(
                        grid(target, t.grid), size=STUDENT_GRID, mode="bilinear", align_corners=False
                    )
                )
            target = torch.gather(target, 1, keep[..., None].expand(-1, -1, target.shape[-1]))
        total = total + t.dense_weight * mixed(pred, target, o["dense_loss"]).mean(1)
        per_teacher.append(total)
    losses = torch.stack(per_teacher)  # [K, B]
    c = torch.from_numpy(np.array(keep_fn(losses.detach().numpy())))
    assert (c[losses.argmax(0), torch.arange(B)] == 1).all()  # UNIC: each image keeps its hardest teacher
    return ((c * losses).sum(0) / c.sum(0)).mean()


def _t(x):
    return torch.from_numpy(np.array(x, np.float32))


@pytest.mark.parametrize("masked", [False, True])
def test_agglomerative_loss_and_gradients_match_pytorch(masked):
    rng = np.random.default_rng(0)
    stats, earlier = prior_stats(rng)
    feats = teacher_features(rng)
    n_slots = len(agg.summary_teachers(TEACHERS))
    assert n_slots == 2 and agg.student_register_tokens(TEACHERS, own_registers=2) == 3
    prefix = jnp.asarray(rng.standard_normal((B, n_slots + 2, D)), jnp.float32)
    keep = jnp.asarray(np.stack([rng.permutation(64)[:16] for _ in range(B)]), jnp.int32) if masked else None
    patches = jnp.asarray(rng.standard_normal((B, 16 if masked else 64, D)), jnp.float32)
    options = agg.Options(resample="student_to_teacher", **OPTIONS)
    module = heads.TeacherHeads(agg.head_specs(TEACHERS), hidden_dim=HIDDEN, num_inner=1)
    params = randomized(jax.jit(module.init)(jax.random.PRNGKey(0), prefix, patches)["params"], 3)
    drop_rng = jax.random.PRNGKey(7)

    def loss_fn(p):
        preds = module.apply({"params": p}, prefix, patches)
        targets, new_stats = agg.make_targets(
            TEACHERS, feats, stats, options, student_grid=STUDENT_GRID, keep=keep, step=STEP
        )
        loss, metrics = agg.objective_loss(TEACHERS, preds, targets, drop_rng, options,
                                           student_grid=STUDENT_GRID, keep=keep)  # fmt: skip
        return loss, metrics

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    modules = {}
    for spec in agg.head_specs(TEACHERS):
        for kind, dim in (("summary", spec.summary_dim), ("dense", spec.dense_dim)):
            name = f"{spec.name}_{kind}"
            if name in params:
                head_kind = spec.summary_kind if kind == "summary" else spec.dense_kind
                modules[name] = load_torch_head(torch_head(head_kind, D, HIDDEN, dim, 1), params, name)
    keep_fn = lambda losses: dropping.keep_mask(drop_rng, jnp.asarray(losses), OPTIONS["teacher_drop"])
    t_keep = None if keep is None else torch.from_numpy(np.asarray(keep)).long()
    expected = torch_loss(modules, _t(prefix), _t(patches), feats, earlier, stats, t_keep, keep_fn)
    expected.backward()

    assert rel_err(loss, expected.item()) < 1e-5
    assert set(metrics) >= {"loss_summary/clip", "loss_dense/sam", "teacher_kept/dino"}
    assert "loss_summary/sam" not in metrics
    flat = {"/".join(k): v for k, v in _paths(grads).items()}
    for path, g in flat.items():
        head_name = path.split("/")[0]
        t_param = dict(modules[head_name].named_parameters())[heads.torch_name(path)]
        expected_g = t_param.grad.numpy()
        g = np.asarray(g).T if path.endswith("kernel") else np.asarray(g)
        assert rel_err(g, expected_g) < 1e-4, path


def _paths(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_paths(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out
