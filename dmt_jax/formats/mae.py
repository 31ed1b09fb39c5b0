"""facebookresearch/mae: `mae_pretrain_vit_*.pth` = {'model': encoder}; the *_full / visualize files add the
decoder (decoder_*) and a mask_token (1, 1, 512) that must not be read as DINOv2's."""

from __future__ import annotations

from collections.abc import Mapping

from dmt_jax.formats._base import CheckpointFormat, any_key, unwrap
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config


def to_reference(ckpt: Mapping) -> dict:
    sd = unwrap(ckpt, "model", "mae")
    return {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}


FORMAT = CheckpointFormat(
    name="mae",
    repo="facebookresearch/mae",
    family="vit",
    detect=lambda c: "model" in c or any_key(c, "decoder_"),
    to_reference=to_reference,
    infer=vit_config,
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "bicubic_size"),  # util/pos_embed.interpolate_pos_embed
    summary="MAE (mae_pretrain_vit_*.pth, *_full.pth)",
)
