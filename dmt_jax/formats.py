"""The official self-supervised checkpoint formats, and the timm <-> Flax parameter-name table.

Two tables, each read both ways where that makes sense:
- `FORMATS` (in detection order): per teacher repository, how to recognise its file, a small
  function (timm's checkpoint_filter_fn style) that unwraps/strips/drops it down to a timm-named
  ViT backbone, and which position-embedding interpolation that repository's own code uses.
- `NAME_TABLE`: timm parameter name <-> Flax parameter path, the array change between them and the
  timm shape. Conversion reads it timm -> Flax, dmt_jax/export.py reads it Flax -> timm.

Arrays are anything with `.shape` and `.T`/`.transpose`/slicing (torch tensors on the way in, numpy
on the way out); torch itself is imported only inside the resize functions.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from dmt_jax.errors import UserError
from dmt_jax.teachers import IMAGENET_MEAN, IMAGENET_STD, num_heads_for_width, variant_name


class FormatError(UserError, ValueError):
    """A checkpoint that does not fit its format or a ViT; the message is one line."""


def name_list(names, limit: int = 12) -> str:
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more


# ---------------------------------------------------------------- architecture


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the tensor shapes say about a ViT backbone."""

    width: int
    depth: int
    mlp_dim: int
    patch_size: int
    grid: int
    num_reg_tokens: int = 0
    no_embed_class: bool = False  # prefix tokens carry no position embedding (DINOv2 + registers)
    layerscale: bool = False

    @property
    def num_heads(self) -> int:
        return num_heads_for_width(self.width)

    @property
    def num_pos_prefix(self) -> int:
        """Rows of pos_embed before the patch grid."""
        return 0 if self.no_embed_class else 1 + self.num_reg_tokens

    @property
    def variant(self) -> str:
        return variant_name(self.width, self.depth, self.mlp_dim, self.patch_size)

    def describe(self) -> str:
        return (f"{self.variant} (width {self.width}, depth {self.depth}, mlp {self.mlp_dim}, "
                f"patch {self.patch_size}, grid {self.grid}, registers {self.num_reg_tokens})")  # fmt: skip


# ---------------------------------------------------------------- timm <-> Flax names

COPY, LINEAR, CONV = "copy", "linear", "conv"
# How a tensor's layout changes with its kind (COPY, LINEAR, CONV) between the two conventions; public for
# tables of names beyond NAME_TABLE (the classifier's head in dmt_jax/finetune/model.py).
TO_FLAX = {COPY: lambda a: a, LINEAR: lambda a: a.T, CONV: lambda a: a.transpose(2, 3, 1, 0)}  # OIHW->HWIO
TO_TIMM = {COPY: lambda a: a, LINEAR: lambda a: a.T, CONV: lambda a: a.transpose(3, 2, 0, 1)}  # HWIO->OIHW

_D = lambda a: (a.width,)
_KERNEL = lambda a: (a.width, 3, a.patch_size, a.patch_size)
# timm name, Flax path ({i}: block index), array change, timm shape
# fmt: off
NAME_TABLE: tuple[tuple[str, str, str, Callable[[Architecture], tuple[int, ...]]], ...] = (
    ("cls_token", "cls_token", COPY, lambda a: (1, 1, a.width)),
    ("reg_token", "reg_token", COPY, lambda a: (1, a.num_reg_tokens, a.width)),
    ("pos_embed", "pos_embed", COPY, lambda a: (1, a.num_pos_prefix + a.grid**2, a.width)),
    ("patch_embed.proj.weight", "patch_embed/proj/kernel", CONV, _KERNEL),
    ("patch_embed.proj.bias", "patch_embed/proj/bias", COPY, _D),
    ("blocks.{i}.norm1.weight", "blocks_{i}/norm1/scale", COPY, _D),
    ("blocks.{i}.norm1.bias", "blocks_{i}/norm1/bias", COPY, _D),
    ("blocks.{i}.attn.qkv.weight", "blocks_{i}/attn/qkv/kernel", LINEAR, lambda a: (3 * a.width, a.width)),
    ("blocks.{i}.attn.qkv.bias", "blocks_{i}/attn/qkv/bias", COPY, lambda a: (3 * a.width,)),
    ("blocks.{i}.attn.proj.weight", "blocks_{i}/attn/proj/kernel", LINEAR, lambda a: (a.width, a.width)),
    ("blocks.{i}.attn.proj.bias", "blocks_{i}/attn/proj/bias", COPY, _D),
    ("blocks.{i}.ls1.gamma", "blocks_{i}/ls1/gamma", COPY, _D),
    ("blocks.{i}.norm2.weight", "blocks_{i}/norm2/scale", COPY, _D),
    ("blocks.{i}.norm2.bias", "blocks_{i}/norm2/bias", COPY, _D),
    ("blocks.{i}.mlp.fc1.weight", "blocks_{i}/mlp/fc1/kernel", LINEAR, lambda a: (a.mlp_dim, a.width)),
    ("blocks.{i}.mlp.fc1.bias", "blocks_{i}/mlp/fc1/bias", COPY, lambda a: (a.mlp_dim,)),
    ("blocks.{i}.mlp.fc2.weight", "blocks_{i}/mlp/fc2/kernel", LINEAR, lambda a: (a.width, a.mlp_dim)),
    ("blocks.{i}.mlp.fc2.bias", "blocks_{i}/mlp/fc2/bias", COPY, _D),
    ("blocks.{i}.ls2.gamma", "blocks_{i}/ls2/gamma", COPY, _D),
    ("norm.weight", "norm/scale", COPY, _D),
    ("norm.bias", "norm/bias", COPY, _D),
)
# fmt: on
# Rows a ViT has only with registers / LayerScale.
_PRESENT_WHEN = {
    "reg_token": lambda a: a.num_reg_tokens > 0,
    "blocks.{i}.ls1.gamma": lambda a: a.layerscale,
    "blocks.{i}.ls2.gamma": lambda a: a.layerscale,
}


def _pattern(template: str) -> re.Pattern:
    return re.compile("(\\d+)".join(re.escape(part) for part in template.split("{i}")) + "$")


_TIMM_TO_FLAX = [(_pattern(t), f, kind) for t, f, kind, _ in NAME_TABLE]
_FLAX_TO_TIMM = [(_pattern(f), t, kind) for t, f, kind, _ in NAME_TABLE]


def _rename(state: Mapping[str, Any], rules, changes, direction: str) -> dict[str, Any]:
    out, unknown = {}, []
    for name, array in state.items():
        for pattern, target, kind in rules:
            if m := pattern.match(name):
                out[target.replace("{i}", m.group(1)) if m.groups() else target] = changes[kind](array)
                break
        else:
            unknown.append(name)
    if unknown:
        raise FormatError(f"no {direction} name for: {name_list(sorted(unknown))}")
    return out


def timm_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """timm-named backbone tensors -> flat Flax paths ('blocks_0/attn/qkv/kernel'), arrays rearranged."""
    return _rename(state_dict, _TIMM_TO_FLAX, TO_FLAX, "Flax")


def flax_to_timm(flat_params: Mapping[str, Any]) -> dict[str, Any]:
    """Flat Flax paths -> timm names, arrays rearranged (Linear transposed, conv HWIO -> OIHW)."""
    return _rename(flat_params, _FLAX_TO_TIMM, TO_TIMM, "timm")


def expected_timm_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for timm_name, _, _, shape in NAME_TABLE:
        if _PRESENT_WHEN.get(timm_name, lambda a: True)(arch):
            for i in range(arch.depth) if "{i}" in timm_name else [None]:
                shapes[timm_name.replace("{i}", str(i))] = shape(arch)
    return shapes


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def infer_architecture(state_dict: Mapping[str, Any]) -> Architecture:
    """Width, depth, mlp, patch, grid, registers and LayerScale from the tensor shapes (timm names)."""
    if missing := [k for k in ("patch_embed.proj.weight", "pos_embed", "cls_token") if k not in state_dict]:
        raise FormatError(
            f"missing tensors: {name_list(missing)} (keys seen: {name_list(sorted(state_dict))})"
        )
    proj, pos = tuple(state_dict["patch_embed.proj.weight"].shape), tuple(state_dict["pos_embed"].shape)
    if len(proj) != 4 or proj[1] != 3 or proj[2] != proj[3]:
        raise FormatError(f"patch_embed.proj.weight has shape {proj}; expected (width, 3, patch, patch)")
    width, patch = proj[0], proj[2]
    depths = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not depths:
        raise FormatError("the checkpoint has no transformer blocks (no blocks.N.* tensors)")
    # Depth is what the file holds, never what its largest block number claims (blocks.99999999.*).
    if extra := sorted(depths - set(range(len(depths)))):
        missing = sorted(set(range(len(depths))) - depths)
        raise FormatError(
            f"transformer blocks are not numbered 0..{len(depths) - 1}: {len(depths)} blocks found, "
            f"blocks {name_list(missing)} missing, blocks {name_list(extra)} beyond them"
        )
    if "blocks.0.mlp.fc1.weight" not in state_dict:
        raise FormatError("missing tensors: blocks.0.mlp.fc1.weight")
    regs = tuple(state_dict["reg_token"].shape)[1] if "reg_token" in state_dict else 0
    if len(pos) != 3 or pos[0] != 1:
        raise FormatError(f"pos_embed has shape {pos}; expected (1, tokens, width)")
    # pos_embed rows are [CLS, registers] + grid, or the grid alone (no_embed_class).
    no_embed_class, grid = False, _square_side(pos[1] - 1 - regs)
    if grid is None:
        no_embed_class, grid = True, _square_side(pos[1])
    if grid is None:
        raise FormatError(
            f"pos_embed has {pos[1]} rows: neither 1 + {regs} registers + a square grid nor a grid"
        )
    return Architecture(
        width=width,
        depth=len(depths),
        mlp_dim=tuple(state_dict["blocks.0.mlp.fc1.weight"].shape)[0],
        patch_size=patch,
        grid=grid,
        num_reg_tokens=regs,
        no_embed_class=no_embed_class,
        layerscale=any(k.endswith(".ls1.gamma") for k in state_dict),
    )


def check_backbone(state_dict: Mapping[str, Any], arch: Architecture) -> None:
    """FormatError listing missing, unexpected and misshapen tensors (timm names)."""
    expected = expected_timm_shapes(arch)
    problems = []
    if missing := [k for k in expected if k not in state_dict]:
        problems.append(f"missing tensors: {name_list(missing)}")
    if unexpected := sorted(k for k in state_dict if k not in expected):
        problems.append(f"unexpected tensors: {name_list(unexpected)}")
    if problems:
        raise FormatError(f"checkpoint does not fit a ViT {arch.variant}: {'; '.join(problems)}")
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if tuple(getattr(state_dict[k], "shape", ())) != shape
    ]
    if wrong:
        raise FormatError(f"tensor shapes do not fit {arch.describe()}: {name_list(wrong, 6)}")


# ---------------------------------------------------------------- position-embedding resize (torch)


def _resize_bicubic_offset(grid, new: int):
    """DINO / iBOT / DINOv2 interpolate_pos_encoding: scale factor (new + 0.1) / old, no antialias."""
    import torch.nn.functional as F

    scale = (new + 0.1) / grid.shape[-1]
    return F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic")


def _resize_bicubic_size_antialias(grid, new: int):
    """DINOv2 register models (interpolate_offset 0, antialias) and timm's resample_abs_pos_embed."""
    import torch.nn.functional as F

    return F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)


def _resize_bicubic_size(grid, new: int):
    """MAE util/pos_embed.interpolate_pos_embed: bicubic to a size, align_corners=False, no antialias."""
    import torch.nn.functional as F

    return F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)


POS_EMBED_RESIZERS = {
    "bicubic_scale_offset_0.1": _resize_bicubic_offset,
    "bicubic_size": _resize_bicubic_size,
    "bicubic_size_antialias": _resize_bicubic_size_antialias,
}


def resize_pos_embed(pos_embed, num_pos_prefix: int, new_grid: int, method: str):
    """Resizes only the grid rows of a [1, prefix + g*g, D] torch tensor, in float32, with `method`."""
    import torch

    prefix, patches = pos_embed[:, :num_pos_prefix], pos_embed[:, num_pos_prefix:]
    old = math.isqrt(patches.shape[1])
    grid = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = POS_EMBED_RESIZERS[method](grid, new_grid)
    if tuple(resized.shape[-2:]) != (new_grid, new_grid):  # the +0.1 offset exists to make this hold
        raise FormatError(f"position-embedding resize {old}->{new_grid} gave {tuple(resized.shape[-2:])}")
    patches = resized.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


# ---------------------------------------------------------------- the formats


def _mapping(obj, what: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise FormatError(f"{what} is a {type(obj).__name__}, not a dict of tensors")
    return obj


def _unwrap(ckpt: Mapping, key: str, fmt: str) -> Mapping:
    if key not in ckpt:
        raise FormatError(
            f"a {fmt} checkpoint holds its weights under {key!r}; this file has {name_list(ckpt)}"
        )
    return _mapping(ckpt[key], f"{fmt} checkpoint[{key!r}]")


def _strip(name: str, *prefixes: str) -> str:
    for prefix in prefixes:
        name = name.removeprefix(prefix)
    return name


def _any_key(ckpt: Mapping, prefix: str) -> bool:
    return any(isinstance(k, str) and k.startswith(prefix) for k in ckpt)


def mae_backbone(ckpt: Mapping) -> dict:
    """facebookresearch/mae: {'model': encoder}; the *_full file adds decoder_* and mask_token (1,1,512)."""
    sd = _unwrap(ckpt, "model", "mae")
    return {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}


def mocov3_backbone(ckpt: Mapping) -> dict:
    """facebookresearch/moco-v3: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
    'module.predictor.*'}, ...}: the base encoder without its projection head."""
    sd = _unwrap(ckpt, "state_dict", "mocov3")
    if not (_any_key(sd, "module.base_encoder.") or _any_key(sd, "base_encoder.")):
        raise FormatError(
            f"a mocov3 state_dict has module.base_encoder.* tensors; this one has {name_list(sd)}"
        )
    out = {}
    for k, v in sd.items():
        k = _strip(k, "module.")
        if not k.startswith(("momentum_encoder.", "predictor.")):
            k = _strip(k, "base_encoder.")
            if not k.startswith("head."):
                out[k] = v
    return out


def dino_backbone(ckpt: Mapping) -> dict:
    """facebookresearch/dino: a plain backbone, or the training file {'student', 'teacher', ...} whose
    teacher (the EMA network, the one evaluated) is taken; backbone./module. prefixes and head.* go."""
    sd = _mapping(ckpt["teacher"], "checkpoint['teacher']") if "teacher" in ckpt else ckpt
    out = {_strip(k, "module.", "backbone."): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if not k.startswith("head.")}


def ibot_backbone(ckpt: Mapping) -> dict:
    """bytedance/ibot: {'state_dict': backbone} (or the training file's teacher); LayerScale gamma_1/2."""
    if "state_dict" in ckpt:
        sd = _mapping(ckpt["state_dict"], "checkpoint['state_dict']")
    else:
        sd = _mapping(ckpt["teacher"], "checkpoint['teacher']") if "teacher" in ckpt else ckpt
    out = {}
    for k, v in sd.items():
        k = _strip(k, "module.", "backbone.")
        if k.startswith("head.") or k == "masked_embed":
            continue
        out[re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k)] = v
    return out


def dinov2_backbone(ckpt: Mapping) -> dict:
    """facebookresearch/dinov2: a plain state dict, minus mask_token. With register_tokens, timm's
    _convert_dinov2: reg_token = register_tokens, cls_token += pos_embed[:, 0], pos_embed = grid rows."""
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in ckpt.items()}  # chunked blocks
    sd.pop("mask_token", None)
    if "register_tokens" in sd and "cls_token" in sd and "pos_embed" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return sd


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    name: str
    repo: str
    detect: Callable[[Mapping], bool]  # the file's distinctive keys
    backbone: Callable[[Mapping], dict]  # checkpoint -> timm-named ViT backbone
    resize_method: Callable[[Architecture], str]  # key of POS_EMBED_RESIZERS: the repo's own interpolation
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _is_dinov2(ckpt: Mapping) -> bool:
    mask = ckpt.get("mask_token")
    return "register_tokens" in ckpt or (mask is not None and len(getattr(mask, "shape", ())) == 2)


def _is_mocov3(ckpt: Mapping) -> bool:
    return _any_key(
        _mapping(ckpt.get("state_dict", ckpt), "checkpoint['state_dict']"), "module.base_encoder."
    )


def _is_ibot(ckpt: Mapping) -> bool:
    return any(k in ckpt for k in ("state_dict", "ibot_loss", "masked_embed")) or "blocks.0.gamma_1" in ckpt


_OFFSET, _SIZE, _SIZE_ANTIALIAS = "bicubic_scale_offset_0.1", "bicubic_size", "bicubic_size_antialias"
# In detection order: MAE's full file also has a mask_token (1,1,512), so MAE is asked before DINOv2;
# a bare backbone state dict with nothing distinctive is read as DINO (iBOT's and MAE's bare encoders
# are the same tensors; pass --format to record which it is and resize it their way).
# fmt: off
FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in (
    CheckpointFormat("mae", "facebookresearch/mae", lambda c: "model" in c or _any_key(c, "decoder_"),
                     mae_backbone, lambda a: _SIZE),
    CheckpointFormat("mocov3", "facebookresearch/moco-v3", _is_mocov3, mocov3_backbone,
                     lambda a: _SIZE_ANTIALIAS),
    CheckpointFormat("ibot", "bytedance/ibot", _is_ibot, ibot_backbone, lambda a: _OFFSET),
    CheckpointFormat("dinov2", "facebookresearch/dinov2", _is_dinov2, dinov2_backbone,
                     lambda a: _SIZE_ANTIALIAS if a.num_reg_tokens else _OFFSET),
    CheckpointFormat("dino", "facebookresearch/dino", lambda c: "teacher" in c or "cls_token" in c,
                     dino_backbone, lambda a: _OFFSET),
)}
# fmt: on


def detect_format(ckpt: Mapping) -> str:
    for fmt in FORMATS.values():
        if fmt.detect(ckpt):
            return fmt.name
    raise FormatError(
        f"checkpoint format not recognized: keys seen: {name_list(ckpt, 10)}; "
        f"known formats: {', '.join(FORMATS)} (pass --format to choose one)"
    )
