"""Only a damaged checkpoint is set aside at restart; a storage outage, an out-of-memory or a changed
model stops the run (RestoreFailed, exit 1 with its traceback) and moves nothing."""

import jax
import jax.numpy as jnp
import pytest
from helpers_run import checkpoint_steps

from dmt_jax import checkpoint

POSITION = {"next_index": 0, "bad_images": 0, "global_batch": 8}


@pytest.fixture
def two_checkpoints(tmp_path):
    state = {"w": jnp.arange(64.0)}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.save(1, state, POSITION) and ckpt.save(2, state, POSITION)
    ckpt.close()
    return tmp_path, state


@pytest.mark.parametrize(
    "error",
    [
        ValueError("UNAVAILABLE: Error reading gs://bucket/run/checkpoints/2: connection reset"),
        ValueError("RESOURCE_EXHAUSTED: out of memory while allocating 4 GiB"),
        MemoryError(),
        PermissionError(13, "Permission denied"),
    ],
    ids=["unavailable", "resource_exhausted", "memory", "permission"],
)
def test_errors_that_are_not_damage_stop_and_move_nothing(two_checkpoints, monkeypatch, error):
    tmp_path, state = two_checkpoints
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))

    def failing_restore(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt.manager, "restore", failing_restore)
    with pytest.raises(checkpoint.RestoreFailed, match="at step 2 .*nothing was moved") as raised:
        ckpt.restore_latest(state)
    assert raised.value.__cause__ is error  # the traceback shows the real cause
    assert checkpoint_steps(tmp_path) == [1, 2]
    assert not (tmp_path / "checkpoints_unreadable").exists()
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_changed_model_is_not_damage(two_checkpoints):
    tmp_path, _ = two_checkpoints
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    bigger = {"w": jax.ShapeDtypeStruct((128,), jnp.float32, sharding=one_device)}
    with pytest.raises(checkpoint.RestoreFailed, match="config changed"):
        ckpt.restore_latest(bigger)
    assert checkpoint_steps(tmp_path) == [1, 2]
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_files_are_damage(two_checkpoints, capsys):
    tmp_path, state = two_checkpoints
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    restored, _ = ckpt.restore_latest(state)
    assert jnp.array_equal(restored["w"], state["w"])
    assert "checkpoint at step 2" in capsys.readouterr().out
    assert checkpoint_steps(tmp_path) == [1]
    assert len(list((tmp_path / "checkpoints_unreadable").iterdir())) == 1
    ckpt.close()
