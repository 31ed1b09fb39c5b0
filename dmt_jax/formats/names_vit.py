"""timm ViT <-> Flax ViT (dmt_jax/models/vit.py): the name table, read both ways, and the shapes.

Conversion reads it timm -> Flax, dmt_jax/export.py reads it Flax -> timm. Every ViT-family format
(MAE ... DINOv2, CLIP, OpenCLIP, SigLIP) first renames its file to timm's names (as timm's own
checkpoint filters do), then goes through this one table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from dmt_jax.formats._base import (
    CONV,
    COPY,
    LINEAR,
    FormatError,
    NameTable,
    block_count,
    check_tensors,
    name_list,
    resize_pos_embed,
    square_side,
)
from dmt_jax.models.vit import ViTConfig, num_heads_for_width

Architecture = ViTConfig  # what the tensor shapes (and a format's fixed options) say about a ViT

_D = lambda c: (c.width,)
_KERNEL = lambda c: (c.width, 3, c.patch_size, c.patch_size)
_MLP_IN = lambda c: (c.mlp_dim, c.width)
_MLP_OUT = lambda c: (c.width, c.mlp_dim)
_SQUARE = lambda c: (c.width, c.width)
# timm name, Flax path ({i}: block index), array change, timm shape
# fmt: off
NAME_TABLE: tuple[tuple[str, str, str, Callable[[ViTConfig], tuple[int, ...]]], ...] = (
    ("cls_token", "cls_token", COPY, lambda c: (1, 1, c.width)),
    ("reg_token", "reg_token", COPY, lambda c: (1, c.num_reg_tokens, c.width)),
    ("pos_embed", "pos_embed", COPY, lambda c: (1, c.num_pos_prefix + c.grid**2, c.width)),
    ("patch_embed.proj.weight", "patch_embed/proj/kernel", CONV, _KERNEL),
    ("patch_embed.proj.bias", "patch_embed/proj/bias", COPY, _D),
    ("norm_pre.weight", "norm_pre/scale", COPY, _D),
    ("norm_pre.bias", "norm_pre/bias", COPY, _D),
    ("blocks.{i}.norm1.weight", "blocks_{i}/norm1/scale", COPY, _D),
    ("blocks.{i}.norm1.bias", "blocks_{i}/norm1/bias", COPY, _D),
    ("blocks.{i}.attn.qkv.weight", "blocks_{i}/attn/qkv/kernel", LINEAR, lambda c: (3 * c.width, c.width)),
    ("blocks.{i}.attn.qkv.bias", "blocks_{i}/attn/qkv/bias", COPY, lambda c: (3 * c.width,)),
    ("blocks.{i}.attn.proj.weight", "blocks_{i}/attn/proj/kernel", LINEAR, _SQUARE),
    ("blocks.{i}.attn.proj.bias", "blocks_{i}/attn/proj/bias", COPY, _D),
    ("blocks.{i}.ls1.gamma", "blocks_{i}/ls1/gamma", COPY, _D),
    ("blocks.{i}.norm2.weight", "blocks_{i}/norm2/scale", COPY, _D),
    ("blocks.{i}.norm2.bias", "blocks_{i}/norm2/bias", COPY, _D),
    ("blocks.{i}.mlp.fc1.weight", "blocks_{i}/mlp/fc1/kernel", LINEAR, _MLP_IN),
    ("blocks.{i}.mlp.fc1.bias", "blocks_{i}/mlp/fc1/bias", COPY, lambda c: (c.mlp_dim,)),
    ("blocks.{i}.mlp.fc2.weight", "blocks_{i}/mlp/fc2/kernel", LINEAR, _MLP_OUT),
    ("blocks.{i}.mlp.fc2.bias", "blocks_{i}/mlp/fc2/bias", COPY, _D),
    ("blocks.{i}.ls2.gamma", "blocks_{i}/ls2/gamma", COPY, _D),
    ("norm.weight", "norm/scale", COPY, _D),
    ("norm.bias", "norm/bias", COPY, _D),
    # SigLIP's MAP head (timm's AttentionPoolLatent; big_vision's MAPHead_0)
    ("attn_pool.latent", "attn_pool/latent", COPY, lambda c: (1, 1, c.width)),
    ("attn_pool.q.weight", "attn_pool/q/kernel", LINEAR, _SQUARE),
    ("attn_pool.q.bias", "attn_pool/q/bias", COPY, _D),
    ("attn_pool.kv.weight", "attn_pool/kv/kernel", LINEAR, lambda c: (2 * c.width, c.width)),
    ("attn_pool.kv.bias", "attn_pool/kv/bias", COPY, lambda c: (2 * c.width,)),
    ("attn_pool.proj.weight", "attn_pool/proj/kernel", LINEAR, _SQUARE),
    ("attn_pool.proj.bias", "attn_pool/proj/bias", COPY, _D),
    ("attn_pool.norm.weight", "attn_pool/norm/scale", COPY, _D),
    ("attn_pool.norm.bias", "attn_pool/norm/bias", COPY, _D),
    ("attn_pool.mlp.fc1.weight", "attn_pool/mlp/fc1/kernel", LINEAR, _MLP_IN),
    ("attn_pool.mlp.fc1.bias", "attn_pool/mlp/fc1/bias", COPY, lambda c: (c.mlp_dim,)),
    ("attn_pool.mlp.fc2.weight", "attn_pool/mlp/fc2/kernel", LINEAR, _MLP_OUT),
    ("attn_pool.mlp.fc2.bias", "attn_pool/mlp/fc2/bias", COPY, _D),
    # CLIP's image projection (timm's head; no bias)
    ("head.weight", "head/kernel", LINEAR, lambda c: (c.proj_dim, c.width)),
)
# fmt: on
_PRESENT_WHEN = {
    "cls_token": lambda c: c.class_token,
    "reg_token": lambda c: c.num_reg_tokens > 0,
    "patch_embed.proj.bias": lambda c: c.patch_bias,
    "norm_pre.weight": lambda c: c.pre_norm,
    "norm_pre.bias": lambda c: c.pre_norm,
    "blocks.{i}.ls1.gamma": lambda c: c.layerscale,
    "blocks.{i}.ls2.gamma": lambda c: c.layerscale,
    "head.weight": lambda c: c.proj_dim > 0,
    **{row[0]: (lambda c: c.pool == "map") for row in NAME_TABLE if row[0].startswith("attn_pool.")},
}
TABLE = NameTable(NAME_TABLE, _PRESENT_WHEN)


def timm_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """timm-named backbone tensors -> flat Flax paths ('blocks_0/attn/qkv/kernel'), arrays rearranged."""
    return TABLE.to_flax(state_dict)


def flax_to_timm(flat_params: Mapping[str, Any]) -> dict[str, Any]:
    """Flat Flax paths -> timm names, arrays rearranged (Linear transposed, conv HWIO -> OIHW)."""
    return TABLE.to_reference(flat_params)


def to_flax(state_dict: Mapping[str, Any], config: ViTConfig) -> dict[str, Any]:
    """CheckpointFormat.to_flax of every ViT format (the config is already checked against the tensors)."""
    return timm_to_flax(state_dict)


def expected_timm_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    return TABLE.expected_shapes(config, config.depth)


def infer_architecture(state_dict: Mapping[str, Any], *, extras: bool = False, **fixed) -> ViTConfig:
    """The ViTConfig the tensor shapes imply (timm names): width, depth, mlp, patch, grid, registers and
    LayerScale; with `extras`, also CLS token, pre-norm, patch bias, MAP head and projection by their
    tensors (CLIP, OpenCLIP, SigLIP). `fixed`: ViTConfig fields shapes cannot tell (act, ln_eps, num_heads)
    or that the format fixes (class_token)."""
    class_token = fixed.pop("class_token", "cls_token" in state_dict if extras else True)
    required = ["patch_embed.proj.weight", "pos_embed"] + (["cls_token"] if class_token else [])
    if missing := [k for k in required if k not in state_dict]:
        raise FormatError(
            f"missing tensors: {name_list(missing)} (keys seen: {name_list(sorted(state_dict))})"
        )
    proj, pos = tuple(state_dict["patch_embed.proj.weight"].shape), tuple(state_dict["pos_embed"].shape)
    if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
        raise FormatError(f"patch_embed.proj.weight has shape {proj}; expected (width, 3, patch, patch)")
    width, patch = proj[0], proj[2]
    depth = block_count(state_dict)
    if "blocks.0.mlp.fc1.weight" not in state_dict:
        raise FormatError("missing tensors: blocks.0.mlp.fc1.weight")
    regs = tuple(state_dict["reg_token"].shape)[1] if "reg_token" in state_dict else 0
    if len(pos) != 3 or pos[0] != 1:
        raise FormatError(f"pos_embed has shape {pos}; expected (1, tokens, width)")
    # pos_embed rows are [CLS, registers] + grid, or the grid alone (no_embed_class).
    prefix = int(class_token) + regs
    no_embed_class, grid = False, square_side(pos[1] - prefix)
    if grid is None and prefix:
        no_embed_class, grid = True, square_side(pos[1])
    if grid is None:
        raise FormatError(
            f"pos_embed has {pos[1]} rows: neither {prefix} prefix tokens + a square grid nor a grid"
        )
    shape_says = dict(
        width=width,
        depth=depth,
        mlp_dim=tuple(state_dict["blocks.0.mlp.fc1.weight"].shape)[0],
        patch_size=patch,
        img_size=grid * patch,
        num_reg_tokens=regs,
        no_embed_class=no_embed_class,
        layerscale=any(k.endswith(".ls1.gamma") for k in state_dict),
        class_token=class_token,
    )
    if extras:
        shape_says |= dict(
            pre_norm="norm_pre.weight" in state_dict,
            patch_bias="patch_embed.proj.bias" in state_dict,
            pool="map" if "attn_pool.latent" in state_dict else "cls" if class_token else "none",
            proj_dim=tuple(state_dict["head.weight"].shape)[0] if "head.weight" in state_dict else 0,
        )
    fixed = {k: v for k, v in fixed.items() if v is not None}
    fixed.setdefault("num_heads", num_heads_for_width(width))
    try:
        return ViTConfig(**{**shape_says, **fixed})
    except ValueError as e:
        raise FormatError(f"the checkpoint's shapes give no valid ViT: {e}") from e


def check_backbone(state_dict: Mapping[str, Any], config: ViTConfig) -> None:
    """FormatError listing missing, unexpected and misshapen tensors (timm names)."""
    check_tensors(state_dict, expected_timm_shapes(config), f"a ViT {config.describe()}")


def vit_config(state_dict: Mapping[str, Any], options: Mapping[str, Any], **fixed) -> ViTConfig:
    """CheckpointFormat.infer of a ViT format: the shapes' config with the format's `fixed` fields, what
    the file states (Reference.fixed) and the user's `options` (in that order: the user's win), checked
    against every tensor."""
    merged = {}
    for layer in (fixed, getattr(state_dict, "fixed", {}), options):
        merged.update({k: v for k, v in layer.items() if v is not None})
    config = infer_architecture(state_dict, **merged)
    check_backbone(state_dict, config)
    return config


def pos_embed_resizer(method: Callable[[ViTConfig], str]):
    """CheckpointFormat.resize of a ViT format whose repository interpolates with `method(config)`."""

    def resize(state_dict: dict, config: ViTConfig, img_size: int) -> tuple[dict, ViTConfig, str]:
        chosen = method(config)
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = resize_pos_embed(
            state_dict["pos_embed"], config.num_pos_prefix, img_size // config.patch_size, chosen
        )
        return state_dict, dataclasses.replace(config, img_size=img_size), chosen

    resize.method = method  # the interpolation's name without resizing (formats.resize_method)
    return resize
