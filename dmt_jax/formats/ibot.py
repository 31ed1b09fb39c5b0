"""bytedance/ibot: `checkpoint_teacher.pth` = {'state_dict': backbone} (or the training file's teacher);
LayerScale as blocks.N.gamma_1/gamma_2; student files add masked_embed and head.*."""

from __future__ import annotations

import re
from collections.abc import Mapping

from dmt_jax.formats._base import CheckpointFormat, mapping, strip
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config


def to_reference(ckpt: Mapping) -> dict:
    if "state_dict" in ckpt:
        sd = mapping(ckpt["state_dict"], "checkpoint['state_dict']")
    else:
        sd = mapping(ckpt["teacher"], "checkpoint['teacher']") if "teacher" in ckpt else ckpt
    out = {}
    for k, v in sd.items():
        k = strip(k, "module.", "backbone.")
        if k.startswith("head.") or k == "masked_embed":
            continue
        out[re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k)] = v
    return out


def guess(ckpt: Mapping) -> str:
    """A {'state_dict': ...} file with no iBOT marker (a student's masked_embed, LayerScale named gamma_N,
    the patch head's last_layer2) is only a guess: other repositories save that layout too."""
    inner = ckpt.get("state_dict")
    names = (
        [strip(k, "module.", "backbone.") for k in inner if isinstance(k, str)]
        if isinstance(inner, Mapping)
        else []
    )
    marked = "ibot_loss" in ckpt or any(
        n == "masked_embed" or n.endswith((".gamma_1", ".gamma_2")) or "last_layer2" in n for n in names
    )
    if marked or "state_dict" not in ckpt:
        return ""
    return "a bare {'state_dict': ...} file, as iBOT's checkpoint_teacher.pth; other repositories save it too"


def detect(ckpt: Mapping) -> bool:
    return any(k in ckpt for k in ("state_dict", "ibot_loss", "masked_embed")) or "blocks.0.gamma_1" in ckpt


FORMAT = CheckpointFormat(
    name="ibot",
    repo="bytedance/ibot",
    family="vit",
    detect=detect,
    to_reference=to_reference,
    infer=vit_config,
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "bicubic_scale_offset_0.1"),  # DINO's interpolate_pos_encoding
    summary="iBOT (checkpoint_teacher.pth)",
    guess=guess,
)
