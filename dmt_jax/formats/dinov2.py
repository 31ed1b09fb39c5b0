"""facebookresearch/dinov2: `dinov2_vit*14[_reg4]_pretrain.pth` = a plain state dict, minus mask_token
(1, D). With register_tokens, timm's _convert_dinov2: reg_token = register_tokens, cls_token +=
pos_embed[:, 0], pos_embed = the grid rows (registers get no position embedding)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from dmt_jax.formats._base import CheckpointFormat
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config


def to_reference(ckpt: Mapping) -> dict:
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in ckpt.items()}  # chunked blocks
    sd.pop("mask_token", None)
    if "register_tokens" in sd and "cls_token" in sd and "pos_embed" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return sd


def detect(ckpt: Mapping) -> bool:
    mask = ckpt.get("mask_token")
    return "register_tokens" in ckpt or (mask is not None and len(getattr(mask, "shape", ())) == 2)


FORMAT = CheckpointFormat(
    name="dinov2",
    repo="facebookresearch/dinov2",
    family="vit",
    detect=detect,
    to_reference=to_reference,
    infer=vit_config,
    to_flax=to_flax,
    # The register models interpolate with antialias and no offset; the others as DINO.
    resize=pos_embed_resizer(
        lambda c: "bicubic_size_antialias" if c.num_reg_tokens else "bicubic_scale_offset_0.1"
    ),
    summary="DINOv2 (dinov2_vit*14[_reg4]_pretrain.pth)",
)
