"""Fine-tuning's inputs get the distillation's scrutiny: the validation pass (fields against each other,
the init, the workdir), the classes against the data, the init reader (what a source says about itself
against its tensors, only finished checkpoints, a damaged newest one, NaN weights), and eval.jsonl's
torn last line. In process, no training."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_run import REPO

from dmt_jax import checkpoint, runner, validate
from dmt_jax import config as config_lib
from dmt_jax.errors import UserError
from dmt_jax.export import export_timm
from dmt_jax.finetune import cli, loop, pretrained
from dmt_jax.teachers import make_random_teacher


def _recipe(**fields):
    import runpy

    config = runpy.run_path(str(REPO / "configs" / "finetune_demo.py"))["get_config"]()
    for dotted, value in fields.items():
        *parents, leaf = dotted.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def test_the_fields_are_checked_against_each_other():
    config = _recipe(img_size=30, min_lr=1.0, total_steps=10, profile_steps=(2, 12))
    problems = validate.config_problems(
        config, config_lib.FINETUNE_SCHEMA, consistency=config_lib.finetune_consistency_problems
    )
    assert problems == [
        "--config.img_size=30 is not a multiple of the model's patch size 4 (mu/4)",
        "--config.min_lr=1.0 is above the peak lr base_lr * batch_size / 256",
        "--config.profile_steps=(2, 12) ends after total_steps=10",
    ]


def test_an_init_that_is_the_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = _recipe(init=str(workdir), data__demo_root=str(tmp_path / "demo"))
    with pytest.raises(UserError, match=r"--config.init is the --workdir \(.*\): a fine-tuning writes"):
        cli.check_run(config, str(workdir) + "/")


class _Source:
    def __init__(self, labels, names):
        self.labels, self.class_names, self.num_classes = np.asarray(labels), names, len(names)


def test_classes_are_checked_against_the_data(capsys):
    train = _Source([0, 1, 1, 2], ["cat", "dog", "owl", "yak"])  # the shared class list: 4 classes
    val = _Source([0, 3, 3], ["cat", "dog", "owl", "yak"])
    with pytest.raises(UserError, match=r"num_classes=3 but the training data has 4 classes .*num_classes=4"):
        loop.classes_of(_recipe(num_classes=3), train, val)
    assert loop.classes_of(_recipe(num_classes=-1), train, val) == 4
    assert "the validation split has 1 class(es) with no training image: yak" in capsys.readouterr().out


def test_top5_is_not_reported_for_five_classes_or_fewer(monkeypatch):
    labels = np.array([0, 1, 5, 7] * 2)  # 0 and 1 are first, 5 and 7 never in the top 5 of arange(5)
    batches = [{"image": np.zeros((8, 8, 8, 3), np.uint8), "label": labels, "valid": np.ones(8, bool)}]
    monkeypatch.setattr(runner, "eval_batches", lambda *args: batches)
    mesh = jax.make_mesh((len(jax.devices()) // 2, 2), ("data", "fsdp"))
    for classes, keys in ((5, ["top1"]), (6, ["top1", "top5"])):
        predict = jax.jit(lambda params, pixels: jnp.tile(jnp.arange(5), (pixels.shape[0], 1)))
        setup = types.SimpleNamespace(config=None, predict=predict, mesh=mesh, num_classes=classes)
        out = loop.top1_top5(setup, None, {})
        assert sorted(out) == keys and out["top1"] == 25.0 and out.get("top5", 50.0) == 50.0


def _student_file(path, **metadata):
    """A random mu/4 student as student_timm.safetensors, its timm_kwargs metadata replaced by `metadata`."""
    from safetensors.numpy import load_file, save_file

    export_timm(make_random_teacher("mu/4", 32, seed=3).params, path, overwrite=True)
    state = load_file(str(path))
    save_file(state, str(path), metadata={"timm_kwargs": json.dumps(metadata)})
    return state


def test_the_init_reader_checks_what_a_file_says_against_its_tensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "student_timm.safetensors"
    _student_file(path, embed_dim=64, depth=2, num_heads=2)
    assert pretrained.load_pretrained(str(path)).num_heads == 2
    _student_file(path, embed_dim=64, depth=2, num_heads=3)  # a lie: 3 heads cannot split 64 channels
    with pytest.raises(UserError, match="num_heads=3, which does not divide its width 64"):
        pretrained.load_pretrained(str(path))
    _student_file(path, embed_dim=768, depth=12)
    with pytest.raises(UserError, match="embed_dim=768 but its tensors have embed_dim 64; .*depth=12"):
        pretrained.load_pretrained(str(path))
    state = _student_file(path)
    state["blocks.1.mlp.fc1.weight"][0, 0] = np.nan
    save_file(state, str(path))
    with pytest.raises(UserError, match=r"tensors holding NaN or Inf: blocks\.1\.mlp\.fc1\.weight"):
        pretrained.load_pretrained(str(path))
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        pretrained.load_pretrained(str(path))


def test_the_init_reader_takes_only_finished_readable_checkpoints(tmp_path, capsys):
    """A distillation workdir: step 3 is still being written (orbax's temporary folder), step 2 is damaged,
    step 1 is read; its config.json must agree with the tensors."""
    workdir = tmp_path / "distilled"
    encoders = {s: make_random_teacher("mu/4", 32, seed=s).params for s in (1, 2)}
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=5)
    position = {"next_index": 0, "bad_images": 0, "global_batch": 8}
    for step, encoder in encoders.items():
        assert ckpt.save(step, {"params": {"encoder": encoder}}, position)
    ckpt.close()
    (workdir / "checkpoints" / f"3{checkpoint.TMP_MARKER}-1").mkdir()
    for f in (workdir / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (workdir / "config.json").write_text(json.dumps({"student": {"variant": "mu/4"}}))

    loaded = pretrained.load_pretrained(str(workdir))
    assert "its checkpoint at step 2 is unreadable" in capsys.readouterr().out
    assert loaded.source == "its student at step 1"
    got = jax.tree.leaves(loaded.params)
    assert all(np.array_equal(a, b) for a, b in zip(got, jax.tree.leaves(encoders[1]), strict=True))
    (workdir / "config.json").write_text(json.dumps({"student": {"variant": "Ti/4"}}))  # says 192 wide
    with pytest.raises(UserError, match="its metadata says embed_dim=192 but its tensors have embed_dim 64"):
        pretrained.load_pretrained(str(workdir))


def test_a_torn_last_line_of_eval_jsonl_is_dropped(tmp_path):
    from dmt_jax import storage

    path = storage.path(tmp_path / "eval.jsonl")
    lines = [{"step": 4, "top1": 10.0, "best_top1": 10.0, "best_step": 4}, {"step": 8, "top1": 20.0}]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 12, "to')
    assert loop.read_evaluations(path, upto=8) == (lines, True)
    assert loop.read_evaluations(path, upto=4) == (lines[:1], True)  # step 8 is trained again
