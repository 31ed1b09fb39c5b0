"""mlfoundations/open_clip, the image tower: `open_clip_pytorch_model.bin` / `.safetensors`.

Either OpenAI's layout (`visual.conv1`, `visual.transformer.resblocks.N...`, optional LayerScale
`ls_1/ls_2.gamma`; formats/clip.py) with exact GELU unless the model is a *-quickgelu one (the tensors
cannot tell: `--act quick_gelu`), LayerNorm eps 1e-5 and ln_post on every token; or a timm trunk
(`visual.trunk.*` in timm's own names, where the trunk is a ViT, e.g. the SigLIP towers: no CLS token,
MAP head `attn_pool`, eps 1e-6, mean = std = 0.5) with an optional bias-free `visual.head.proj`.
The summary is the CLS token, then `proj` (open_clip's default pool_type 'tok'; towers pooling
otherwise, as the CLIPA 'avg' ones, are not told apart by their tensors and not supported).
Heads: width / 64 in OpenAI's layout (pass --num-heads for ViT-bigG-14 and ViT-g-14, whose heads are
104 and 88 wide), big_vision's count per width for a trunk without CLS token.
"""

from __future__ import annotations

from collections.abc import Mapping

from dmt_jax.formats._base import HALF, OPENAI_MEAN, OPENAI_STD, CheckpointFormat, Reference, any_key
from dmt_jax.formats.clip import clip_heads, has_clip_layout, visual_to_timm
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config
from dmt_jax.formats.siglip import SIGLIP_HEADS

TRUNK = "visual.trunk."


def to_reference(ckpt: Mapping) -> Reference:
    if not any_key(ckpt, TRUNK):
        sd = visual_to_timm(ckpt)
        return Reference(sd, ln_eps=1e-5, num_heads=clip_heads(sd))
    sd = {k.removeprefix(TRUNK): v for k, v in ckpt.items() if isinstance(k, str) and k.startswith(TRUNK)}
    for name, value in ckpt.items():  # the tower's head: a bias-free projection (proj_type 'linear')
        if isinstance(name, str) and name.startswith("visual.") and not name.startswith(TRUNK):
            sd["head.weight" if name == "visual.head.proj.weight" else name] = value  # others: unexpected
    width = tuple(getattr(sd.get("patch_embed.proj.weight"), "shape", (0,)))[0]
    heads = SIGLIP_HEADS.get(width) if "cls_token" not in sd else None
    return Reference(sd, ln_eps=1e-6, num_heads=heads)


def detect(ckpt: Mapping) -> bool:
    layerscale = has_clip_layout(ckpt) and any_key(ckpt, "visual.transformer.resblocks.0.ls_1")
    return any_key(ckpt, TRUNK) or layerscale


FORMAT = CheckpointFormat(
    name="openclip",
    repo="mlfoundations/open_clip",
    family="vit",
    detect=detect,
    to_reference=to_reference,
    infer=lambda sd, options: vit_config(sd, options, extras=True, act="gelu"),
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "bicubic_size_antialias"),  # resize_pos_embed / timm's resample
    mean=OPENAI_MEAN,
    std=OPENAI_STD,
    input_resize="bicubic",
    inputs_for=lambda c: {} if c.class_token else dict(mean=HALF, std=HALF),  # the SigLIP trunks
    options=("act", "num_heads"),
    summary="OpenCLIP image tower (open_clip_pytorch_model.bin: OpenAI layout, or a timm ViT trunk)",
)
