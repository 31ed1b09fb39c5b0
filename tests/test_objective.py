"""The DMT objective against an independent PyTorch computation (timm blocks, torch losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from dmt_jax import export, objective, train
from dmt_jax.config import base_config

B, IMG, PATCH = 3, 32, 4
N = (IMG // PATCH) ** 2
WIDTHS, REGS = (48, 80), (0, 4)  # two teachers of different widths, the second with registers


def randomized(params, seed):
    """Random values everywhere (LayerNorm scales and biases too): defaults hide swapped tensors."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def torch_objective(sd, heads, images, keep, tokens, cfg, weights):
    """What a PyTorch user would write: timm ViT on the visible tokens, LN+Linear heads, F.* losses."""
    vit = timm.models.vision_transformer.VisionTransformer(**export.timm_model_kwargs(sd))
    vit.load_state_dict({k: _t(v) for k, v in sd.items()}, strict=True)
    x = _t(images).permute(0, 3, 1, 2)
    keep = torch.from_numpy(np.array(keep)).long()
    t = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    t = torch.gather(t, 1, keep[..., None].expand(-1, -1, t.shape[-1]))
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
    feats = vit.norm(vit.blocks(torch.cat([cls, t], 1)))
    losses = []
    for k, (width, regs) in enumerate(zip(WIDTHS, REGS, strict=True)):
        norm, out = heads[f"head_{k}_norm"], heads[f"head_{k}_out"]
        y = F.layer_norm(feats, (feats.shape[-1],), _t(norm["scale"]), _t(norm["bias"]), eps=1e-6)
        pred = y @ _t(out["kernel"]) + _t(out["bias"])
        tok = _t(tokens[k])
        patches = torch.gather(tok[:, 1 + regs :], 1, keep[..., None].expand(-1, -1, width))
        target = F.layer_norm(torch.cat([tok[:, :1], patches], 1), (width,), eps=cfg.target_norm_eps)
        if cfg.loss == "smooth_l1":
            per_token = F.smooth_l1_loss(pred, target, beta=cfg.smooth_l1_beta, reduction="none").mean(-1)
        elif cfg.loss == "mse":
            per_token = F.mse_loss(pred, target, reduction="none").mean(-1)
        else:
            per_token = 1 - F.cosine_similarity(pred, target, dim=-1)
        if cfg.cls_weight < 0:
            losses.append(per_token.mean())
        else:
            losses.append(
                cfg.cls_weight * per_token[:, 0].mean() + (1 - cfg.cls_weight) * per_token[:, 1:].mean()
            )
    total = sum(w * loss for w, loss in zip(weights, losses, strict=True))
    total.backward()
    grads = {k: p.grad.numpy() for k, p in vit.named_parameters()}
    return total.item(), [x.item() for x in losses], grads


def _t(x):
    return torch.from_numpy(np.array(x, np.float32))  # a writable copy


@pytest.mark.parametrize(
    "loss,cls_weight,weights",
    [("smooth_l1", -1.0, ()), ("smooth_l1", 0.3, (2.0, 1.0)), ("mse", -1.0, ()), ("cosine", 0.5, (1.0, 3.0))],
)
def test_objective_matches_pytorch(loss, cls_weight, weights):
    cfg = base_config()
    cfg.img_size, cfg.student.variant, cfg.dtype = IMG, f"mu/{PATCH}", "float32"
    cfg.student.pos_embed = "learned"
    cfg.loss, cfg.cls_weight, cfg.smooth_l1_beta = loss, cls_weight, 0.5
    weights = objective.teacher_weights(weights, len(WIDTHS))
    student = train.build_student(cfg, WIDTHS)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((B, IMG, IMG, 3)), jnp.float32)
    keep = objective.keep_indices(jax.random.PRNGKey(1), B, N, 0.75)
    params = randomized(student.init(jax.random.PRNGKey(0), images, keep)["params"], 2)
    tokens = [
        jnp.asarray(3 * rng.standard_normal((B, 1 + r + N, w)) + 1, jnp.float32)
        for w, r in zip(WIDTHS, REGS, strict=True)
    ]

    def jax_loss(p):
        targets = objective.teacher_targets(tokens, REGS, keep, cfg.target_norm_eps)
        preds = student.apply({"params": p}, images, keep)
        return objective.distill_loss(
            preds, targets, WIDTHS, weights, kind=loss, beta=cfg.smooth_l1_beta, cls_weight=cls_weight
        )

    (total, per_teacher), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
    sd = export.timm_state_dict(params["encoder"])
    t_total, t_per_teacher, t_grads = torch_objective(sd, params["heads"], images, keep, tokens, cfg, weights)

    np.testing.assert_allclose(float(total), t_total, rtol=1e-5)
    np.testing.assert_allclose([float(x) for x in per_teacher], t_per_teacher, rtol=1e-5)
    g = export.timm_state_dict(grads["encoder"])  # the same name table maps gradients
    for name in (
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
        "norm.weight",
    ):
        err = np.linalg.norm(g[name] - t_grads[name]) / np.linalg.norm(t_grads[name])
        assert err < 1e-5, (name, err)


def test_keep_indices_are_distinct_and_random_per_image():
    keep = np.asarray(objective.keep_indices(jax.random.PRNGKey(0), 4, 196, 0.75))
    assert keep.shape == (4, 49)
    assert all(len(set(row)) == 49 for row in keep)
    assert not np.array_equal(keep[0], keep[1])
    full = np.asarray(objective.keep_indices(jax.random.PRNGKey(0), 2, 16, 0.0))
    np.testing.assert_array_equal(full, np.tile(np.arange(16), (2, 1)))


def test_targets_drop_registers_and_are_normalized():
    tokens = [jnp.arange(2 * (1 + 4 + 9) * 8, dtype=jnp.float32).reshape(2, 14, 8) ** 1.5]
    keep = jnp.array([[0, 5], [8, 1]])
    t = np.asarray(objective.teacher_targets(tokens, [4], keep, 1e-6))
    assert t.shape == (2, 3, 8)
    np.testing.assert_allclose(t.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(t.std(-1), 1, rtol=1e-3)
    raw = np.asarray(tokens[0])
    expected = raw[1, 1 + 4 + 1]  # image 1, second kept patch (patch 1), after CLS and 4 registers
    np.testing.assert_allclose(t[1, 2], (expected - expected.mean()) / expected.std(), rtol=1e-4)
