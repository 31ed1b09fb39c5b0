"""Student -> timm: a Flax ViT's params as a timm VisionTransformer state dict, saved as safetensors.

The name table in dmt_jax/formats/names_vit.py is read Flax -> timm (Linear kernels transposed back, conv
HWIO -> OIHW, LayerNorm scale -> weight). The file loads with

    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)  # any vit_* name
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)

where `kwargs` is what `export_timm` returns (also stored in the file's metadata as "timm_kwargs").
The metadata also holds "pretrained_cfg": timm's description of the expected input (input_size, mean,
std, interpolation, crop_pct, num_classes, ...), which `timm.data.resolve_data_config` and
`create_transform` turn into the matching preprocessing. Detection and segmentation frameworks that
build timm ViTs take the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from dmt_jax import formats, storage
from dmt_jax.teachers import IMAGENET_MEAN, IMAGENET_STD, flatten_params


def timm_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """A ViT's 'params' tree (nested or flat) -> timm-named float32 arrays; FormatError on anything else."""
    flat = flatten_params(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    state = {
        k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in formats.flax_to_timm(flat).items()
    }
    formats.check_backbone(state, formats.infer_architecture(state))
    return state


def timm_model_kwargs(state_dict: Mapping[str, np.ndarray], num_heads: int | None = None) -> dict:
    """Arguments for timm's VisionTransformer that give exactly these parameter names and shapes."""
    arch = formats.infer_architecture(state_dict)
    return dict(
        img_size=arch.grid * arch.patch_size,
        patch_size=arch.patch_size,
        embed_dim=arch.width,
        depth=arch.depth,
        num_heads=num_heads or arch.num_heads,
        mlp_ratio=arch.mlp_dim / arch.width,
        reg_tokens=arch.num_reg_tokens,
        no_embed_class=arch.no_embed_class,
        init_values=1.0 if arch.layerscale else None,  # any value: it only makes ls1/ls2 exist
        class_token=True,
        global_pool="token",
        num_classes=0,
    )


def timm_pretrained_cfg(
    img_size: int,
    *,
    num_classes: int = 0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    **extra,
) -> dict:
    """timm's pretrained_cfg for a ViT fed `img_size` px: what a timm user needs to preprocess its input.

    Defaults are what dmt_jax evaluates with: ImageNet mean/std on [0, 1] pixels, resize to
    img_size / crop_pct with antialiased bilinear interpolation, center crop. `extra` adds or
    overrides fields (e.g. label_names for a classifier).
    """
    return dict(
        input_size=[3, img_size, img_size],
        fixed_input_size=True,
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode="center",
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        num_classes=num_classes,
        first_conv="patch_embed.proj",
        classifier="head",
        **extra,
    )


def export_timm(
    params: Mapping,
    path: str | os.PathLike,
    *,
    num_heads: int | None = None,
    overwrite: bool = False,
    pretrained_cfg: Mapping | None = None,
) -> dict:
    """Writes the timm state dict of a student ViT to `path` (.safetensors), atomically; returns the
    timm kwargs. `num_heads`: only for a width whose head count is not the standard one.
    `pretrained_cfg`: stored in the metadata; default `timm_pretrained_cfg(the model's img_size)`."""
    if storage.path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    state = timm_state_dict(params)
    kwargs = timm_model_kwargs(state, num_heads)
    if pretrained_cfg is None:
        pretrained_cfg = timm_pretrained_cfg(kwargs["img_size"], num_classes=kwargs["num_classes"])
    save_timm_file(state, path, kwargs, pretrained_cfg)
    return kwargs


def save_timm_file(state: Mapping[str, np.ndarray], path: str | os.PathLike, kwargs: Mapping, pretrained_cfg):
    """Writes a timm state dict with its kwargs and pretrained_cfg in the metadata: whole or not at all,
    never through a link; a failed write (a full disk) is an OSError naming `path` (storage.atomic_local)."""
    from safetensors.numpy import save, save_file

    metadata = dict(format="pt", timm_kwargs=json.dumps(kwargs), pretrained_cfg=json.dumps(pretrained_cfg))
    if storage.is_remote(path):  # a bucket object appears whole or not at all: already atomic
        with storage.named_write_errors(path):
            storage.path(path).write_bytes(save(dict(state), metadata=metadata))
        return
    with storage.atomic_local(path) as tmp:
        save_file(state, tmp, metadata=metadata)
