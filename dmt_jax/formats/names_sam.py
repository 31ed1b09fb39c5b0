"""segment-anything's image-encoder names <-> the Flax paths of dmt_jax.models.sam.SamEncoder.

One table read both ways (formats/_base.py NameTable): conversion reads it segment-anything -> Flax,
export Flax -> segment-anything. Names are the official file's `image_encoder.*` keys with that
prefix stripped. The relative-position tables differ per block (windowed blocks: 2*window-1 rows,
global ones: 2*grid-1), so their shapes come from `expected_shapes`, not from one row.
"""

from __future__ import annotations

from collections.abc import Mapping
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
)
from dmt_jax.models.sam import SamConfig

_D = lambda c: (c.embed_dim,)
_QKV = lambda c: (3 * c.embed_dim, c.embed_dim)
_SQUARE = lambda c: (c.embed_dim, c.embed_dim)
_KERNEL = lambda c: (c.embed_dim, 3, c.patch_size, c.patch_size)
_OUT = lambda c: (c.out_chans,)
_REL_POS = lambda c: (2 * c.window_size - 1, c.head_dim)  # the windowed blocks'; see expected_shapes
# segment-anything name, Flax path ({i}: block index), array change, segment-anything shape
# fmt: off
NAME_TABLE: tuple[tuple[str, str, str, Any], ...] = (
    ("pos_embed", "pos_embed", COPY, lambda c: (1, c.grid, c.grid, c.embed_dim)),
    ("patch_embed.proj.weight", "patch_embed/proj/kernel", CONV, _KERNEL),
    ("patch_embed.proj.bias", "patch_embed/proj/bias", COPY, _D),
    ("blocks.{i}.norm1.weight", "blocks_{i}/norm1/scale", COPY, _D),
    ("blocks.{i}.norm1.bias", "blocks_{i}/norm1/bias", COPY, _D),
    ("blocks.{i}.attn.qkv.weight", "blocks_{i}/attn/qkv/kernel", LINEAR, _QKV),
    ("blocks.{i}.attn.qkv.bias", "blocks_{i}/attn/qkv/bias", COPY, lambda c: (3 * c.embed_dim,)),
    ("blocks.{i}.attn.proj.weight", "blocks_{i}/attn/proj/kernel", LINEAR, _SQUARE),
    ("blocks.{i}.attn.proj.bias", "blocks_{i}/attn/proj/bias", COPY, _D),
    ("blocks.{i}.attn.rel_pos_h", "blocks_{i}/attn/rel_pos_h", COPY, _REL_POS),
    ("blocks.{i}.attn.rel_pos_w", "blocks_{i}/attn/rel_pos_w", COPY, _REL_POS),
    ("blocks.{i}.norm2.weight", "blocks_{i}/norm2/scale", COPY, _D),
    ("blocks.{i}.norm2.bias", "blocks_{i}/norm2/bias", COPY, _D),
    ("blocks.{i}.mlp.lin1.weight", "blocks_{i}/mlp/lin1/kernel", LINEAR, lambda c: (c.mlp_dim, c.embed_dim)),
    ("blocks.{i}.mlp.lin1.bias", "blocks_{i}/mlp/lin1/bias", COPY, lambda c: (c.mlp_dim,)),
    ("blocks.{i}.mlp.lin2.weight", "blocks_{i}/mlp/lin2/kernel", LINEAR, lambda c: (c.embed_dim, c.mlp_dim)),
    ("blocks.{i}.mlp.lin2.bias", "blocks_{i}/mlp/lin2/bias", COPY, _D),
    ("neck.0.weight", "neck_0/kernel", CONV, lambda c: (c.out_chans, c.embed_dim, 1, 1)),
    ("neck.1.weight", "neck_1/scale", COPY, _OUT),
    ("neck.1.bias", "neck_1/bias", COPY, _OUT),
    ("neck.2.weight", "neck_2/kernel", CONV, lambda c: (c.out_chans, c.out_chans, 3, 3)),
    ("neck.3.weight", "neck_3/scale", COPY, _OUT),
    ("neck.3.bias", "neck_3/bias", COPY, _OUT),
)
# fmt: on
_REL_POS_ROWS = ("blocks.{i}.attn.rel_pos_h", "blocks.{i}.attn.rel_pos_w")
TABLE = NameTable(NAME_TABLE, {name: lambda c: c.use_rel_pos for name in _REL_POS_ROWS})


def expected_shapes(config: SamConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a SAM image encoder with its segment-anything shape."""
    shapes = TABLE.expected_shapes(config, config.depth)
    if config.use_rel_pos:
        for i in config.global_attn_indexes:  # global blocks: a table over the whole grid
            for row in _REL_POS_ROWS:
                shapes[row.replace("{i}", str(i))] = (2 * config.grid - 1, config.head_dim)
    return shapes


def to_flax(state_dict: Mapping[str, Any], config: SamConfig) -> dict[str, Any]:
    """CheckpointFormat.to_flax (the config is already checked against the tensors)."""
    return TABLE.to_flax(state_dict)


def to_reference(flat_params: Mapping[str, Any]) -> dict[str, Any]:
    """Flat Flax paths -> segment-anything's image-encoder names (export)."""
    return TABLE.to_reference(flat_params)


def sam_config(state_dict: Mapping[str, Any], options: Mapping[str, Any]) -> SamConfig:
    """CheckpointFormat.infer: the SamConfig the shapes imply, checked against every tensor. Heads from the
    relative-position tables' width (head_dim); global blocks are those whose table spans the grid
    (2*grid-1 rows), the window from the others' (2*window-1)."""
    required = ["patch_embed.proj.weight", "pos_embed", "blocks.0.attn.rel_pos_h", "blocks.0.mlp.lin1.weight",
                "neck.0.weight"]  # fmt: skip
    if missing := [k for k in required if k not in state_dict]:
        raise FormatError(
            f"missing tensors: {name_list(missing)} (keys seen: {name_list(sorted(state_dict))})"
        )
    proj, pos = tuple(state_dict["patch_embed.proj.weight"].shape), tuple(state_dict["pos_embed"].shape)
    if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
        raise FormatError(f"patch_embed.proj.weight has shape {proj}; expected (width, 3, patch, patch)")
    if len(pos) != 4 or pos[0] != 1 or pos[1] != pos[2] or pos[3] != proj[0]:
        raise FormatError(f"pos_embed has shape {pos}; expected (1, grid, grid, {proj[0]})")
    width, patch, grid = proj[0], proj[2], pos[1]
    depth = block_count(state_dict)
    head_dim = tuple(state_dict["blocks.0.attn.rel_pos_h"].shape)[-1]
    rows = {
        i: tuple(state_dict[k].shape)[0]
        for i in range(depth)
        if (k := f"blocks.{i}.attn.rel_pos_h") in state_dict
    }
    global_blocks = tuple(i for i, n in rows.items() if n == 2 * grid - 1)
    windows = sorted({n for n in rows.values() if n != 2 * grid - 1})
    if len(windows) > 1:
        raise FormatError(
            f"the windowed blocks' relative-position tables disagree: {windows} rows (one window size, "
            f"2*window-1 rows, expected)"
        )
    try:
        config = SamConfig(
            embed_dim=width,
            depth=depth,
            num_heads=max(width // max(head_dim, 1), 1),
            mlp_dim=tuple(state_dict["blocks.0.mlp.lin1.weight"].shape)[0],
            patch_size=patch,
            img_size=grid * patch,
            window_size=(windows[0] + 1) // 2 if windows else 14,
            global_attn_indexes=global_blocks,
            out_chans=tuple(state_dict["neck.0.weight"].shape)[0],
        )
    except ValueError as e:
        raise FormatError(f"the checkpoint's shapes give no valid SAM image encoder: {e}") from e
    check_tensors(state_dict, expected_shapes(config), f"a SAM image encoder {config.describe()}")
    return config
