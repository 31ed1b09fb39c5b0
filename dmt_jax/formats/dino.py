"""facebookresearch/dino: `dino_vit*_pretrain.pth` = a plain backbone, or the training file {'student',
'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'} whose teacher (the EMA network, the one evaluated)
is taken; backbone./module. prefixes and head.* go."""

from __future__ import annotations

from collections.abc import Mapping

from dmt_jax.formats._base import CheckpointFormat, mapping, strip
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config


def to_reference(ckpt: Mapping) -> dict:
    sd = mapping(ckpt["teacher"], "checkpoint['teacher']") if "teacher" in ckpt else ckpt
    out = {strip(k, "module.", "backbone."): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if not k.startswith("head.")}


BARE_BACKBONE = "a bare backbone with nothing distinctive, as DINO publishes; MAE's and iBOT's look the same"
# A bare backbone state dict with nothing distinctive is read as DINO (iBOT's and MAE's bare encoders are
# the same tensors; pass --format to record which it is and resize it their way): asked last.
FORMAT = CheckpointFormat(
    name="dino",
    repo="facebookresearch/dino",
    family="vit",
    detect=lambda c: "teacher" in c or "cls_token" in c,
    to_reference=to_reference,
    infer=vit_config,
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "bicubic_scale_offset_0.1"),  # interpolate_pos_encoding
    summary="DINO (dino_vit*_pretrain.pth, the full training file)",
    guess=lambda c: "" if "teacher" in c else BARE_BACKBONE,
)
