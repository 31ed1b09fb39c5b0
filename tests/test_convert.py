"""dmt-convert and load_teacher against timm: every official layout, the resize path, bad inputs.

`python tests/test_convert.py` prints one JSON line per format with the relative error of the
converted teacher's features against timm's forward_features.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from dmt_jax import convert
from dmt_jax.errors import UserError
from dmt_jax.teachers import (
    Teacher,
    TeacherFileError,
    TeacherStack,
    load_teacher,
    make_random_teacher,
    save_teacher,
)

try:
    from tests import checkpoint_layouts as layouts
except ImportError:  # run as a script, or tests/ is not a package
    import checkpoint_layouts as layouts

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
TOLERANCE = 1e-5


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def images_for(img_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Normalized NCHW images (torch's layout)."""
    return torch.randn((batch, 3, img_size, img_size), generator=torch.Generator().manual_seed(seed))


def compare_with_timm(teacher: Teacher, timm_model, images: torch.Tensor) -> float:
    with torch.no_grad():
        reference = timm_model.forward_features(images).numpy()
    with jax.default_matmul_precision("highest"):
        ours = teacher.features(jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
    assert ours.shape == reference.shape
    return relative_error(ours, reference)


def run_cli(*args) -> int:
    return convert.main([str(a) for a in args])


def conversion_error(case: str, tmp: Path, depth: int | None = None) -> dict:
    """Builds the case's timm model, saves it in the official layout, converts it, compares features."""
    config, layout, fmt = layouts.CASES[case]
    config = dataclasses.replace(config, depth=depth or config.depth)
    model = layouts.random_timm_vit(config, seed=1 + list(layouts.CASES).index(case))
    src = tmp / (f"{case}.pth.tar" if fmt == "mocov3" else f"{case}.pth")  # the files' own names
    out = tmp / f"{case}_converted"
    torch.save(layout(model), src)
    assert run_cli(src, out) == 0
    teacher = load_teacher(out)
    batch = 1 if config.img_size > 224 else 2
    error = compare_with_timm(teacher, model, images_for(config.img_size, batch))
    spec = teacher.spec
    return dict(
        case=case,
        format=spec.format,
        expected_format=fmt,
        variant=spec.variant,
        depth=spec.depth,
        img_size=spec.img_size,
        tokens=spec.num_tokens,
        registers=spec.num_reg_tokens,
        layerscale=spec.layerscale,
        relative_l2_error=error,
    )


@pytest.mark.parametrize("case", list(layouts.CASES))
def test_every_official_layout_converts_to_timm_features(case, tmp_path):
    result = conversion_error(case, tmp_path)
    config = layouts.CASES[case][0]
    assert result["format"] == result["expected_format"]  # --format auto picked the right one
    assert result["registers"] == config.reg_tokens and result["layerscale"] == config.layerscale
    assert result["relative_l2_error"] <= TOLERANCE, result


def test_safetensors_input(tmp_path):
    from safetensors.torch import save_file

    model = layouts.random_timm_vit(layouts.TINY_14_REG)
    save_file(layouts.dinov2_layout(model), tmp_path / "dinov2_reg.safetensors")
    assert run_cli(tmp_path / "dinov2_reg.safetensors", tmp_path / "out") == 0
    teacher = load_teacher(tmp_path / "out")
    assert (
        teacher.spec.format == "dinov2" and teacher.spec.num_reg_tokens == 4 and teacher.spec.no_embed_class
    )
    assert compare_with_timm(teacher, model, images_for(56)) <= TOLERANCE


def test_console_script_in_a_subprocess(tmp_path):
    model = layouts.random_timm_vit(layouts.TINY)
    torch.save(layouts.dino_layout(model, full=True), tmp_path / "dino.pth")
    script = shutil.which("dmt-convert", path=os.path.dirname(sys.executable)) or shutil.which("dmt-convert")
    assert script, "the dmt-convert console script is not installed (pip install -e .)"
    ok = subprocess.run([script, tmp_path / "dino.pth", tmp_path / "out"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert compare_with_timm(load_teacher(tmp_path / "out"), model, images_for(64)) <= TOLERANCE
    bad = subprocess.run(
        [script, tmp_path / "missing.pth", tmp_path / "out2"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------- position-embedding resize


def dino_interpolate(pos_embed, new_grid):
    """facebookresearch/dino (and iBOT, DINOv2 without registers) interpolate_pos_encoding."""
    class_pos, patch_pos = pos_embed[:, 0], pos_embed[:, 1:]
    n, dim = patch_pos.shape[1], pos_embed.shape[-1]
    w0 = h0 = new_grid + 0.1
    patch_pos = F.interpolate(
        patch_pos.reshape(1, int(n**0.5), int(n**0.5), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / n**0.5, h0 / n**0.5),
        mode="bicubic",
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1)


def dinov2_reg_interpolate(pos_embed, new_grid):
    """facebookresearch/dinov2 with interpolate_offset=0, interpolate_antialias=True (the reg models)."""
    class_pos, patch_pos = pos_embed[:, 0], pos_embed[:, 1:]
    m, dim = int(patch_pos.shape[1] ** 0.5), pos_embed.shape[-1]
    patch_pos = F.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=True,
        size=(new_grid, new_grid),
    )
    return torch.cat((class_pos.unsqueeze(0), patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)


def mae_interpolate(pos_embed, new_grid):
    """facebookresearch/mae util/pos_embed.py interpolate_pos_embed."""
    extra, tokens = pos_embed[:, :1], pos_embed[:, 1:]
    orig, dim = int(tokens.shape[1] ** 0.5), pos_embed.shape[-1]
    tokens = tokens.reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat((extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def mocov3_interpolate(pos_embed, new_grid):
    """MoCo v3 ViTs are timm ViTs: timm's own resampling."""
    return resample_abs_pos_embed(pos_embed, [new_grid, new_grid], num_prefix_tokens=1)


# case -> (model config, layout, the teacher code's interpolation of its own pos_embed)
RESIZE_CASES = {
    "mae": (layouts.TINY, layouts.mae_layout, mae_interpolate),
    "mocov3": (layouts.TINY, layouts.mocov3_layout, mocov3_interpolate),
    "dino": (layouts.TINY, layouts.dino_layout, dino_interpolate),
    "ibot": (layouts.TINY, layouts.ibot_layout, dino_interpolate),
    "dinov2": (layouts.TINY_14, layouts.dinov2_layout, dino_interpolate),
    "dinov2_reg4": (layouts.TINY_14_REG, layouts.dinov2_layout, dinov2_reg_interpolate),
}


@pytest.mark.parametrize("case", list(RESIZE_CASES))
@pytest.mark.parametrize("new_grid", [3, 6])
def test_resize_uses_the_teachers_own_interpolation(case, new_grid, tmp_path):
    config, layout, interpolate = RESIZE_CASES[case]
    model = layouts.random_timm_vit(config, seed=2)
    checkpoint = layout(model)
    torch.save(checkpoint, tmp_path / "src.pth")
    new_size = new_grid * config.patch
    assert run_cli(tmp_path / "src.pth", tmp_path / "out", "--img-size", new_size) == 0
    teacher = load_teacher(tmp_path / "out")
    assert (teacher.spec.img_size, teacher.spec.grid, teacher.spec.source_img_size) == (
        new_size,
        new_grid,
        config.img_size,
    )

    # What the teacher's own code computes from the pos_embed stored in its file.
    stored = {
        "mae": lambda c: c["model"],
        "mocov3": lambda c: {k.removeprefix("module.base_encoder."): v for k, v in c["state_dict"].items()},
        "ibot": lambda c: c["state_dict"],
    }.get(case, lambda c: c)
    expected = interpolate(stored(checkpoint)["pos_embed"], new_grid)
    converted = np.asarray(teacher.params["pos_embed"])
    if config.no_embed_class:  # DINOv2 + registers: the CLS row is folded into cls_token
        expected = expected[:, 1:]
    np.testing.assert_array_equal(converted, expected.numpy())

    # The resized teacher equals timm run with the same resized embeddings.
    resized = layouts.random_timm_vit(dataclasses.replace(config, img_size=new_size))
    state = layouts.timm_state(model) | {"pos_embed": torch.from_numpy(converted)}
    resized.load_state_dict(state, strict=True)
    assert compare_with_timm(teacher, resized, images_for(new_size)) <= TOLERANCE


def test_dinov2_518_to_the_students_14x14_grid(tmp_path):
    """The production case: a /14 DINOv2 checkpoint (37x37 grid at 518 px) converted for 196 px."""
    config = dataclasses.replace(layouts.TINY_14, img_size=518, depth=1)
    model = layouts.random_timm_vit(config)
    checkpoint = layouts.dinov2_layout(model)
    torch.save(checkpoint, tmp_path / "src.pth")
    assert run_cli(tmp_path / "src.pth", tmp_path / "out", "--img-size", 196) == 0
    teacher = load_teacher(tmp_path / "out")
    assert teacher.spec.grid == 14 and teacher.spec.pos_embed_resize == "bicubic_scale_offset_0.1"
    expected = dino_interpolate(checkpoint["pos_embed"], 14).numpy()
    np.testing.assert_array_equal(np.asarray(teacher.params["pos_embed"]), expected)


# ------------------------------------------------------------ bad input: exit 2, one line, nothing written


def expect_refusal(capsys, tmp_path, args, *fragments) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dmt-convert: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temp directory left
    return err


@pytest.fixture
def tiny_model():
    return layouts.random_timm_vit(layouts.TINY)


def test_refuses_a_missing_file(capsys, tmp_path):
    expect_refusal(capsys, tmp_path, [tmp_path / "nope.pth", tmp_path / "out"], "no such file")


def test_refuses_a_truncated_file(capsys, tmp_path, tiny_model):
    torch.save(layouts.dino_layout(tiny_model), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    expect_refusal(capsys, tmp_path, [tmp_path / "cut.pth", tmp_path / "out"], "truncated or not a PyTorch")


@pytest.mark.parametrize("content", [b"hello, world\n", b""])
def test_refuses_a_file_that_is_not_a_checkpoint(capsys, tmp_path, content):
    (tmp_path / "x.pth").write_bytes(content)
    expect_refusal(capsys, tmp_path, [tmp_path / "x.pth", tmp_path / "out"], "not a PyTorch checkpoint")


def test_refuses_a_pickle_that_is_not_a_dict(capsys, tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    expect_refusal(capsys, tmp_path, [tmp_path / "list.pth", tmp_path / "out"], "holds a list")


def test_refuses_a_broken_safetensors_file(capsys, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    expect_refusal(
        capsys, tmp_path, [tmp_path / "x.safetensors", tmp_path / "out"], "not a readable safetensors"
    )


class _RunsCode:
    """A pickle whose loading would create a directory (stands in for any code execution)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_refuses_a_malicious_pickle_without_running_it(capsys, tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "x": _RunsCode(sentinel)}, tmp_path / "evil.pth")
    expect_refusal(
        capsys, tmp_path, [tmp_path / "evil.pth", tmp_path / "out"], "refused to unpickle", "mkdir"
    )
    assert not sentinel.exists()


def test_unrecognized_format_lists_keys_seen_and_formats_known(capsys, tmp_path):
    torch.save({"weights": {"layer.0": torch.zeros(2)}, "step": 3}, tmp_path / "odd.pth")
    err = expect_refusal(capsys, tmp_path, [tmp_path / "odd.pth", tmp_path / "out"], "not recognized")
    assert "weights, step" in err and "mae, mocov3, ibot, dinov2, dino" in err


def test_wrong_explicit_format_says_what_it_expected(capsys, tmp_path, tiny_model):
    torch.save(layouts.dino_layout(tiny_model), tmp_path / "dino.pth")
    args = [tmp_path / "dino.pth", tmp_path / "out", "--format", "mocov3"]
    expect_refusal(capsys, tmp_path, args, "mocov3", "'state_dict'")


def test_lists_missing_and_unexpected_tensors(capsys, tmp_path, tiny_model):
    sd = layouts.timm_state(tiny_model)
    del sd["blocks.1.norm2.weight"], sd["norm.bias"]
    sd["fc_norm.weight"] = torch.zeros(64)
    torch.save(sd, tmp_path / "src.pth")
    expect_refusal(
        capsys,
        tmp_path,
        [tmp_path / "src.pth", tmp_path / "out"],
        "missing tensors: blocks.1.norm2.weight, norm.bias",
        "unexpected tensors: fc_norm.weight",
    )


def test_refuses_shapes_that_do_not_fit_the_variant(capsys, tmp_path, tiny_model):
    sd = layouts.timm_state(tiny_model)
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(192, 60)
    torch.save(sd, tmp_path / "src.pth")
    expect_refusal(
        capsys, tmp_path, [tmp_path / "src.pth", tmp_path / "out"], "blocks.1.attn.qkv.weight (192, 60)"
    )


@pytest.mark.parametrize("img_size", [100, 0])
def test_refuses_an_image_size_off_the_patch_grid(capsys, tmp_path, tiny_model, img_size):
    torch.save(layouts.dino_layout(tiny_model), tmp_path / "src.pth")
    args = [tmp_path / "src.pth", tmp_path / "out", "--img-size", img_size]
    expect_refusal(capsys, tmp_path, args, "not a positive multiple of the patch size 16")


def test_existing_output_needs_overwrite(capsys, tmp_path, tiny_model):
    torch.save(layouts.dino_layout(tiny_model), tmp_path / "src.pth")
    assert run_cli(tmp_path / "src.pth", tmp_path / "out") == 0
    spec_before = (tmp_path / "out" / "spec.json").read_text()
    expect_refusal(
        capsys, tmp_path, [tmp_path / "src.pth", tmp_path / "out", "--img-size", 32], "already exists"
    )
    assert (tmp_path / "out" / "spec.json").read_text() == spec_before  # untouched
    assert run_cli(tmp_path / "src.pth", tmp_path / "out", "--img-size", 32, "--overwrite") == 0
    assert load_teacher(tmp_path / "out").spec.img_size == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.pth"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_teacher(capsys, tmp_path, tiny_model):
    torch.save(layouts.dino_layout(tiny_model), tmp_path / "src.pth")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    args = [tmp_path / "src.pth", tmp_path / "precious", "--overwrite"]
    expect_refusal(capsys, tmp_path, args, "not a converted teacher")
    assert (tmp_path / "precious" / "thesis.tex").exists()


# ---------------------------------------------------------------- load_teacher / save_teacher


def test_load_teacher_errors_are_one_line(tmp_path):
    with pytest.raises(TeacherFileError, match="not a directory"):
        load_teacher(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherFileError, match="needs spec.json"):
        load_teacher(tmp_path / "empty")
    teacher = make_random_teacher("mu/16", 32, seed=0)
    save_teacher(tmp_path / "t", teacher.spec, teacher.params)
    (tmp_path / "t" / "spec.json").write_text("{not json")
    with pytest.raises(TeacherFileError, match="not a valid converted teacher") as info:
        load_teacher(tmp_path / "t")
    assert "\n" not in str(info.value)
    with pytest.raises(TeacherFileError, match="do not fit the spec"):
        bigger = dataclasses.replace(teacher.spec.config, img_size=64)
        save_teacher(tmp_path / "u", dataclasses.replace(teacher.spec, config=bigger), teacher.params)
    assert not (tmp_path / "u").exists()


def test_save_load_round_trip_and_spec_json(tmp_path):
    teacher = make_random_teacher("mu/16", 32, seed=3, fmt="dino", num_reg_tokens=2, layerscale_init=0.1)
    save_teacher(tmp_path / "t", teacher.spec, teacher.params)
    loaded = load_teacher(tmp_path / "t")
    assert loaded.spec == teacher.spec
    spec = json.loads((tmp_path / "t" / "spec.json").read_text())
    assert spec["num_prefix_tokens"] == 3 and spec["grid"] == 2 and spec["mean"] == [0.485, 0.456, 0.406]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, teacher.params), loaded.params)


def test_a_v1_teacher_directory_loads_upgraded_with_its_old_fingerprint(tmp_path):
    """Directories written before spec /2 (today's conversions) load as ViT teachers, and their
    fingerprint is the one checkpoints recorded then (a resume must not see another teacher)."""
    import hashlib

    from safetensors.numpy import save_file

    from dmt_jax.teachers import fingerprint, flatten_params

    teacher = make_random_teacher("mu/16", 32, seed=3, fmt="dino", num_reg_tokens=2, layerscale_init=0.1)
    v1 = {"kind": "dmt_jax.teacher/1", "format": "dino", "variant": "mu/16", "width": 64, "depth": 2,
          "num_heads": 2, "mlp_dim": 256, "patch_size": 16, "img_size": 32, "num_reg_tokens": 2,
          "no_embed_class": False, "layerscale": True, "mean": [0.485, 0.456, 0.406],
          "std": [0.229, 0.224, 0.225], "source": "random(seed=3)", "source_img_size": None,
          "pos_embed_resize": "none", "grid": 2, "num_prefix_tokens": 3, "num_tokens": 7,
          "params_file": "params.safetensors"}  # fmt: skip
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "spec.json").write_text(json.dumps(v1, indent=2))
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(teacher.params).items()}
    save_file(flat, str(tmp_path / "t" / "params.safetensors"))
    loaded = load_teacher(tmp_path / "t")
    assert loaded.spec.family == "vit" and loaded.spec.config == teacher.spec.config
    assert (loaded.spec.variant, loaded.spec.num_tokens, loaded.spec.input_resize) == ("mu/16", 7, "bilinear")

    # The /1 fingerprint, as teachers.fingerprint computed it before /2.
    fields = {k: v for k, v in v1.items() if k not in ("kind", "grid", "num_prefix_tokens", "num_tokens",
                                                       "params_file", "source", "variant")}  # fmt: skip
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name, value in sorted(flat.items()):
        digest.update(f"{name}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    assert fingerprint(loaded) == digest.hexdigest()

    with pytest.raises(TeacherFileError, match=r"lacks the fields \['depth'\]"):
        (tmp_path / "t" / "spec.json").write_text(json.dumps({k: v for k, v in v1.items() if k != "depth"}))
        load_teacher(tmp_path / "t")


def test_spec_v2_round_trip_and_config_errors(tmp_path):
    teacher = make_random_teacher(
        "mu/16", 32, seed=1, class_token=False, pool="map", act="gelu_tanh", pre_norm=True, patch_bias=False
    )
    save_teacher(tmp_path / "t", teacher.spec, teacher.params)
    data = json.loads((tmp_path / "t" / "spec.json").read_text())
    assert data["kind"] == "dmt_jax.teacher/2" and data["family"] == "vit"
    assert (
        data["config"]["act"] == "gelu_tanh" and data["num_prefix_tokens"] == 0 and data["summary_dim"] == 64
    )
    assert load_teacher(tmp_path / "t").spec == teacher.spec
    for edit, message in [
        (lambda d: d["config"].update(act="relu"), "act must be one of gelu, gelu_tanh, quick_gelu"),
        (lambda d: d["config"].update(pool="cls"), "pool 'cls' needs class_token true"),
        (lambda d: d["config"].update(shape=3), r"unknown fields \['shape'\]"),
        (lambda d: d.update(family="cnn"), "family must be one of vit"),
        (lambda d: d.update(input_resize="nearest"), "input_resize must be one of"),
    ]:
        broken = json.loads(json.dumps(data))
        edit(broken)
        (tmp_path / "t" / "spec.json").write_text(json.dumps(broken))
        with pytest.raises(TeacherFileError, match=message) as error:
            load_teacher(tmp_path / "t")
        assert "\n" not in str(error.value)


def test_summary_is_the_cls_token_for_todays_teachers_and_refused_without_one():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    teacher = make_random_teacher("mu/16", 32, seed=0, num_reg_tokens=2)
    np.testing.assert_array_equal(teacher.summary(images), teacher.features(images)[:, 0])
    no_summary = make_random_teacher("mu/16", 32, seed=0, class_token=False, pool="none")
    assert no_summary.features(images).shape == (2, 4, 64)
    with pytest.raises(UserError, match="has no image-level summary"):
        no_summary.summary(images)


# ---------------------------------------------------------------- TeacherStack


def test_teacher_stack_equals_each_teacher_alone():
    mu16 = lambda seed, **kw: make_random_teacher("mu/16", 32, seed, **kw)
    teachers = [
        mu16(0, fmt="mae"),
        make_random_teacher(
            "mu/14", 28, 1, fmt="dinov2", num_reg_tokens=4, no_embed_class=True, layerscale_init=1.0
        ),
        mu16(2, fmt="dino"),
        mu16(3, fmt="mocov3"),
    ]
    # Give teacher 2 another normalization: one vmap group, per-teacher mean/std.
    teachers[2] = Teacher(
        dataclasses.replace(teachers[2].spec, mean=(0.5,) * 3, std=(0.25,) * 3), teachers[2].params
    )
    stack = TeacherStack(teachers, dtype=jnp.float32)
    assert len(stack.params) == 2  # three mu/16 teachers share one group
    assert stack.widths == [64] * 4 and stack.num_reg_tokens == [0, 4, 0, 0] and stack.grids == [2] * 4
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with jax.default_matmul_precision("highest"):
        outputs = jax.jit(stack.apply)(stack.params, pixels)
        for teacher, out in zip(teachers, outputs, strict=True):
            x = jnp.asarray(pixels, jnp.float32)
            if teacher.spec.img_size != 32:
                x = jax.image.resize(x, (2, 28, 28, 3), "bilinear", antialias=True)
            x = (x / 255.0 - jnp.array(teacher.spec.mean)) / jnp.array(teacher.spec.std)
            alone = teacher.features(x)
            assert out.shape == alone.shape == (2, teacher.spec.num_tokens, 64)
            assert relative_error(out, alone) <= TOLERANCE


def test_teacher_stack_features_give_each_teacher_its_own_resolution_normalization_and_summary():
    """Different families of ViT (CLS, no CLS + MAP head, CLIP-like pre-norm + projection) at their own
    img_size, mean/std and resize rule, from one uint8 view; equal to each teacher alone."""
    from dmt_jax.teachers import prepare_images

    plain = make_random_teacher("mu/16", 32, 0)
    siglip_like = make_random_teacher("mu/8", 24, 1, class_token=False, pool="map", act="gelu_tanh")
    siglip_like = Teacher(
        dataclasses.replace(siglip_like.spec, mean=(0.5,) * 3, std=(0.5,) * 3, input_resize="squash"),
        siglip_like.params,
    )
    clip_like = make_random_teacher(
        "mu/16", 48, 2, pre_norm=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5, proj_dim=24
    )
    clip_like = Teacher(dataclasses.replace(clip_like.spec, input_resize="bicubic"), clip_like.params)
    teachers = [plain, siglip_like, clip_like, make_random_teacher("mu/16", 32, 3)]
    stack = TeacherStack(teachers, dtype=jnp.float32)
    assert len(stack.params) == 3 and stack.summary_dims == [64, 64, 24, 64]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with jax.default_matmul_precision("highest"):
        outputs = jax.jit(stack.features)(stack.params, pixels)
        for teacher, out in zip(teachers, outputs, strict=True):
            spec = teacher.spec
            mean, std = np.array(spec.mean) * 255, np.array(spec.std) * 255
            alone = teacher.forward(prepare_images(pixels, spec.img_size, spec.input_resize, mean, std))
            assert (
                out.patches.shape == (2, spec.grid**2, 64) and out.prefix.shape[1] == spec.num_prefix_tokens
            )
            assert relative_error(out.tokens(), alone.tokens()) <= TOLERANCE
            assert relative_error(out.summary, alone.summary) <= TOLERANCE


def test_teacher_stack_in_bf16_is_close():
    teachers = [make_random_teacher("mu/16", 32, seed) for seed in range(2)]
    stack = TeacherStack(teachers)  # bf16 by default
    assert jax.tree.leaves(stack.params)[0].dtype == jnp.bfloat16
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    outputs = jax.jit(stack.apply)(stack.params, pixels)
    x = (pixels / 255.0 - np.array(teachers[0].spec.mean)) / np.array(teachers[0].spec.std)
    for teacher, out in zip(teachers, outputs, strict=True):
        assert out.dtype == jnp.bfloat16
        assert relative_error(out.astype(jnp.float32), teacher.features(jnp.asarray(x, jnp.float32))) < 0.03


def test_formats_import_models_only_and_torch_lazily():
    code = (
        "import sys, dmt_jax.formats; "
        "print(sorted(m for m in ('dmt_jax.teachers', 'dmt_jax.train', 'dmt_jax.config', 'torch') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_teachers_pulls_in_neither_torch_nor_tensorflow():
    code = "import sys, dmt_jax.teachers; print(sorted({'torch', 'tensorflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


if __name__ == "__main__":
    import argparse
    import contextlib
    import tempfile

    parser = argparse.ArgumentParser(
        description="Per-format relative L2 error of converted teachers vs timm."
    )
    parser.add_argument("--depth", type=int, default=None, help="e.g. 12 for full-depth ViT-B (default: 2)")
    depth = parser.parse_args().depth
    jax.config.update("jax_default_matmul_precision", "highest")
    with tempfile.TemporaryDirectory() as tmp:
        for name in layouts.CASES:
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout to the JSON lines
                result = conversion_error(name, Path(tmp), depth)
            print(json.dumps(result), flush=True)
