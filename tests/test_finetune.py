"""Fine-tuning (dmt_jax/finetune/) against independent references: timm's layer-decay parameter
groups, timm loading and running the exported classifier; and exact resume
after SIGKILL (tests/helpers_run.py, as tests/test_resilience.py); the protections both loops share
(runner.py): the workdir lock, the resume check, a stop while waiting for input."""

import json
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm  # before TensorFlow (imported by dmt_jax.finetune): the other order can crash torchvision
import torch
from helpers_run import Run, checkpoint_steps, finetune_args, finetune_config, read_state, trees_equal

from dmt_jax import finetune, formats
from dmt_jax.config import finetune_base_config
from dmt_jax.errors import UserError
from dmt_jax.models.vit import ViT
from dmt_jax.train import decay_mask


def _classifier(variant: str, img_size: int, num_classes: int, global_pool: str = "avg", std=2e-5):
    encoder = ViT.from_variant(variant, img_size=img_size, final_norm=global_pool == "token")
    return finetune.Classifier(encoder, num_classes, global_pool, std)


def _flax_name(timm_name: str) -> str:
    """timm name -> Flax path of the classifier, through the export name table and HEAD_NAMES."""
    for t, f, _ in finetune.HEAD_NAMES:
        if t == timm_name:
            return f
    (flax_name,) = formats.timm_to_flax({timm_name: np.zeros((1, 1, 1, 1))})
    return "encoder/" + flax_name


TIMM_VITS = [("Ti/16", "vit_tiny_patch16_224", 0.85), ("S/16", "vit_small_patch16_224", 0.75)]
TIMM_VITS += [("B/16", "vit_base_patch16_224", 0.65)]


@pytest.mark.parametrize("variant, timm_name, decay", TIMM_VITS)
def test_layer_decay_equals_timm_param_groups(variant, timm_name, decay):
    from timm.optim import param_groups_layer_decay

    model = timm.create_model(timm_name, pretrained=False, num_classes=10, global_pool="avg")
    # as timm.optim.create_optimizer_v2 calls it
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    want = {
        _flax_name(names[id(p)]): (g["lr_scale"], g["weight_decay"] > 0) for g in groups for p in g["params"]
    }

    params = jax.eval_shape(
        lambda: _classifier(variant, 224, 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))[
            "params"
        ]
    )
    scales = flax.traverse_util.flatten_dict(finetune.layer_lr_scales(params, 12, decay), sep="/")
    decays = flax.traverse_util.flatten_dict(decay_mask(params), sep="/")
    assert sorted(scales) == sorted(want)  # the same parameters, one by one
    for name, (scale, decayed) in want.items():
        assert scales[name] == pytest.approx(scale, rel=1e-12), name
        assert decays[name] == decayed, name


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_exported_classifier_runs_in_timm_with_the_same_logits(tmp_path, global_pool):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = _classifier("mu/4", 32, 7, global_pool, std=0.02)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(0), images)["params"]
    params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    path = tmp_path / "classifier.safetensors"
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    kwargs = finetune.export_classifier(model, params, path, img_size=32, mean=mean, std=std, crop_pct=0.9)

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["timm_kwargs"]) == kwargs
    cfg = json.loads(meta["pretrained_cfg"])
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 0.9 and cfg["num_classes"] == 7
    assert cfg["mean"] == list(mean) and cfg["std"] == list(std)
    timm_model = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    timm_model.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        want = timm_model(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(model.apply({"params": params}, images))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_init_from_a_student_file_and_a_teacher_directory(tmp_path):
    from dmt_jax.export import export_timm
    from dmt_jax.teachers import flatten_params, make_random_teacher, save_teacher

    teacher = make_random_teacher("mu/4", 32, seed=3)
    export_timm(teacher.params, tmp_path / "student_timm.safetensors")
    save_teacher(tmp_path / "teacher", teacher.spec, teacher.params)
    for source in (tmp_path / "student_timm.safetensors", tmp_path / "teacher"):
        pretrained = finetune.load_pretrained(str(source))
        assert (pretrained.arch.width, pretrained.arch.depth, pretrained.num_heads) == (64, 2, 2)
        assert trees_equal(flatten_params(pretrained.params), flatten_params(teacher.params))
    config = finetune_base_config()
    config.model.variant, config.img_size = "mu/4", 32
    model = finetune.build_model(config, pretrained, 10)
    assert model.encoder.num_heads == 2 and not model.encoder.final_norm  # mean pooling: fc_norm instead
    config.img_size = 64
    with pytest.raises(UserError, match="position embeddings for 32 px"):
        finetune.build_model(config, pretrained, 10)


# ---------------------------------------------------------------- exact resume


def test_finetune_resumes_exactly_after_sigkill(tmp_path):
    demo = tmp_path / "demo"
    ref = Run(finetune_args(tmp_path / "ref", demo), module="dmt_jax.finetune")
    killed = Run(finetune_args(tmp_path / "k", demo), module="dmt_jax.finetune")
    killed.wait_for(r"^step 10/")  # the save at 4 has finished (periodic saves are asynchronous)
    killed.send(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    at_kill = checkpoint_steps(tmp_path / "k")
    assert at_kill and at_kill[-1] < 16, at_kill
    assert ref.finish() == 0, ref.output

    resumed = Run(finetune_args(tmp_path / "k", demo), module="dmt_jax.finetune")
    assert resumed.finish() == 0, resumed.output
    assert f"resuming from the checkpoint at step {at_kill[-1]}" in resumed.output
    assert trees_equal(read_state(tmp_path / "k"), read_state(tmp_path / "ref"))
    final = [json.loads(line) for line in (tmp_path / "ref" / "eval.jsonl").read_text().splitlines()]
    assert final[-1]["step"] == 16 and 0 <= final[-1]["top1"] <= final[-1]["top5"] <= 100


# ---------------------------------------------------------------- the distillation's protections (runner.py)


def test_second_finetune_on_a_locked_workdir_is_refused(tmp_path):
    from dmt_jax.workdir_lock import WorkdirLock

    workdir = tmp_path / "run"
    with WorkdirLock(workdir):
        run = Run(finetune_args(workdir, tmp_path / "demo"), devices=1, module="dmt_jax.finetune")
        assert run.finish(timeout=240) == 2, run.output
    assert f"error: workdir {workdir} is in use by another run (host" in run.output
    assert sorted(p.name for p in workdir.iterdir()) == [".dmt_lock"]  # nothing written


def test_resume_with_another_init_is_refused_naming_it(tmp_path, capsys):
    import re

    from dmt_jax.export import export_timm
    from dmt_jax.teachers import make_random_teacher

    student = tmp_path / "student_timm.safetensors"
    export_timm(make_random_teacher("mu/4", 32, seed=3).params, student)
    workdir, demo = tmp_path / "run", tmp_path / "demo"
    fields = {"total_steps": 2, "checkpoint_every": 2, "log_every": 1}
    finetune.finetune(finetune_config(demo, **fields), str(workdir))  # from random weights
    written = (workdir / "config.json").read_text()
    changed = f"init: '' -> '{student}'"
    refusal = "refusing to resume the checkpoint at step 2 .*" + re.escape(changed)
    with pytest.raises(UserError, match=refusal):
        finetune.finetune(finetune_config(demo, init=str(student), **fields), str(workdir))
    assert (workdir / "config.json").read_text() == written  # a refused resume leaves it alone
    capsys.readouterr()
    changed_ok = finetune_config(demo, init=str(student), resume_allow_changes=True, **fields)
    finetune.finetune(changed_ok, str(workdir))
    assert f"resuming with changed config fields: {changed}" in capsys.readouterr().out
    assert json.loads((workdir / "config.json").read_text())["init"] == str(student)


def _sigterm_once_the_loop_listens(timeout: float = 300):
    """SIGTERM to this process once runner.Preemption's handler is installed (before, it would end pytest)."""
    import os
    import time

    from dmt_jax import runner

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), runner.Preemption):
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.05)


def test_finetune_stops_with_a_checkpoint_while_waiting_for_input(tmp_path):
    import threading

    bad = tmp_path / "bad"  # no readable image: the input waits (a minute here) until 300000 have failed
    for name in ("a", "b"):
        (bad / name).mkdir(parents=True)
        (bad / name / "0.png").write_bytes(b"not an image at all")
    fields = {"data.source": "folder", "data.folder_train": str(bad), "data.folder_eval": str(bad)}
    fields |= {"data.threads": 1, "data.num_parallel": 1, "data.max_unreadable_in_a_row": 300000}
    threading.Thread(target=_sigterm_once_the_loop_listens, daemon=True).start()
    assert finetune.finetune(finetune_config(tmp_path / "demo", **fields), str(tmp_path / "run")) == {}
    assert checkpoint_steps(tmp_path / "run") == [0]


# ---------------------------------------------------------------- RandAugment and random erasing (tf.data)


# timm op name, our op, magnitude 9's argument of timm's op (sign +1); the geometric ones fill with the
# ImageNet mean, as timm's create_transform sets them (img_mean).
_RAND_OPS = [
    ("AutoContrast", "_auto_contrast", None),
    ("Equalize", "_equalize", None),
    ("Invert", "_invert", None),
    ("PosterizeIncreasing", "_posterize", 1),
    ("SolarizeIncreasing", "_solarize", 26),
    ("SolarizeAdd", "_solarize_add", 99),
    ("ColorIncreasing", "_color", 1.81),
    ("ContrastIncreasing", "_contrast", 1.81),
    ("BrightnessIncreasing", "_brightness", 1.81),
    ("SharpnessIncreasing", "_sharpness", 1.81),
    ("ShearX", "_shear_x", 0.27),
    ("ShearY", "_shear_y", 0.27),
    ("TranslateXRel", "_translate_x", 0.405),
    ("TranslateYRel", "_translate_y", 0.405),
    ("Rotate", "_rotate", 27.0),
]


def test_randaugment_ops_equal_timms_pil_ops():
    """Each of the 15 ops at magnitude 9 against timm's PIL op: the colour ops to rounding (1 level);
    the geometric ones on nearly all pixels (TF and PIL treat samples at the fill boundary differently)."""
    import tensorflow as tf
    import timm.data.auto_augment as aa
    from PIL import Image

    from dmt_jax.data import randaugment as ra

    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    image[..., 0] = image[..., 0] // 2 + 40  # a channel that does not span 0..255 (AutoContrast acts)
    assert len(_RAND_OPS) == len(ra._OPS)
    for timm_name, ours, arg in _RAND_OPS:
        geometric = timm_name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate")
        kwargs = dict(resample=Image.BILINEAR, fillcolor=(124, 116, 104)) if geometric else {}
        args = () if arg is None else (arg,)
        want = np.asarray(aa.NAME_TO_OP[timm_name](Image.fromarray(image), *args, **kwargs)).astype(float)
        got = getattr(ra, ours)(tf.constant(image, tf.float32), tf.constant(9.0), tf.constant(1.0))
        diff = np.abs(np.clip(np.round(got.numpy()), 0, 255) - want)
        if geometric:
            assert (diff <= 2).mean() > 0.9, timm_name
        else:
            assert diff.max() <= 1, timm_name


def test_fine_tuning_augmentation_is_seeded_and_parsed():
    import tensorflow as tf

    from dmt_jax.data import randaugment as ra

    assert ra.parse_randaugment("rand-m9-mstd0.5-inc1") == (2, 9.0, 0.5)
    assert ra.parse_randaugment("rand-n3-m7") == (3, 7.0, 0.0)
    with pytest.raises(ValueError):
        ra.parse_randaugment("rand-m9-foo")
    augment = ra.make_augment("rand-m9-mstd0.5-inc1", 1.0)
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (32, 32, 3)), tf.uint8)
    seed = tf.constant([3, 4], tf.int64)
    first, again = augment(image, seed).numpy(), augment(image, seed).numpy()
    other = augment(image, tf.constant([3, 5], tf.int64)).numpy()
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    erased = ra.erase(tf.zeros((32, 32, 3)), seed, 1.0).numpy()
    box = (erased != 0).any(axis=2)
    rows, cols = np.nonzero(box.any(axis=1))[0], np.nonzero(box.any(axis=0))[0]
    area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    assert 0.02 * 32 * 32 <= area <= 32 * 32 / 3 + 32  # one box of timm's area range
    assert ra.make_augment("", 0.0) is None
