"""The official teacher checkpoint formats: one module per source repository, asked in DETECTION_ORDER.

Each module defines `FORMAT`, a `CheckpointFormat` (formats/_base.py): how to recognise its file, how
to unwrap it to the family's reference names (timm's, as timm's checkpoint filters do), the family
config its shapes imply, its name table into Flax (names_<family>.py), the position-table resize its
own code uses, and its input normalization. formats imports models only (never teachers, train or
config), and torch only inside functions.
"""

from __future__ import annotations

from collections.abc import Mapping

from dmt_jax.formats import clip, dino, dinov2, eva02, ibot, mae, mocov3, openclip, sam, siglip, timm_vit
from dmt_jax.formats._base import (
    CONV,
    COPY,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LINEAR,
    OPENAI_MEAN,
    OPENAI_STD,
    POS_EMBED_RESIZERS,
    TO_FLAX,
    TO_TIMM,
    CheckpointFormat,
    FormatError,
    name_list,
    resize_pos_embed,
)
from dmt_jax.formats.names_vit import (
    NAME_TABLE,
    Architecture,
    check_backbone,
    expected_timm_shapes,
    flax_to_timm,
    infer_architecture,
    timm_to_flax,
)

# Asked in this order; the first whose detect() says yes names the format. Distinctive keys first:
# SAM's image_encoder.* (with rel_pos tables), big_vision's params/img/..., then EVA-02's SwiGLU (w3,
# or fc1_g beside q_proj: before the CLIP layouts, whose visual. and visual.trunk. prefixes its towers
# share), then the CLIP layouts (clip refuses to guess between OpenAI and OpenCLIP where only the
# activation differs); MAE's full file also has a mask_token (1,1,512), so MAE is asked before DINOv2;
# a bare backbone with nothing distinctive is read as DINO. timm's own ViT weights are never detected
# (timm_vit.py): they come by name (dmt_jax/hub.py) or --format timm.
DETECTION_ORDER: tuple[str, ...] = (
    "sam", "siglip", "eva02", "clip", "openclip", "mae", "mocov3", "ibot", "dinov2", "dino", "timm"
)  # fmt: skip
_MODULES = (sam, siglip, eva02, clip, openclip, mae, mocov3, ibot, dinov2, dino, timm_vit)
FORMATS: dict[str, CheckpointFormat] = {m.FORMAT.name: m.FORMAT for m in _MODULES}
assert set(DETECTION_ORDER) == set(FORMATS), "every format is asked, once"


def get(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(DETECTION_ORDER)}")
    return FORMATS[name]


def detect(ckpt: Mapping) -> str:
    """The format's name from the checkpoint's keys; FormatError (one line) naming the keys seen, or
    naming the --format choices where the keys cannot tell (a detect() raises that itself)."""
    for name in DETECTION_ORDER:
        if FORMATS[name].detect(ckpt):
            return name
    raise FormatError(
        f"checkpoint format not recognized: keys seen: {name_list(ckpt, 10)}; "
        f"known formats: {', '.join(DETECTION_ORDER)} (pass --format to choose one)"
    )


detect_format = detect  # the name before formats/ was a package


def resize_method(name: str, config) -> str | None:
    """The interpolation format `name` resizes a `config` teacher's position tables with (the name
    spec.json's pos_embed_resize records after a resize), without resizing; None for a name that is
    no format (random and demo teachers) or a format that cannot be resized."""
    fmt = FORMATS.get(name)
    return fmt.resize.method(config) if fmt is not None and fmt.resize is not None else None


__all__ = [
    "CONV",
    "COPY",
    "DETECTION_ORDER",
    "FORMATS",
    "HALF",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LINEAR",
    "NAME_TABLE",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "POS_EMBED_RESIZERS",
    "TO_FLAX",
    "TO_TIMM",
    "Architecture",
    "CheckpointFormat",
    "FormatError",
    "check_backbone",
    "detect",
    "detect_format",
    "expected_timm_shapes",
    "flax_to_timm",
    "get",
    "infer_architecture",
    "name_list",
    "resize_method",
    "resize_pos_embed",
    "timm_to_flax",
]
