"""huggingface/pytorch-image-models: a timm VisionTransformer's own state dict, as timm hosts its weights
(`timm/NAME` on the Hugging Face hub: model.safetensors / pytorch_model.bin). The names are already the
reference's; a classifier head goes (features only), a projection head (CLIP's, whose bias timm sets to
zero) stays. Never detected: a bare timm dict is indistinguishable from DINO's, so it comes by name
(`dmt-convert timm:NAME` / `hf-hub:REPO`, dmt_jax/hub.py, which also passes what the shapes cannot tell:
act, ln_eps, num_heads, mean, std, input_resize, from timm's own model and pretrained_cfg) or by
`--format timm`."""

from __future__ import annotations

from collections.abc import Mapping

from dmt_jax.formats._base import CheckpointFormat, strip
from dmt_jax.formats.names_vit import pos_embed_resizer, to_flax, vit_config


def _is_zero(tensor) -> bool:
    return not bool((tensor != 0).any())


def to_reference(ckpt: Mapping) -> dict:
    sd = {strip(k, "module."): v for k, v in ckpt.items()}
    head_bias = sd.pop("head.bias", None)
    if head_bias is not None and not _is_zero(head_bias):  # a classifier: not part of the features
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "pre_logits."))}
    return sd


def infer(state_dict: Mapping, options: Mapping):
    return vit_config(state_dict, options, extras=True)


FORMAT = CheckpointFormat(
    name="timm",
    repo="huggingface/pytorch-image-models",
    family="vit",
    detect=lambda c: False,
    to_reference=to_reference,
    infer=infer,
    to_flax=to_flax,
    resize=pos_embed_resizer(lambda c: "bicubic_size_antialias"),  # timm's resample_abs_pos_embed
    input_resize="bicubic",
    options=("act", "num_heads", "ln_eps"),
    summary="timm's own ViT weights (timm:NAME, hf-hub:REPO; never detected)",
)
