"""CLIP, OpenCLIP and SigLIP teachers against their reference libraries, from their official files.

open_clip for CLIP / OpenCLIP (tokens: ln_post on every token, CLS first; summary: encode_image,
unnormalized), timm with big_vision's tanh GELU for SigLIP (timm's load_pretrained reads our .npz as it
reads big_vision's releases; tokens: the encoder_norm tokens; summary: the MAP head's output). Random
weights everywhere, float32 at highest precision. `python tests/test_clip_siglip.py` prints one JSON
line per case with its relative errors.
"""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from dmt_jax import convert
from dmt_jax.teachers import load_teacher

try:
    from tests import checkpoint_layouts as layouts
except ImportError:  # run as a script, or tests/ is not a package
    import checkpoint_layouts as layouts

torch.backends.cuda.matmul.allow_tf32 = False
TOLERANCE = 1e-5


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def run_cli(*args) -> int:
    return convert.main([str(a) for a in args])


def open_clip_reference(model, images):
    """open_clip's own outputs: ln_post's output on every token (CLS first) and encode_image."""
    got = {}
    hook = model.visual.ln_post.register_forward_hook(lambda module, args, out: got.update(tokens=out))
    with torch.no_grad():
        summary = model.encode_image(images)
    hook.remove()
    return got["tokens"].numpy(), summary.numpy()


def open_clip_trunk_reference(model, images):
    with torch.no_grad():
        return model.visual.trunk.forward_features(images).numpy(), model.encode_image(images).numpy()


def timm_reference(model, images):
    with torch.no_grad():
        tokens = model.forward_features(images)
        return tokens.numpy(), model.forward_head(tokens, pre_logits=True).numpy()


def random_siglip(name: str, depth: int, seed: int = 0, **kwargs):
    """timm's SigLIP image tower with big_vision's activation (flax nn.gelu: tanh) and random weights."""
    model = timm.create_model(
        name, pretrained=False, num_classes=0, act_layer="gelu_tanh", depth=depth, **kwargs
    )
    layouts.randomize_all_(model, seed)
    return model.eval()


def siglip_npz(model, path: Path, **layout) -> Path:
    """Writes the big_vision file and checks that timm's own loader reads it back to the same weights."""
    np.savez(path, **layouts.big_vision_siglip(model, **layout))
    again = copy.deepcopy(model)
    layouts.randomize_all_(again, 99)
    again.load_pretrained(str(path))  # timm's _load_weights, as for big_vision's released files
    for (name, ours), theirs in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), f"timm reads {name} differently from {path.name}"
    return path


# ---------------------------------------------------------------- the official files of each family


def clip_b16_torchscript(tmp: Path):
    """OpenAI's ViT-B-16.pt: a TorchScript archive in fp16, QuickGELU, full depth."""
    model = layouts.random_open_clip(768, 12, 16, 224, quick_gelu=True, embed_dim=512, seed=1)
    layouts.openai_torchscript(copy.deepcopy(model), tmp / "ViT-B-16.pt")
    model = model.half().float()  # the weights as the archive holds them
    return model, tmp / "ViT-B-16.pt", (), open_clip_reference, 224


def clip_l14_336_state_dict(tmp: Path):
    """ViT-L/14@336px as a plain state dict (text tower included), reduced depth."""
    model = layouts.random_open_clip(1024, 2, 14, 336, quick_gelu=True, embed_dim=768, seed=2)
    torch.save(model.state_dict(), tmp / "ViT-L-14-336px.pth")
    return model, tmp / "ViT-L-14-336px.pth", ("--format", "clip"), open_clip_reference, 336


def openclip_b16_layerscale(tmp: Path):
    """An OpenCLIP ViT-B/16 with LayerScale (ls_1 / ls_2: OpenCLIP's own, so --format auto knows it)."""
    model = layouts.random_open_clip(768, 2, 16, 224, layerscale=True, embed_dim=512, seed=3)
    torch.save(model.state_dict(), tmp / "open_clip_pytorch_model.bin")
    return model, tmp / "open_clip_pytorch_model.bin", (), open_clip_reference, 224


def openclip_siglip_trunk(tmp: Path):
    """open_clip's ViT-B-16-SigLIP: a timm trunk (visual.trunk.*, MAP head), reduced depth."""
    model = layouts.random_open_clip_timm_trunk("vit_base_patch16_siglip_224", 2, 768, seed=4)
    torch.save(model.state_dict(), tmp / "open_clip_pytorch_model.bin")
    return model, tmp / "open_clip_pytorch_model.bin", (), open_clip_trunk_reference, 224


def siglip_b16(tmp: Path):
    """big_vision's SigLIP B/16 at 224, full depth, one encoderblock_N per block."""
    model = random_siglip("vit_base_patch16_siglip_224", 12, seed=5)
    return model, siglip_npz(model, tmp / "webli_en_b16_224.npz"), (), timm_reference, 224


def siglip_so400m14_384(tmp: Path):
    """So400m/14 at 384 px (a 27 x 27 grid: 378 px), big_vision's scanned layout, reduced depth."""
    model = random_siglip("vit_so400m_patch14_siglip_378", 2, seed=6)
    path = siglip_npz(model, tmp / "webli_en_so400m_384.npz", stacked=True)
    return model, path, (), timm_reference, 378


# case -> (builder, format auto-detection must give, mean, input rule)
CASES = {
    "clip_b16_torchscript": (clip_b16_torchscript, "clip", "openai", "bicubic"),
    "clip_l14_336_state_dict": (clip_l14_336_state_dict, "clip", "openai", "bicubic"),
    "openclip_b16_layerscale": (openclip_b16_layerscale, "openclip", "openai", "bicubic"),
    "openclip_siglip_trunk": (openclip_siglip_trunk, "openclip", "half", "bicubic"),
    "siglip_b16": (siglip_b16, "siglip", "half", "squash"),
    "siglip_so400m14_384": (siglip_so400m14_384, "siglip", "half", "squash"),
}
MEANS = {"openai": (0.48145466, 0.4578275, 0.40821073), "half": (0.5, 0.5, 0.5)}


def conversion_errors(case: str, tmp: Path) -> dict:
    build, expected_format, mean, rule = CASES[case]
    model, src, args, reference, img_size = build(tmp)
    assert run_cli(src, tmp / "out", *args) == 0
    teacher = load_teacher(tmp / "out")
    images = torch.randn((1, 3, img_size, img_size), generator=torch.Generator().manual_seed(0))
    tokens, summary = reference(model, images)
    with jax.default_matmul_precision("highest"):
        features = teacher.forward(jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
    spec = teacher.spec
    assert features.tokens().shape == tokens.shape and features.summary.shape == summary.shape
    assert (spec.format, spec.mean, spec.input_resize) == (expected_format, MEANS[mean], rule)
    return dict(case=case, format=spec.format, variant=spec.variant, img_size=spec.img_size,
                tokens=spec.num_tokens, summary_dim=spec.summary_dim, act=spec.act,
                tokens_error=relative_error(features.tokens(), tokens),
                summary_error=relative_error(features.summary, summary))  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_official_file_converts_to_the_reference_libraries_tokens_and_summary(case, tmp_path):
    result = conversion_errors(case, tmp_path)
    assert result["tokens_error"] <= TOLERANCE and result["summary_error"] <= TOLERANCE, result


# ---------------------------------------------------------------- options, resize


def expect_refusal(capsys, tmp_path, args, *fragments) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dmt-convert: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temp directory left
    return err


@pytest.fixture(scope="module")
def mu_clip():
    return layouts.random_open_clip(64, 2, 8, 32, quick_gelu=True, seed=7)


def test_auto_refuses_to_guess_openai_or_openclip_and_act_decides(capsys, tmp_path, mu_clip):
    torch.save(mu_clip.state_dict(), tmp_path / "model.bin")
    expect_refusal(
        capsys, tmp_path, [tmp_path / "model.bin", tmp_path / "out"], "--format clip", "--format openclip"
    )
    images = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    tokens, summary = open_clip_reference(mu_clip, images)
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    for name, args in (
        ("openai", ["--format", "clip"]),
        ("quick", ["--format", "openclip", "--act", "quick_gelu"]),
    ):
        assert run_cli(tmp_path / "model.bin", tmp_path / name, *args) == 0
        teacher = load_teacher(tmp_path / name)
        assert teacher.spec.act == "quick_gelu"
        assert relative_error(teacher.features(x), tokens) <= TOLERANCE
        assert relative_error(teacher.summary(x), summary) <= TOLERANCE
    assert run_cli(tmp_path / "model.bin", tmp_path / "gelu", "--format", "openclip") == 0
    assert (
        relative_error(load_teacher(tmp_path / "gelu").features(x), tokens) > 1e-3
    )  # the activation matters
    args = [tmp_path / "model.bin", tmp_path / "out", "--format", "clip", "--act", "gelu"]
    expect_refusal(capsys, tmp_path, args, "--act does not apply to --format clip")


def test_clip_resize_is_open_clips_resize_pos_embed(capsys, tmp_path, mu_clip):
    from open_clip.model import resize_pos_embed

    torch.save(mu_clip.state_dict(), tmp_path / "model.pth")
    assert run_cli(tmp_path / "model.pth", tmp_path / "out", "--format", "clip", "--img-size", 48) == 0
    phases = [line.split(" ")[1] for line in capsys.readouterr().out.splitlines()]
    assert phases == ["reading", "resizing", "writing", "wrote"]  # one line per phase of a long conversion
    teacher = load_teacher(tmp_path / "out")
    assert (teacher.spec.grid, teacher.spec.pos_embed_resize, teacher.spec.source_img_size) == (
        6,
        "bicubic_size_antialias",
        32,
    )
    bigger = layouts.random_open_clip(64, 2, 8, 48, quick_gelu=True, seed=8)
    state = mu_clip.state_dict()
    resize_pos_embed(state, bigger)  # open_clip's own, in place
    bigger.load_state_dict(state)
    np.testing.assert_array_equal(
        np.asarray(teacher.params["pos_embed"])[0], state["visual.positional_embedding"]
    )
    images = torch.randn((2, 3, 48, 48), generator=torch.Generator().manual_seed(2))
    tokens, summary = open_clip_reference(bigger, images)
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    assert relative_error(teacher.features(x), tokens) <= TOLERANCE
    assert relative_error(teacher.summary(x), summary) <= TOLERANCE


def big_vision_resample_posemb(old, new):
    """big_vision/models/vit.py resample_posemb (0127fb6), verbatim but for logging."""
    import scipy.ndimage

    if old.shape == new.shape:
        return old
    gs_old = int(np.sqrt(old.shape[1]))
    gs_new = int(np.sqrt(new.shape[1]))
    grid = old.reshape(gs_old, gs_old, -1)
    zoom = (gs_new / gs_old, gs_new / gs_old, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    grid = grid.reshape(1, gs_new * gs_new, -1)
    return grid


def mu_siglip_vit(img_size: int):
    from timm.models.vision_transformer import VisionTransformer

    options = dict(class_token=False, global_pool="map", act_layer="gelu_tanh", num_classes=0)
    return VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=64, depth=3, num_heads=2, **options
    ).eval()


@pytest.fixture(scope="module")
def mu_siglip():
    model = mu_siglip_vit(32)
    layouts.randomize_all_(model, 9)
    return model


def test_siglip_resize_is_big_visions_resample_posemb(tmp_path, mu_siglip):
    path = siglip_npz(mu_siglip, tmp_path / "siglip.npz")
    assert run_cli(path, tmp_path / "out", "--img-size", 56) == 0
    teacher = load_teacher(tmp_path / "out")
    assert (teacher.spec.grid, teacher.spec.pos_embed_resize) == (7, "linear_zoom")
    expected = big_vision_resample_posemb(mu_siglip.pos_embed.detach().numpy(), np.zeros((1, 49, 64)))
    np.testing.assert_array_equal(np.asarray(teacher.params["pos_embed"]), expected)

    bigger = mu_siglip_vit(56)
    bigger.load_state_dict(mu_siglip.state_dict() | {"pos_embed": torch.from_numpy(expected)})
    images = torch.randn((2, 3, 56, 56), generator=torch.Generator().manual_seed(3))
    tokens, summary = timm_reference(bigger, images)
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    assert relative_error(teacher.features(x), tokens) <= TOLERANCE
    assert relative_error(teacher.summary(x), summary) <= TOLERANCE


# ------------------------------------------------------------ bad files: one line, exit 2, nothing written


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _without(arrays: dict, fragment: str) -> dict:
    return {k: v for k, v in arrays.items() if fragment not in k}


def _poisoned(arrays: dict) -> dict:
    arrays = dict(arrays)
    key = "params/img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias"
    arrays[key] = arrays[key].copy()
    arrays[key][3] = np.nan
    return arrays


def _extra_block(arrays: dict) -> dict:
    block = "params/img/Transformer/encoderblock_2/"
    return arrays | {k.replace(block, "params/img/Transformer/encoderblock_7/"): v for k, v in arrays.items()
                     if k.startswith(block)}  # fmt: skip


BAD_NPZ = {
    "truncated": (lambda a: _npz_bytes(a)[:3000], "truncated or not an .npz"),
    "not an npz": (lambda a: b"PK\x03\x04 not really", "truncated or not an .npz"),
    "no MAPHead_0": (lambda a: _npz_bytes(_without(a, "MAPHead_0")), "no params/img/MAPHead_0"),
    "a missing block": (
        lambda a: _npz_bytes(_without(a, "encoderblock_1/")),
        "blocks are not numbered 0..1: 2 blocks found, blocks 1 missing, blocks 2 beyond them",
    ),
    "an extra block": (
        lambda a: _npz_bytes(_extra_block(a)),
        "4 blocks found, blocks 3 missing, blocks 7 beyond them",
    ),
    "a missing tensor": (
        lambda a: _npz_bytes(_without(a, "encoderblock_2/LayerNorm_1/bias")),
        "missing tensors: blocks.2.norm2.bias",
    ),
    "an unknown tensor": (
        lambda a: _npz_bytes(a | {"params/img/head/kernel": np.zeros((64, 10), np.float32)}),
        "unexpected tensors: params/img/head/kernel",
    ),
    "NaN": (lambda a: _npz_bytes(_poisoned(a)), "NaN or Inf: blocks.1.mlp.fc1.bias"),
    "NaFlex": (
        lambda a: _npz_bytes(a | {"params/img/embedding/kernel": np.zeros((192, 64), np.float32)}),
        "a NaFlex tower, which is not supported",
    ),
    "pickled objects": (
        lambda a: _pickled_npz(),
        "truncated or not an .npz file (Object arrays cannot be loaded when allow_pickle=False)",
    ),
}


def _pickled_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{"params/img/embedding/kernel": np.array([object()], dtype=object)})
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(BAD_NPZ))
def test_bad_big_vision_files_are_refused_in_one_line(name, capsys, tmp_path, mu_siglip):
    make, message = BAD_NPZ[name]
    (tmp_path / "bad.npz").write_bytes(make(layouts.big_vision_siglip(mu_siglip)))
    expect_refusal(capsys, tmp_path, [tmp_path / "bad.npz", tmp_path / "out"], message)


def test_torchscript_archives_without_tensors_or_cut_short_are_refused(capsys, tmp_path, mu_clip):
    class Empty(torch.nn.Module):
        def forward(self, x):
            return x + 1

    torch.jit.save(torch.jit.script(Empty()), str(tmp_path / "empty.pt"))
    expect_refusal(capsys, tmp_path, [tmp_path / "empty.pt", tmp_path / "out"], "holding no tensors")
    layouts.openai_torchscript(copy.deepcopy(mu_clip), tmp_path / "clip.pt")
    data = (tmp_path / "clip.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    expect_refusal(capsys, tmp_path, [tmp_path / "cut.pt", tmp_path / "out"], "cut.pt")


class _RunsCode:
    """A pickle whose loading would create a directory (stands in for any code execution)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.target,))


def test_a_torchscript_archive_cannot_run_code(capsys, tmp_path):
    import pickle
    import zipfile

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr(
            "evil/data.pkl", pickle.dumps({"visual.conv1.weight": _RunsCode(tmp_path / "pwned")})
        )
        archive.writestr("evil/code/__torch__.py", "import os\nos.mkdir('pwned')\n")
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
    args = [tmp_path / "evil.pt", tmp_path / "out"]
    expect_refusal(
        capsys, tmp_path, args, "refused to read the TorchScript archive", "mkdir", "nothing was run"
    )
    assert not (tmp_path / "pwned").exists()


def test_help_lists_every_format(capsys):
    from dmt_jax import formats

    with pytest.raises(SystemExit):
        convert.parse_args(["--help"])
    out = capsys.readouterr().out
    for name, fmt in formats.FORMATS.items():
        assert f"  {name} " in out and fmt.repo in out, name


if __name__ == "__main__":
    import contextlib
    import tempfile

    jax.config.update("jax_default_matmul_precision", "highest")
    for name in sys.argv[1:] or CASES:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            result = conversion_errors(name, Path(tmp))
        print(json.dumps(result), flush=True)
