"""Mixup/CutMix (dmt_jax/mixup.py): timm's statistics on one batch, and within each device's shard on a
mesh: the compiled fine-tuning step holds no collective-permute (a global flip would)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dmt_jax import mixup, parallel
from dmt_jax.config import finetune_base_config


def _smooth_one_hot(labels, classes, smoothing):
    return jax.nn.one_hot(labels, classes) * (1.0 - smoothing) + smoothing / classes


@pytest.mark.parametrize("use_cutmix, lam", [(False, 0.3), (True, 0.6)])
def test_mixup_and_cutmix_equal_timm(use_cutmix, lam):
    from timm.data.mixup import Mixup, cutmix_bbox_and_lam

    n, h, w, classes, smoothing = 6, 12, 10, 5, 0.1
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, h, w, 3)).astype(np.uint8)  # uint8, as the step gets them
    labels = rng.integers(0, classes, n)

    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=classes)
    mix._params_per_batch = lambda: (lam, use_cutmix)  # the fixed lambda and kind
    np.random.seed(1)  # timm draws the box with np.random
    x = torch.from_numpy(pixels.astype(np.float32).transpose(0, 3, 1, 2).copy())
    want_x, want_y = mix(x, torch.from_numpy(labels))
    np.random.seed(1)
    box, lam_box = cutmix_bbox_and_lam((n, 3, h, w), lam, correct_lam=True)
    used_lam = lam_box if use_cutmix else lam

    targets = _smooth_one_hot(labels, classes, smoothing)
    got_x, got_y = mixup.mix_batch(jnp.asarray(pixels), targets, used_lam, box, jnp.asarray(use_cutmix))
    assert got_x.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_x), want_x.numpy().transpose(0, 2, 3, 1), atol=1e-6 * 255)
    np.testing.assert_allclose(np.asarray(got_y), want_y.numpy(), atol=1e-6)
    if use_cutmix:
        assert not np.array_equal(np.asarray(got_x), pixels)  # the box is not empty: the test means something


def test_sampled_cutmix_lambda_is_the_box_area():
    config = finetune_base_config()
    config.mixup_switch_prob = 1.0  # always CutMix
    for seed in range(5):
        lam, box, use_cutmix = mixup.sample_mix(jax.random.PRNGKey(seed), config, 32, 24)
        area = (int(box[1]) - int(box[0])) * (int(box[3]) - int(box[2]))
        assert bool(use_cutmix) and float(lam) == pytest.approx(1 - area / (32 * 24))


def test_each_shard_is_mixed_with_itself_and_its_own_draw():
    mesh = parallel.make_mesh(4, 2)
    config = finetune_base_config()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8)
    targets = _smooth_one_hot(rng.integers(0, 7, 16), 7, 0.1)
    key = jax.random.PRNGKey(5)
    sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
    mix = jax.jit(lambda k, x, y: mixup.mix_per_shard(k, config, x, y, mesh))
    got_x, got_y = mix(key, jax.device_put(pixels, sharding), jax.device_put(targets, sharding))
    draws = set()
    for shard in range(8):  # 2 rows per device, in mesh order
        rows = slice(2 * shard, 2 * shard + 2)
        lam, box, use_cutmix = mixup.sample_mix(jax.random.fold_in(key, shard), config, 8, 8)
        want_x, want_y = mixup.mix_batch(jnp.asarray(pixels[rows]), targets[rows], lam, box, use_cutmix)
        np.testing.assert_allclose(np.asarray(got_x)[rows], want_x, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got_y)[rows], want_y, rtol=1e-6)
        draws.add(float(lam))
    assert len(draws) > 1  # each shard its own lambda


def _finetune_step_text(mix_fn):
    """The compiled text of the fine-tuning step on a 4 x 2 mesh, with `mix_fn` as mixup.mix_per_shard."""
    from dmt_jax import finetune

    config = finetune_base_config()
    config.model.variant, config.img_size, config.batch_size, config.total_steps = "mu/4", 16, 16, 2
    config.dtype = "float32"
    config.fsdp_min_size = 1 << 30  # parameters replicated: FSDP's own collectives are not the question here
    mesh = parallel.make_mesh(4, 2)
    original = mixup.mix_per_shard
    mixup.mix_per_shard = mix_fn
    try:
        setup = finetune.build(config, mesh, num_train_examples=64, num_classes=10)
        state = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
        batch = {
            "image": jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct((16,), jnp.int32),
        }
        return setup.step.lower(state, batch).compile().as_text()
    finally:
        mixup.mix_per_shard = original


def test_compiled_step_mixes_without_a_collective_permute():
    assert "collective-permute" not in _finetune_step_text(mixup.mix_per_shard)

    def global_flip(rng, config, pixels, targets, mesh):  # the old way: the global batch's mirror image
        lam, box, use_cutmix = mixup.sample_mix(rng, config, *pixels.shape[1:3])
        return mixup.mix_batch(pixels, targets, lam, box, use_cutmix)

    assert "collective-permute" in _finetune_step_text(global_flip)  # the check can fail
