"""facebookresearch/moco-v3: `vit-b-300ep.pth.tar` = {'state_dict': {'module.base_encoder.*',
'module.momentum_encoder.*', 'module.predictor.*'}, 'epoch', 'arch', 'optimizer'}: the base encoder
without its projection head."""

from __future__ import annotations

from collections.abc import Mapping

from dmt_jax.formats._base import CheckpointFormat, FormatError, any_key, mapping, name_list, strip, unwrap
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config


def to_reference(ckpt: Mapping) -> dict:
    sd = unwrap(ckpt, "state_dict", "mocov3")
    if not (any_key(sd, "module.base_encoder.") or any_key(sd, "base_encoder.")):
        raise FormatError(
            f"a mocov3 state_dict has module.base_encoder.* tensors; this one has {name_list(sd)}"
        )
    out = {}
    for k, v in sd.items():
        k = strip(k, "module.")
        if not k.startswith(("momentum_encoder.", "predictor.")):
            k = strip(k, "base_encoder.")
            if not k.startswith("head."):
                out[k] = v
    return out


def detect(ckpt: Mapping) -> bool:
    return any_key(mapping(ckpt.get("state_dict", ckpt), "checkpoint['state_dict']"), "module.base_encoder.")


FORMAT = CheckpointFormat(
    name="mocov3",
    repo="facebookresearch/moco-v3",
    family="vit",
    detect=detect,
    to_reference=to_reference,
    infer=vit_config,
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "bicubic_size_antialias"),  # MoCo v3's ViTs are timm's
    summary="MoCo v3 (vit-*-300ep.pth.tar)",
)
