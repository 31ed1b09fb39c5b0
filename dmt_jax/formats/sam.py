"""facebookresearch/segment-anything: `sam_vit_{b,l,h}_*.pth` = a plain state dict of the whole SAM:
`image_encoder.*` (kept, prefix stripped: segment-anything's ImageEncoderViT names) beside
`prompt_encoder.*` and `mask_decoder.*` (dropped). timm's vision_transformer_sam.checkpoint_filter_fn
reads it the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from dmt_jax.formats._base import IMAGENET_MEAN, IMAGENET_STD, POS_EMBED_RESIZERS, CheckpointFormat, any_key
from dmt_jax.formats.names_sam import sam_config, to_flax
from dmt_jax.models.sam import SamConfig

PREFIX = "image_encoder."
# pos_embed: timm's resample_abs_pos_embed_nhwc (segment-anything itself never resizes it); the global
# blocks' relative-position tables: linear, as segment-anything's get_rel_pos interpolates them at run
# time when the grid differs from the table (done once here, so the model indexes a table of its size).
POS_EMBED_METHOD = "bicubic_size_antialias"
RESIZE_METHOD = f"{POS_EMBED_METHOD}+rel_pos_linear"


def detect(ckpt: Mapping) -> bool:
    return any_key(ckpt, PREFIX) and any(isinstance(k, str) and k.endswith(".attn.rel_pos_h") for k in ckpt)


def to_reference(ckpt: Mapping) -> dict:
    return {k.removeprefix(PREFIX): v for k, v in ckpt.items() if isinstance(k, str) and k.startswith(PREFIX)}


def resize_rel_pos(table, rows: int):
    """[L, head_dim] -> [rows, head_dim], as get_rel_pos: F.interpolate(mode='linear') along L, float32."""
    import torch.nn.functional as F

    resized = F.interpolate(table.float().T[None], size=rows, mode="linear")
    return resized[0].T.contiguous().to(table.dtype)


def resize(state_dict: dict, config: SamConfig, img_size: int) -> tuple[dict, SamConfig, str]:
    """The position table (1, g, g, C) to the new grid and the global blocks' relative-position tables to
    2*grid-1 rows; the windowed blocks keep theirs (windows stay 14, padded as segment-anything pads)."""
    import torch

    grid = img_size // config.patch_size
    sd = dict(state_dict)
    pos = sd["pos_embed"] if torch.is_tensor(sd["pos_embed"]) else torch.from_numpy(sd["pos_embed"])
    nchw = pos.float().permute(0, 3, 1, 2)
    sd["pos_embed"] = (
        POS_EMBED_RESIZERS[POS_EMBED_METHOD](nchw, grid).permute(0, 2, 3, 1).contiguous().to(pos.dtype)
    )
    if config.use_rel_pos:
        for i in config.global_attn_indexes:
            for axis in "hw":
                name = f"blocks.{i}.attn.rel_pos_{axis}"
                sd[name] = resize_rel_pos(torch.as_tensor(sd[name]), 2 * grid - 1)
    return sd, dataclasses.replace(config, img_size=img_size), RESIZE_METHOD


resize.method = lambda config: RESIZE_METHOD  # formats.resize_method


FORMAT = CheckpointFormat(
    name="sam",
    repo="facebookresearch/segment-anything",
    family="sam",
    detect=detect,
    to_reference=to_reference,
    infer=sam_config,
    to_flax=to_flax,
    resize=resize,
    mean=IMAGENET_MEAN,  # SAM's pixel_mean/std are ImageNet's x 255
    std=IMAGENET_STD,
    input_resize="longest_pad",
    summary="SAM image encoder (sam_vit_{b,l,h}_*.pth; no summary)",
)
