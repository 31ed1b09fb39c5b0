"""Teachers by name (`dmt-convert timm:NAME OUT`, hf-hub:, torchhub:), from hub caches built on disk here in
the layouts the libraries read offline (no test reaches a hub): the Hugging Face cache
(models--ORG--NAME/snapshots/REV/FILE + refs/main) and torch hub's checkpoints folder. Each command runs
in a process of its own, as a user runs it, with HF_HUB_OFFLINE=1; the converted teacher's features are
compared with timm's on the same weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from helpers_run import REPO

from dmt_jax import hub
from dmt_jax.teachers import load_teacher

try:
    from tests import checkpoint_layouts as layouts
except ImportError:  # tests/ is not a package
    import checkpoint_layouts as layouts

torch.backends.cuda.matmul.allow_tf32 = False
TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k"  # a real timm name: ViT-Ti/16, 21843-class head, mean 0.5


def dmt_convert(*args, home: Path) -> subprocess.CompletedProcess:
    """`dmt-convert ARGS` offline, its caches under `home` (HF_HUB_CACHE, TORCH_HOME)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(home / "hf"), TORCH_HOME=str(home / "torch"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "dmt_jax.convert", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def hf_cache_file(home: Path, repo: str, filename: str, revision: str = "local") -> Path:
    """Where huggingface_hub finds FILE of REPO offline: snapshots/REV/FILE, refs/main naming REV."""
    folder = home / "hf" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    path = folder / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def features_error(teacher, timm_model, img_size: int) -> float:
    images = torch.randn((2, 3, img_size, img_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = timm_model.forward_features(images).numpy().astype(np.float64)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(teacher.features(jnp.asarray(images.permute(0, 2, 3, 1).numpy())), np.float64)
    assert ours.shape == reference.shape
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def timm_tiny():
    """timm's own vit_tiny_patch16_224 with its 21843-class head, random values everywhere."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=21843)
    layouts.randomize_(model, seed=5)
    return model.eval()


def test_a_timm_name_converts_from_the_hub_cache_as_timm_computes(timm_tiny, tmp_path):
    weights = {k: v.contiguous() for k, v in timm_tiny.state_dict().items()}
    safetensors.torch.save_file(weights, hf_cache_file(tmp_path, f"timm/{TIMM_NAME}", "model.safetensors"))
    done = dmt_convert(f"timm:{TIMM_NAME}", tmp_path / "teacher", home=tmp_path)
    assert done.returncode == 0, done.stderr
    teacher = load_teacher(tmp_path / "teacher")
    spec = teacher.spec
    assert spec.format == "timm" and spec.source == f"timm:{TIMM_NAME} (hf-hub:timm/{TIMM_NAME})", spec
    # From timm's pretrained_cfg: mean/std 0.5, bicubic; from timm's model: eps 1e-6, 3 heads, GELU.
    assert (spec.mean, spec.std, spec.input_resize) == ((0.5,) * 3, (0.5,) * 3, "bicubic"), spec
    assert (spec.img_size, spec.width, spec.config.num_heads, spec.config.act) == (224, 192, 3, "gelu")
    assert spec.summary_dim == 192  # the classifier head is not part of the teacher
    timm_tiny.reset_classifier(0)
    assert features_error(teacher, timm_tiny, 224) < 1e-5


def test_an_hf_hub_repo_reads_its_config_and_resizes_as_timm(tmp_path):
    """hf-hub:ORG/REPO: timm's config.json (architecture, model_args, pretrained_cfg), then the weights;
    --img-size resizes the position table as timm does (resample_abs_pos_embed)."""
    repo = "someone/tiny-vit-quickgelu"
    model_args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, act_layer="quick_gelu")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    config = {
        "architecture": "vit_base_patch16_224",
        "num_classes": 0,
        "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": mean, "std": std, "interpolation": "bilinear"},
    }
    hf_cache_file(tmp_path, repo, "config.json").write_text(json.dumps(config))
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **model_args)
    layouts.randomize_(model, seed=6)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(weights, hf_cache_file(tmp_path, repo, "model.safetensors"))

    done = dmt_convert(f"hf-hub:{repo}", tmp_path / "teacher", "--img-size", 48, home=tmp_path)
    assert done.returncode == 0, done.stderr
    spec = load_teacher(tmp_path / "teacher").spec
    assert spec.source.startswith(f"hf-hub:{repo}") and spec.config.act == "quick_gelu", spec
    assert (spec.mean, spec.std, spec.input_resize) == (mean, std, "bilinear"), spec
    assert (spec.source_img_size, spec.img_size, spec.pos_embed_resize) == (32, 48, "bicubic_size_antialias")
    resized = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, **model_args | {"img_size": 48}
    )
    resized.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(weights, resized))
    assert features_error(load_teacher(tmp_path / "teacher"), resized.eval(), 48) < 1e-5


def test_a_torchhub_name_converts_the_official_file_from_torch_hubs_folder(tmp_path):
    model = layouts.random_timm_vit(layouts.TINY_14_REG, seed=7)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(layouts.dinov2_layout(model), folder / "dinov2_vits14_reg4_pretrain.pth")
    done = dmt_convert(
        "torchhub:facebookresearch/dinov2:dinov2_vits14_reg", tmp_path / "teacher", home=tmp_path
    )
    assert done.returncode == 0, done.stderr
    teacher = load_teacher(tmp_path / "teacher")
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    assert teacher.spec.format == "dinov2" and teacher.spec.num_reg_tokens == 4
    assert teacher.spec.source == f"torchhub:facebookresearch/dinov2:dinov2_vits14_reg ({url})"
    assert features_error(teacher, model, layouts.TINY_14_REG.img_size) < 1e-5


def test_open_clip_names_convert_as_open_clip_computes(tmp_path):
    """OpenAI's weights (format clip) and a *-quickgelu OpenCLIP model (format openclip, its QuickGELU
    from open_clip's table: the tensors cannot tell), each from its open_clip hub file."""
    model = layouts.random_open_clip(64, 2, 8, 32, quick_gelu=True, seed=8)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    names = {
        "ViT-B-16/openai": ("timm/vit_base_patch16_clip_224.openai", "clip"),
        "ViT-B-16-quickgelu/metaclip_400m": ("timm/vit_base_patch16_clip_224.metaclip_400m", "openclip"),
    }
    images = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    tokens = {}
    hook = model.visual.ln_post.register_forward_hook(lambda module, args, out: tokens.update(ln_post=out))
    with torch.no_grad():
        summary = model.encode_image(images).numpy()
    hook.remove()
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    for name, (repo, fmt) in names.items():
        safetensors.torch.save_file(weights, hf_cache_file(tmp_path, repo, "open_clip_model.safetensors"))
        out = tmp_path / fmt
        done = dmt_convert(f"open_clip:{name}", out, home=tmp_path)
        assert done.returncode == 0, done.stderr
        teacher = load_teacher(out)
        spec = teacher.spec
        assert spec.format == fmt and spec.config.act == "quick_gelu", spec
        assert spec.source == f"open_clip:{name} (hf-hub:{repo})" and spec.mean[0] == 0.48145466, spec
        with jax.default_matmul_precision("highest"):
            assert relative_error(teacher.features(x), tokens["ln_post"].numpy()) < 1e-5
            assert relative_error(teacher.summary(x), summary) < 1e-5


def test_an_eva02_clip_tower_by_name_converts_as_timm_computes(tmp_path):
    """hf-hub: with timm's Eva (EVA-02 CLIP B/16, cut to 2 blocks by model_args): format eva02, its
    projection head kept, tokens and summary as timm's."""
    repo, arch = "someone/eva02-clip-b16-2blocks", "eva02_base_patch16_clip_224"
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    config = {
        "architecture": arch,
        "num_classes": 512,
        "model_args": {"depth": 2},
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": mean, "std": std, "num_classes": 512},
    }
    hf_cache_file(tmp_path, repo, "config.json").write_text(json.dumps(config))
    model = timm.create_model(arch, pretrained=False, depth=2)
    layouts.randomize_(model, seed=9)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(weights, hf_cache_file(tmp_path, repo, "model.safetensors"))
    done = dmt_convert(f"hf-hub:{repo}", tmp_path / "teacher", home=tmp_path)
    assert done.returncode == 0, done.stderr
    teacher = load_teacher(tmp_path / "teacher")
    assert (teacher.spec.format, teacher.spec.family, teacher.spec.summary_dim) == ("eva02", "eva", 512)
    assert teacher.spec.mean == mean and teacher.spec.source.startswith(f"hf-hub:{repo}")
    images = torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = model.forward_features(images)
        summary = model.forward_head(tokens).numpy()
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    with jax.default_matmul_precision("highest"):
        assert relative_error(teacher.features(x), tokens.numpy()) < 1e-5
        assert relative_error(teacher.summary(x), summary) < 1e-5


def test_a_sam_encoder_by_torchhub_name(tmp_path):
    """torchhub:sam_vit_b: the official file's name in torch hub's folder (a small SAM inside, built by
    segment-anything as test_sam.py builds it), converted as format sam."""
    from test_sam import SMALL, official_state, random_images, random_reference, reference_tokens

    reference = random_reference(SMALL, seed=4)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(official_state(reference), folder / "sam_vit_b_01ec64.pth")
    done = dmt_convert("torchhub:sam_vit_b", tmp_path / "teacher", home=tmp_path)
    assert done.returncode == 0, done.stderr
    teacher = load_teacher(tmp_path / "teacher")
    url = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert (teacher.spec.format, teacher.spec.source) == ("sam", f"torchhub:sam_vit_b ({url})")
    images = random_images(SMALL, 1)
    with jax.default_matmul_precision("highest"):
        ours = teacher.features(jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
    assert relative_error(ours, reference_tokens(reference, images)) < 1e-5


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmt-convert: error: "), done.stderr
    return lines[0]


def test_without_network_or_cache_one_line_says_what_to_download_and_where(timm_tiny, tmp_path):
    line = _error_line(dmt_convert(f"timm:{TIMM_NAME}", tmp_path / "teacher", home=tmp_path))
    url = f"https://huggingface.co/timm/{TIMM_NAME}/resolve/main/model.safetensors"
    assert "HF_HUB_OFFLINE=1" in line, line
    # Doing what the line says (the file into the named snapshot folder, its name into refs/main) works.
    found = re.search(r"download (\S+) to (\S+) and write '(\w+)' into (\S+)$", line)
    assert found and found.group(1) == url, line
    target, revision, ref = Path(found.group(2)), found.group(3), Path(found.group(4))
    assert target.parent.name == revision and target.name == "model.safetensors", line
    assert ref == tmp_path / "hf" / f"models--timm--{TIMM_NAME}" / "refs" / "main", line
    target.parent.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in timm_tiny.state_dict().items()}
    safetensors.torch.save_file(weights, target)
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(revision)
    assert dmt_convert(f"timm:{TIMM_NAME}", tmp_path / "teacher", home=tmp_path).returncode == 0

    line = _error_line(dmt_convert("torchhub:dinov2_vitb14", tmp_path / "t2", home=tmp_path))
    target = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_pretrain.pth"
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
    assert line.endswith(f"download {url} and put it at {target}"), line


def test_unknown_names_get_the_nearest_known_ones():
    cases = {
        "timm:vit_tiny_patch16_244": "did you mean vit_tiny_patch16_224",
        "torchhub:dinov2_vitb16": "did you mean dinov2_vitb14",
        "torchhub:dinov2_vitg14_reg": "DINOv2 g/14's SwiGLU MLP is not one this ViT has",
        "torchhub:facebookresearch/dino:dino_vitb16": "torchhub names here come from facebookresearch/dinov2",
        "open_clip:ViT-B-16/opnai": "did you mean ViT-B-16/openai",
        "open_clip:ViT-B-16": "open_clip:MODEL/PRETRAINED",
        "open_clip:RN50/openai": "its image tower is neither a ViT nor an EVA-02",
        "timm:resnet50.a1_in1k": "a timm ResNet, not a VisionTransformer or Eva: those do not convert",
        "timm:eva02_tiny_patch14_224.mim_in22k": "its tokens have no final LayerNorm (fc_norm on the pooled",
        "timm:vit_giant_patch14_dinov2.lvd142m": "its MLP (GluMlp with SiLU) is not one this ViT has",
    }
    for name, says in cases.items():
        assert hub.is_name(name)
        with pytest.raises(hub.HubError, match=re.escape(says)):
            hub.fetch(name)
