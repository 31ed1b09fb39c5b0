"""Export of an agglomerative student: the backbone loads in timm (summary tokens as its registers) and the
heads, rebuilt in PyTorch from student_heads.safetensors (dmt_jax/export_heads_torch.py), give the
summary and dense outputs of the trained JAX student, in each teacher's own space (statistics folded
in), after a tiny agglomerative run with every head kind and normalization."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dmt_jax import checkpoint, export, finetune, parallel, train
from dmt_jax.config import base_config, finetune_base_config, teacher_options
from dmt_jax.errors import UserError
from dmt_jax.export_heads_torch import load_heads
from dmt_jax.objective import align, normalize

BATCH = 16
REPO = Path(__file__).resolve().parents[1]


def tiny_run_config():
    """Four random teachers on four grids; every head kind and normalization; two resolution stages."""
    c = base_config()
    c.img_size = 32  # the position table's grid (8 x 8); the last stage runs at 48 px (12 x 12)
    c.stages = ((0, 32), (2, 48))
    c.student.variant = "mu/4"
    c.student.num_reg_tokens = 1
    c.objective = "agglomerative"
    c.teachers = (
        "dino=random:mu/4@32:1",
        "sam=random:mu/8@96:2",
        "clip=random:mu/8@32:3",
        "eva=random:mu/4@48:4",
    )
    c.agglomerative.per_teacher = {
        "dino": teacher_options(norm="phi_s", summary_norm="phi_s"),
        "sam": teacher_options(norm="standardize", summary_head="none", dense_head="mlp_v1"),
        "clip": teacher_options(
            norm="layernorm", summary_norm="layernorm", summary_head="mlp", dense_head="ln_linear"
        ),
        "eva": teacher_options(
            norm="none", summary_norm="standardize", summary_head="linear", dense_head="mlp_v2"
        ),
    }
    c.agglomerative.phi_s_steps = 5  # 5 x 16 summary vectors: more than their 64 channels
    c.agglomerative.head_num_inner = 2
    c.agglomerative.head_hidden_dim = 96
    c.teacher_dtype = c.dtype = "float32"
    c.batch_size = BATCH
    c.total_steps = 5
    c.warmup_steps = 1
    c.base_lr = 3e-2  # large, so that every parameter moves far from its initialization
    c.fsdp_min_size = 1000
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(setup, host state, export directory) after 5 steps, exported as the loop exports at the end."""
    config = tiny_run_config()
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    setup = train.build(config, mesh)
    state = setup.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    for _ in range(config.total_steps):
        pixels = rng.integers(0, 256, (BATCH, setup.view_size, setup.view_size, 3), dtype=np.uint8)
        state, _ = setup.step(state, setup.teacher_params, parallel.global_batch({"image": pixels}, mesh))
    directory = tmp_path_factory.mktemp("export")
    export.export_run(setup, state, str(directory))
    # The run's workdir as a fine-tuning finds it: its config.json and a checkpoint of the state.
    ckpt = checkpoint.Checkpointer(str(directory / "checkpoints"))
    assert ckpt.save(config.total_steps, state, {"next_index": 0, "bad_images": 0, "global_batch": BATCH})
    ckpt.close()
    (directory / "config.json").write_text(config.to_json_best_effort())
    return setup, jax.device_get(state), directory


def test_backbone_loads_in_timm_with_summary_tokens_as_registers(trained):
    setup, state, directory = trained
    path = directory / export.BACKBONE_NAME
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    kwargs, cfg = json.loads(meta["timm_kwargs"]), json.loads(meta["pretrained_cfg"])
    # Summary tokens in name order (sam has none), then the student's own register.
    assert json.loads(meta["prefix_tokens"]) == ["summary:clip", "summary:dino", "summary:eva", "register"]
    assert kwargs["reg_tokens"] == 3 and kwargs["class_token"] and kwargs["img_size"] == 48
    assert cfg["input_size"] == [3, 48, 48]  # the last stage's size, its table resized as training did
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    model.load_state_dict(load_file(path), strict=True)


def test_pytorch_heads_equal_the_jax_student(trained):
    setup, state, directory = trained
    stats, targets = state.stats, {t.name: t for t in setup.targets}
    with safe_open(str(directory / export.BACKBONE_NAME), "np") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    backbone = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    backbone.load_state_dict(load_file(directory / export.BACKBONE_NAME), strict=True)
    heads = load_heads(directory / export.HEADS_NAME).eval()
    images = torch.randn((3, 3, 48, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = backbone.forward_features(images)
        ours_torch = heads(tokens)
        on_teacher_grid = heads(tokens, teacher_grid=True)

    student = train.student_at(setup.student, 48)  # the last stage's model, as the export's table
    params = train.with_position_table(state.params, 8, 12)
    preds = jax.jit(student.apply)({"params": params}, images.permute(0, 2, 3, 1).numpy())

    compared = []
    for name, t in targets.items():
        for kind in ("summary", "dense"):
            if not getattr(t, f"{kind}_dim"):
                assert kind not in ours_torch[name]
                continue
            jax_out = np.asarray(preds[name][kind])
            norm = t.summary_norm if kind == "summary" else t.norm
            if norm != "layernorm":  # the exported head predicts the teacher's own features
                jax_out = np.asarray(normalize.denormalize(norm, jax_out, stats[name].get(kind, {})))
            torch_out = ours_torch[name][kind].numpy()
            assert torch_out.shape == jax_out.shape, (name, kind)
            err = np.linalg.norm(torch_out - jax_out) / np.linalg.norm(jax_out)
            print(f"{name} {kind} ({norm}, {getattr(t, kind + '_head')}): relative error {err:.2e}")
            assert err <= 1e-4, (name, kind, err)
            compared.append((name, kind, norm))
            if kind == "dense":
                resampled = np.asarray(align.resample(jax_out, 12, t.grid))
                err = np.linalg.norm(on_teacher_grid[name][kind].numpy() - resampled) / np.linalg.norm(
                    resampled
                )
                assert err <= 1e-4, (name, "teacher grid", err)
    assert len(compared) == 7  # 4 dense heads, 3 summary heads (sam has none)
    # The statistics were not identities: folding them changed the heads' outputs.
    dino = normalize.denormalize("phi_s", np.asarray(preds["dino"]["dense"]), stats["dino"]["dense"])
    assert np.abs(np.asarray(dino) - np.asarray(preds["dino"]["dense"])).max() > 1e-2


def test_heads_metadata_describes_each_head(trained):
    _, _, directory = trained
    with safe_open(str(directory / export.HEADS_NAME), "np") as f:
        meta = f.metadata()
    assert meta["heads_format"] == export.HEADS_FORMAT
    heads, student = json.loads(meta["heads"]), json.loads(meta["student"])
    assert student["num_prefix_tokens"] == 4 and student["img_size"] == 48 and student["patch_size"] == 4
    assert heads["sam"]["summary"] is None and heads["dino"]["summary"]["norm"] == "phi_s"
    assert heads["sam"]["dense"] | {"hidden_dim": 0} == dict(
        kind="mlp_v1", in_dim=64, out_dim=64, hidden_dim=0, num_inner=2, ln_eps=1e-5, norm="standardize",
        target="teacher", teacher_grid=[12, 12],
    )  # fmt: skip
    assert heads["clip"]["summary"]["target"] == "layernorm" and heads["clip"]["summary"]["token"] == 0
    assert heads["eva"]["summary"]["token"] == 2 and heads["dino"]["dense"]["kind"] == "mlp_v2"


def test_load_heads_refuses_another_file(trained):
    _, _, directory = trained
    with pytest.raises(ValueError, match="is not a dmt_jax.heads/1 file"):
        load_heads(directory / export.BACKBONE_NAME)


# ---------------------------------------------------------------- fine-tuning from an agglomerative student


@pytest.mark.parametrize("source", ["workdir", "file"])
def test_finetune_init_keeps_the_summary_tokens_as_registers(trained, source):
    """From the run's workdir (its checkpoint; the table at img_size) or its export (the last stage's table),
    the fine-tuning's encoder is the student's: same registers, same tokens for the same images."""
    setup, state, directory = trained
    init = str(directory if source == "workdir" else directory / export.BACKBONE_NAME)
    px = 32 if source == "workdir" else 48
    pretrained = finetune.load_pretrained(init)
    assert pretrained.arch.num_reg_tokens == 3 and pretrained.arch.grid * 4 == px
    config = finetune_base_config()
    config.model.variant, config.img_size, config.model.global_pool = "mu/4", px, "token"
    config.dtype = "float32"
    classifier = finetune.build_model(config, pretrained, num_classes=5)
    images = jax.random.normal(jax.random.PRNGKey(3), (2, px, px, 3))
    ours = classifier.encoder.apply({"params": pretrained.params}, images)
    student = train.student_at(setup.student, px).encoder
    params = train.with_position_table(state.params, 8, px // 4)["encoder"]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(student.apply({"params": params}, images)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_finetune_runs_from_an_agglomerative_workdir(trained, tmp_path):
    import runpy

    _, _, directory = trained
    config = runpy.run_path(str(REPO / "configs" / "finetune_demo.py"))["get_config"]()
    fields = dict(init=str(directory), img_size=32, total_steps=2, batch_size=16, eval_every=0,
                  eval_batch_size=40, checkpoint_every=2, log_every=1, export_at_end=True)  # fmt: skip
    for k, v in fields.items():
        config[k] = v
    config.model.variant = "mu/4"
    config.data.demo_root = str(tmp_path / "demo")
    config.data.demo_per_class_train, config.data.demo_per_class_val = 8, 4
    result = finetune.finetune(config, str(tmp_path / "ft"))
    assert "top1" in result and (tmp_path / "ft" / finetune.EXPORT_NAME).exists()


def test_finetune_init_refuses_teachers_that_are_not_plain_vits(tmp_path):
    from dmt_jax.models import EvaConfig, SamConfig, build_model
    from dmt_jax.teachers import TeacherSpec, make_random_teacher, save_teacher

    clip = dict(pre_norm=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5, proj_dim=32)
    siglip = dict(class_token=False, act="gelu_tanh", pool="map")
    for name, kwargs in (("clip", clip), ("siglip", siglip)):
        t = make_random_teacher("mu/16", 32, seed=0, fmt=name, **kwargs)
        save_teacher(tmp_path / name, t.spec, t.params)
    eva = EvaConfig(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=16, img_size=32)
    sam = SamConfig(embed_dim=64, depth=2, num_heads=2, mlp_dim=128, img_size=64, window_size=2,
                    global_attn_indexes=(1,), out_chans=32)  # fmt: skip
    for name, family, cfg in (("eva02", "eva", eva), ("sam", "sam", sam)):
        images = jax.numpy.zeros((1, cfg.img_size, cfg.img_size, 3))
        params = build_model(family, cfg).init(jax.random.PRNGKey(0), images)["params"]
        save_teacher(tmp_path / name, TeacherSpec(format=name, family=family, config=cfg), params)
    words = {"clip": "a ViT with pre_norm=True, patch_bias=False, act='quick_gelu', ln_eps=1e-05",
             "siglip": "a ViT with class_token=False, act='gelu_tanh'",
             "eva02": "an eva model", "sam": "a sam model"}  # fmt: skip
    for name, what in words.items():
        with pytest.raises(UserError) as e:
            finetune.load_pretrained(str(tmp_path / name))
        line = str(e.value)
        assert f"its teacher ({name}) is {what}, not the plain timm ViT" in line and "\n" not in line, line
