"""Student -> timm: a Flax ViT's params as a timm VisionTransformer state dict, saved as safetensors.

The name table in dmt_jax/formats.py is read Flax -> timm (Linear kernels transposed back, conv
HWIO -> OIHW, LayerNorm scale -> weight). The file loads with

    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)  # any vit_* name
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)

where `kwargs` is what `export_timm` returns (also stored in the file's metadata as "timm_kwargs").
Detection and segmentation frameworks that build timm ViTs take the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dmt_jax import formats
from dmt_jax.teachers import flatten_params


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


def export_timm(
    params: Mapping, path: str | os.PathLike, *, num_heads: int | None = None, overwrite: bool = False
) -> dict:
    """Writes the timm state dict of a student ViT to `path` (.safetensors), atomically; returns the
    timm kwargs. `num_heads`: only for a width whose head count is not the standard one."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    state = timm_state_dict(params)
    kwargs = timm_model_kwargs(state, num_heads)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "timm_kwargs": json.dumps(kwargs)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return kwargs
