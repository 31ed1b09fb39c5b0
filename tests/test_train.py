"""The jitted step: sharded on a 4 x 2 mesh equals one device; checkpoint + resume equals no stop."""

import jax
import numpy as np
import pytest

from dmt_jax import checkpoint, parallel, train
from dmt_jax.config import base_config

BATCH = 16


def tiny_config(**overrides):
    c = base_config()
    c.img_size = 32
    c.student.variant = "mu/4"
    c.student.drop_path = 0.1  # exercises the dropout rng under sharding too
    c.teachers = ("random:mu/4@32:1", "random:mu/8@64:2")
    c.teacher_dtype = c.dtype = "float32"
    c.batch_size = BATCH
    c.total_steps = 20
    c.warmup_steps = 2
    c.base_lr = 1e-2
    c.fsdp_min_size = 1000  # small enough that fsdp really splits the tiny model
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def batches(n):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)} for _ in range(n)]


def run(config, mesh, data, state=None):
    setup = train.build(config, mesh)
    state = setup.init_state(jax.random.PRNGKey(0)) if state is None else state
    losses = []
    for b in data:
        state, metrics = setup.step(state, setup.teacher_params, parallel.global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return setup, state, losses


def without_key_bias(tree):
    """Zeroes the key third of every qkv bias (and of its Adam moments).

    Softmax is invariant to a key bias, so its true gradient is exactly 0; what the backward pass
    gives is rounding noise, which Adam scales up to +-lr. Its values depend on summation order
    and carry no information, so the comparisons leave them out.
    """

    def one(path, x):
        x = np.asarray(x)
        if "qkv" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['bias']"):
            x = x.copy()
            third = x.shape[-1] // 3
            x[..., third : 2 * third] = 0
        return x

    return jax.tree_util.tree_map_with_path(one, jax.device_get(tree))


def max_rel_err(a, b):
    """Largest per-tensor relative error, max|a - b| / max|b|."""
    a, b = without_key_bias(a), without_key_bias(b)
    errs = jax.tree.map(lambda x, y: float(np.abs(x - y).max() / (np.abs(y).max() + 1e-30)), a, b)
    return max(jax.tree.leaves(errs))


def test_sharded_step_equals_single_device():
    assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
    data = batches(3)
    config = tiny_config()
    single = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    _, s1, l1 = run(config, single, data)
    config.mesh.data, config.mesh.fsdp = 4, 2
    mesh = parallel.make_mesh(4, 2)
    setup, s8, l8 = run(config, mesh, data)
    # The state really is laid out over the mesh: fsdp splits the large kernels.
    qkv = s8.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert "fsdp" in str(qkv.sharding.spec)
    assert len(qkv.addressable_shards) == 8
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    assert int(s8.step) == 3
    assert max_rel_err(s8.params, s1.params) < 1e-5
    assert max_rel_err(s8.opt_state, s1.opt_state) < 1e-5


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    data = batches(5)
    config = tiny_config()
    mesh = parallel.make_mesh(4, 2)
    _, reference, _ = run(config, mesh, data)

    setup, state, _ = run(config, mesh, data[:2])
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    assert ckpt.save(2, state, {"next_index": 2 * BATCH, "bad_images": 0, "global_batch": BATCH})
    ckpt.close()
    del state
    # Restore onto another mesh (elastic): 8 devices -> 2.
    config.mesh.data, config.mesh.fsdp = 2, 1
    small = parallel.make_mesh(2, 1, devices=jax.devices()[:2])
    setup = train.build(config, small)
    restored, data_item = checkpoint.Checkpointer(str(tmp_path / "ckpt")).restore_latest(setup.abstract_state)
    assert int(restored.step) == 2
    assert data_item["next_index"] == [2 * BATCH]
    assert restored.params["encoder"]["pos_embed"].sharding.mesh.devices.size == 2
    _, resumed, _ = run(config, small, data[2:], state=restored)
    assert max_rel_err(resumed.params, reference.params) < 1e-5


def test_nonfinite_step_leaves_parameters_untouched():
    config = tiny_config(base_lr=1e30)  # the first real update overflows
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    setup = train.build(config, mesh)
    state = setup.init_state(jax.random.PRNGKey(0))
    seen = []
    for b in batches(6):
        before = jax.device_get(state.params)
        state, m = setup.step(state, setup.teacher_params, parallel.global_batch(b, mesh))
        if int(m["nonfinite"]):
            after = jax.device_get(state.params)
            assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), before, after))
        seen.append(int(m["nonfinite"]))
    assert any(seen), "the huge learning rate should have produced a non-finite step"
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


# Each head and each loss once (their numerics are checked against PyTorch in test_objective.py).
@pytest.mark.parametrize("head,loss", [("linear", "smooth_l1"), ("ln_linear", "mse"), ("mlp", "cosine")])
def test_heads_and_losses_train(head, loss):
    config = tiny_config(head=head, loss=loss)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    data = batches(1) * 8
    _, _, losses = run(config, mesh, data)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
