"""openai/CLIP, the image tower: the released TorchScript archives (ViT-B-32.pt, ViT-B-16.pt, ViT-L-14.pt,
ViT-L-14-336px.pt; read for their tensors only, formats/files.py) and their plain state dicts.

Keys `visual.{conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.{ln_1,
attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj}` beside the text
tower (dropped). timm's _convert_openai_clip names: QuickGELU, ln_pre after the position embedding, no
patch bias, LayerNorm eps 1e-5, heads = width / 64; `proj` is the image embedding (the summary).
An OpenCLIP state dict has the same keys and differs only in the activation: --format auto refuses to
guess between them.
"""

from __future__ import annotations

from collections.abc import Mapping

from dmt_jax.formats._base import (
    OPENAI_MEAN,
    OPENAI_STD,
    CheckpointFormat,
    FormatError,
    any_key,
    name_list,
    swap,
)
from dmt_jax.formats.files import TorchScriptState
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config

SWAPS = (
    ("conv1", "patch_embed.proj"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_post", "norm"),
    ("ln_", "norm"),
    ("in_proj_", "qkv."),
    ("out_proj", "proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("ls_1", "ls1"),  # OpenCLIP's LayerScale
    ("ls_2", "ls2"),
)
HEAD_WIDTH = 64  # OpenAI's and open_clip's default: heads = width / 64


def visual_to_timm(ckpt: Mapping, prefix: str = "visual.") -> dict:
    """The image tower of a CLIP-layout state dict under timm's names (timm's _convert_openai_clip)."""
    sd = {k.removeprefix(prefix): v for k, v in ckpt.items() if isinstance(k, str) and k.startswith(prefix)}
    if not sd:
        raise FormatError(f"no {prefix}* tensors (the image tower); keys seen: {name_list(ckpt, 10)}")
    out = {}
    for name, value in sd.items():
        if name == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif name == "positional_embedding":
            out["pos_embed"] = value[None]
        elif name == "proj":
            out["head.weight"] = value.T  # x @ proj == Linear with weight proj.T
        else:
            out[swap(name, SWAPS)] = value
    return out


def clip_heads(sd: Mapping) -> int | None:
    """width / 64, or None (the defaults decide) where the patch projection is missing or odd."""
    kernel = sd.get("patch_embed.proj.weight")
    width = tuple(getattr(kernel, "shape", ()))[:1]
    return width[0] // HEAD_WIDTH if width and width[0] % HEAD_WIDTH == 0 else None


def infer(sd: Mapping, options: Mapping):
    fixed = dict(extras=True, act="quick_gelu", ln_eps=1e-5, num_heads=clip_heads(sd))
    return vit_config(sd, options, **fixed)


def has_clip_layout(ckpt: Mapping) -> bool:
    return any_key(ckpt, "visual.transformer.resblocks.")


def detect(ckpt: Mapping) -> bool:
    """OpenAI's own files say so (a TorchScript archive; its state dict keeps input_resolution); LayerScale
    says OpenCLIP; anything else with these keys could be either: refuse to guess."""
    if not has_clip_layout(ckpt):
        return False
    if isinstance(ckpt, TorchScriptState) or "input_resolution" in ckpt:
        return True
    if any_key(ckpt, "visual.transformer.resblocks.0.ls_1"):
        return False  # OpenCLIP's
    raise FormatError(
        "this CLIP-layout state dict may be OpenAI's (QuickGELU) or an OpenCLIP one (GELU): the tensors "
        "cannot tell; pass --format clip for OpenAI's weights or --format openclip for the others "
        "(with --act quick_gelu for a *-quickgelu model)"
    )


FORMAT = CheckpointFormat(
    name="clip",
    repo="openai/CLIP",
    family="vit",
    detect=detect,
    to_reference=visual_to_timm,
    infer=infer,
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "bicubic_size_antialias"),  # open_clip's resize_pos_embed
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
    input_resize="bicubic",
    summary="OpenAI CLIP image tower (ViT-*.pt TorchScript archives, their state dicts)",
)
