"""timm Eva <-> Flax Eva (dmt_jax/models/eva.py): the name table, read both ways, and the shapes.

Every EVA-02 layout (the MIM files, EVA-CLIP towers, OpenCLIP's timm trunks) is first renamed to
timm's Eva names (as timm's eva.checkpoint_filter_fn does), then goes through this one table.
"""

from __future__ import annotations

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
    square_side,
)
from dmt_jax.models.eva import EvaConfig

_D = lambda c: (c.width,)
_H = lambda c: (c.mlp_dim,)
_SQUARE = lambda c: (c.width, c.width)
_MLP_IN = lambda c: (c.mlp_dim, c.width)
_KERNEL = lambda c: (c.width, 3, c.patch_size, c.patch_size)
# timm name, Flax path ({i}: block index), array change, timm shape
# fmt: off
NAME_TABLE: tuple[tuple[str, str, str, Callable[[EvaConfig], tuple[int, ...]]], ...] = (
    ("cls_token", "cls_token", COPY, lambda c: (1, 1, c.width)),
    ("reg_token", "reg_token", COPY, lambda c: (1, c.num_reg_tokens, c.width)),
    ("pos_embed", "pos_embed", COPY, lambda c: (1, c.num_tokens, c.width)),
    ("patch_embed.proj.weight", "patch_embed/proj/kernel", CONV, _KERNEL),
    ("patch_embed.proj.bias", "patch_embed/proj/bias", COPY, _D),
    ("blocks.{i}.norm1.weight", "blocks_{i}/norm1/scale", COPY, _D),
    ("blocks.{i}.norm1.bias", "blocks_{i}/norm1/bias", COPY, _D),
    ("blocks.{i}.attn.q_proj.weight", "blocks_{i}/attn/q_proj/kernel", LINEAR, _SQUARE),
    ("blocks.{i}.attn.q_proj.bias", "blocks_{i}/attn/q_proj/bias", COPY, _D),
    ("blocks.{i}.attn.k_proj.weight", "blocks_{i}/attn/k_proj/kernel", LINEAR, _SQUARE),
    ("blocks.{i}.attn.v_proj.weight", "blocks_{i}/attn/v_proj/kernel", LINEAR, _SQUARE),
    ("blocks.{i}.attn.v_proj.bias", "blocks_{i}/attn/v_proj/bias", COPY, _D),
    ("blocks.{i}.attn.norm.weight", "blocks_{i}/attn/norm/scale", COPY, _D),
    ("blocks.{i}.attn.norm.bias", "blocks_{i}/attn/norm/bias", COPY, _D),
    ("blocks.{i}.attn.proj.weight", "blocks_{i}/attn/proj/kernel", LINEAR, _SQUARE),
    ("blocks.{i}.attn.proj.bias", "blocks_{i}/attn/proj/bias", COPY, _D),
    ("blocks.{i}.norm2.weight", "blocks_{i}/norm2/scale", COPY, _D),
    ("blocks.{i}.norm2.bias", "blocks_{i}/norm2/bias", COPY, _D),
    ("blocks.{i}.mlp.fc1_g.weight", "blocks_{i}/mlp/fc1_g/kernel", LINEAR, _MLP_IN),
    ("blocks.{i}.mlp.fc1_g.bias", "blocks_{i}/mlp/fc1_g/bias", COPY, _H),
    ("blocks.{i}.mlp.fc1_x.weight", "blocks_{i}/mlp/fc1_x/kernel", LINEAR, _MLP_IN),
    ("blocks.{i}.mlp.fc1_x.bias", "blocks_{i}/mlp/fc1_x/bias", COPY, _H),
    ("blocks.{i}.mlp.norm.weight", "blocks_{i}/mlp/norm/scale", COPY, _H),
    ("blocks.{i}.mlp.norm.bias", "blocks_{i}/mlp/norm/bias", COPY, _H),
    ("blocks.{i}.mlp.fc2.weight", "blocks_{i}/mlp/fc2/kernel", LINEAR, lambda c: (c.width, c.mlp_dim)),
    ("blocks.{i}.mlp.fc2.bias", "blocks_{i}/mlp/fc2/bias", COPY, _D),
    ("norm.weight", "norm/scale", COPY, _D),
    ("norm.bias", "norm/bias", COPY, _D),
    ("head.weight", "head/kernel", LINEAR, lambda c: (c.proj_dim, c.width)),  # EVA-CLIP's projection
    ("head.bias", "head/bias", COPY, lambda c: (c.proj_dim,)),
)
# fmt: on
_PRESENT_WHEN = {
    "reg_token": lambda c: c.num_reg_tokens > 0,
    "blocks.{i}.attn.q_proj.bias": lambda c: c.qv_bias,
    "blocks.{i}.attn.v_proj.bias": lambda c: c.qv_bias,
    "blocks.{i}.attn.norm.weight": lambda c: c.attn_norm,
    "blocks.{i}.attn.norm.bias": lambda c: c.attn_norm,
    "blocks.{i}.mlp.norm.weight": lambda c: c.mlp_norm,
    "blocks.{i}.mlp.norm.bias": lambda c: c.mlp_norm,
    "head.weight": lambda c: c.proj_dim > 0,
    "head.bias": lambda c: c.proj_dim > 0,
}
TABLE = NameTable(NAME_TABLE, _PRESENT_WHEN)

# What every released EVA-02 shares and the shapes cannot tell: 64-wide heads, RoPE frequencies of the
# 224/14 pretraining grid (16, also for the /16 EVA-CLIP towers and the 448 px fine-tunes), eps 1e-6.
HEAD_WIDTH = 64
ROPE_REF_GRID = 16


def to_flax(state_dict: Mapping[str, Any], config: EvaConfig) -> dict[str, Any]:
    """CheckpointFormat.to_flax of the EVA formats (the config is already checked against the tensors)."""
    return TABLE.to_flax(state_dict)


def flax_to_timm(flat_params: Mapping[str, Any]) -> dict[str, Any]:
    return TABLE.to_reference(flat_params)


def expected_timm_shapes(config: EvaConfig) -> dict[str, tuple[int, ...]]:
    return TABLE.expected_shapes(config, config.depth)


# EVA's names of the tensors this table calls by timm's (for messages about an official file).
EVA_NAMES = "EVA's mlp.w1, w2, w3, ffn_ln, attn.q_bias, v_bias, inner_attn_ln are timm's mlp.fc1_g, fc1_x, fc2, norm, attn.q_proj.bias, v_proj.bias, attn.norm"  # noqa: E501


def eva_config(state_dict: Mapping[str, Any], options: Mapping[str, Any]) -> EvaConfig:
    """CheckpointFormat.infer of the EVA formats: the EvaConfig the timm-named tensors imply (width,
    depth, SwiGLU width, patch, grid, sub-LNs, q/v biases, registers, projection) with EVA-02's fixed
    head width and RoPE grid (`options['num_heads']` overrides the heads), checked against every tensor."""
    depth = block_count(state_dict)  # first: a missing or extra block is named as such
    required = ["patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1_g.weight"]
    if missing := [k for k in required if k not in state_dict]:
        raise FormatError(f"missing tensors: {name_list(missing)} ({EVA_NAMES})")
    proj, pos = tuple(state_dict["patch_embed.proj.weight"].shape), tuple(state_dict["pos_embed"].shape)
    if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
        raise FormatError(f"patch_embed.proj.weight has shape {proj}; expected (width, 3, patch, patch)")
    width, patch = proj[0], proj[2]
    regs = tuple(state_dict["reg_token"].shape)[1] if "reg_token" in state_dict else 0
    grid = square_side(pos[1] - 1 - regs) if len(pos) == 3 and pos[0] == 1 else None
    if grid is None:
        raise FormatError(f"pos_embed has shape {pos}; expected (1, 1 + {regs} + a square grid, {width})")
    try:
        config = EvaConfig(
            width=width,
            depth=depth,
            num_heads=options.get("num_heads") or max(width // HEAD_WIDTH, 1),
            mlp_dim=tuple(state_dict["blocks.0.mlp.fc1_g.weight"].shape)[0],
            patch_size=patch,
            img_size=grid * patch,
            rope_ref_grid=ROPE_REF_GRID,
            attn_norm="blocks.0.attn.norm.weight" in state_dict,
            mlp_norm="blocks.0.mlp.norm.weight" in state_dict,
            qv_bias="blocks.0.attn.q_proj.bias" in state_dict,
            num_reg_tokens=regs,
            proj_dim=tuple(state_dict["head.weight"].shape)[0] if "head.weight" in state_dict else 0,
        )
    except ValueError as e:
        raise FormatError(f"the checkpoint's shapes give no valid EVA-02: {e}") from e
    try:
        check_tensors(state_dict, expected_timm_shapes(config), f"an {config.describe()}")
    except FormatError as e:
        raise FormatError(f"{e} ({EVA_NAMES})") from e
    return config
