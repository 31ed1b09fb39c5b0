"""What every checkpoint format shares: its description (CheckpointFormat), errors, small key helpers,
the name-table machinery (one table read both ways) and the position-table resizers (torch).

Arrays are anything with `.shape` and `.T`/`.transpose`/slicing (torch tensors on the way in, numpy on
the way out); torch itself is imported only inside functions.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from dmt_jax.errors import UserError
from dmt_jax.models.family import HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD  # noqa: F401


class FormatError(UserError, ValueError):
    """A checkpoint that does not fit its format or its model family; the message is one line."""


def name_list(names, limit: int = 12) -> str:
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more


# ---------------------------------------------------------------- a format


class Reference(dict):
    """A format's tensors under the reference names (to_reference's result), plus `fixed`: config fields
    the file states that the reference names lose (big_vision's head count in its kernel shapes; whether
    an OpenCLIP tower is OpenAI-layout or a timm trunk, which sets its LayerNorm eps)."""

    def __init__(self, tensors: Mapping, **fixed):
        super().__init__(tensors)
        self.fixed = fixed


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """One source repository's checkpoint files, as timm keeps one filter per model family.

    detect(ckpt): the file's distinctive keys say it is this format (asked in formats.DETECTION_ORDER).
    to_reference(ckpt): unwrap / strip / drop down to the tensors of one image encoder, named as the
        family's reference library names them (timm for vit and eva, segment-anything for sam).
    infer(sd, options): the family config the shapes imply, with the format's fixed options and the
        user's `options` (what shapes cannot tell: act, num_heads); FormatError when a tensor is missing,
        unexpected or misshapen.
    to_flax(sd, config): {Flax path: array}, arrays rearranged (the family's name table).
    resize(sd, config, img_size): (sd, config, method) with the position tables resized by the
        repository's own interpolation; None where the family cannot be resized. `resize.method(config)`
        names that interpolation without resizing (formats.resize_method; models/resize.py does it in
        JAX for a teacher that follows the student's resolution stages).
    mean, std: the normalization the weights were trained with; input_resize: how images are brought
        to img_size (one of teachers.INPUT_RESIZE); inputs_for(config) overrides them per config.
    """

    name: str
    repo: str
    family: str
    detect: Callable[[Mapping], bool]
    to_reference: Callable[[Mapping], dict]
    infer: Callable[[Mapping, Mapping], Any]
    to_flax: Callable[[Mapping, Any], dict]
    resize: Callable[[dict, Any, int], tuple[dict, Any, str]] | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_resize: str = "bilinear"
    options: tuple[str, ...] = ()  # the conversion options (convert.py's --act, --num-heads) it accepts
    summary: str = ""  # one line for `dmt-convert --help`
    # ckpt -> why detect()'s yes is only a guess (files of other repositories look the same), '' when the
    # keys are distinctive: dmt-convert then names --format.
    guess: Callable[[Mapping], str] | None = None
    inputs_for: Callable[[Any], dict] | None = None  # config -> mean/std/input_resize where they depend on it


# ---------------------------------------------------------------- small helpers for unwrapping


def mapping(obj, what: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise FormatError(f"{what} is a {type(obj).__name__}, not a dict of tensors")
    return obj


def unwrap(ckpt: Mapping, key: str, fmt: str) -> Mapping:
    if key not in ckpt:
        raise FormatError(
            f"a {fmt} checkpoint holds its weights under {key!r}; this file has {name_list(ckpt)}"
        )
    return mapping(ckpt[key], f"{fmt} checkpoint[{key!r}]")


def strip(name: str, *prefixes: str) -> str:
    for prefix in prefixes:
        name = name.removeprefix(prefix)
    return name


def any_key(ckpt: Mapping, prefix: str) -> bool:
    return any(isinstance(k, str) and k.startswith(prefix) for k in ckpt)


def swap(name: str, swaps: tuple[tuple[str, str], ...]) -> str:
    """Applies every (old, new) substring swap in order, as timm's _convert_openai_clip does."""
    for old, new in swaps:
        name = name.replace(old, new)
    return name


# ---------------------------------------------------------------- name tables (read both ways)

COPY, LINEAR, CONV = "copy", "linear", "conv"
# How a tensor's layout changes with its kind (COPY, LINEAR, CONV) between the two conventions; public for
# tables of names beyond the family tables (the classifier's head in dmt_jax/finetune/model.py).
TO_FLAX = {COPY: lambda a: a, LINEAR: lambda a: a.T, CONV: lambda a: a.transpose(2, 3, 1, 0)}  # OIHW->HWIO
TO_TIMM = {COPY: lambda a: a, LINEAR: lambda a: a.T, CONV: lambda a: a.transpose(3, 2, 0, 1)}  # HWIO->OIHW


def _pattern(template: str) -> re.Pattern:
    return re.compile("(\\d+)".join(re.escape(part) for part in template.split("{i}")) + "$")


@dataclasses.dataclass(frozen=True)
class NameTable:
    """Rows (reference name, Flax path, array change, reference shape(config)); '{i}' is a block index.
    `present_when[reference name](config)` says whether a row exists for a config (default: always)."""

    rows: tuple[tuple[str, str, str, Callable[[Any], tuple[int, ...]]], ...]
    present_when: Mapping[str, Callable[[Any], bool]] = dataclasses.field(default_factory=dict)

    def to_flax(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Reference-named tensors -> flat Flax paths ('blocks_0/attn/qkv/kernel'), arrays rearranged."""
        rules = [(_pattern(ref), flax, kind) for ref, flax, kind, _ in self.rows]
        return _rename(state, rules, TO_FLAX, "Flax")

    def to_reference(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """Flat Flax paths -> reference names, arrays rearranged (Linear transposed, conv HWIO -> OIHW)."""
        rules = [(_pattern(flax), ref, kind) for ref, flax, kind, _ in self.rows]
        return _rename(flat, rules, TO_TIMM, "timm")

    def expected_shapes(self, config, depth: int) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for ref, _, _, shape in self.rows:
            if self.present_when.get(ref, lambda c: True)(config):
                for i in range(depth) if "{i}" in ref else [None]:
                    shapes[ref.replace("{i}", str(i))] = shape(config)
        return shapes


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


def check_tensors(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """FormatError listing missing, unexpected and misshapen tensors; `what` names the model."""
    problems = []
    if missing := [k for k in expected if k not in state]:
        problems.append(f"missing tensors: {name_list(missing)}")
    if unexpected := sorted(k for k in state if k not in expected):
        problems.append(f"unexpected tensors: {name_list(unexpected)}")
    if problems:
        raise FormatError(f"checkpoint does not fit {what}: {'; '.join(problems)}")
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if tuple(getattr(state[k], "shape", ())) != shape
    ]
    if wrong:
        raise FormatError(f"tensor shapes do not fit {what}: {name_list(wrong, 6)}")


def block_count(state: Mapping[str, Any], pattern: str = r"blocks\.(\d+)\.") -> int:
    """The number of blocks the file holds, refusing a numbering with gaps (never trust the largest
    number: a file claiming blocks.99999999.* would otherwise build that many)."""
    depths = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if not depths:
        raise FormatError("the checkpoint has no transformer blocks (no blocks.N.* tensors)")
    if extra := sorted(depths - set(range(len(depths)))):
        missing = sorted(set(range(len(depths))) - depths)
        raise FormatError(
            f"transformer blocks are not numbered 0..{len(depths) - 1}: {len(depths)} blocks found, "
            f"blocks {name_list(missing)} missing, blocks {name_list(extra)} beyond them"
        )
    return len(depths)


def square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


# ---------------------------------------------------------------- position-table resize (torch)


def _resize_bicubic_offset(grid, new: int):
    """DINO / iBOT / DINOv2 interpolate_pos_encoding: scale factor (new + 0.1) / old, no antialias."""
    import torch.nn.functional as F

    scale = (new + 0.1) / grid.shape[-1]
    return F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic")


def _resize_bicubic_size_antialias(grid, new: int):
    """DINOv2 register models (interpolate_offset 0, antialias), timm's resample_abs_pos_embed and
    open_clip's resize_pos_embed (bicubic, antialias, align_corners=False)."""
    import torch.nn.functional as F

    return F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)


def _resize_bicubic_size(grid, new: int):
    """MAE util/pos_embed.interpolate_pos_embed: bicubic to a size, align_corners=False, no antialias."""
    import torch.nn.functional as F

    return F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)


def _resize_linear_zoom(grid, new: int):
    """big_vision's resample_posemb (models/vit.py): scipy.ndimage.zoom, order 1, on the float32 grid."""
    import scipy.ndimage
    import torch

    old = grid.shape[-1]
    hwc = grid[0].permute(1, 2, 0).numpy()
    zoomed = scipy.ndimage.zoom(hwc, (new / old, new / old, 1), order=1)
    return torch.from_numpy(zoomed).permute(2, 0, 1)[None]


POS_EMBED_RESIZERS = {
    "bicubic_scale_offset_0.1": _resize_bicubic_offset,
    "bicubic_size": _resize_bicubic_size,
    "bicubic_size_antialias": _resize_bicubic_size_antialias,
    "linear_zoom": _resize_linear_zoom,
}


def resize_pos_embed(pos_embed, num_pos_prefix: int, new_grid: int, method: str):
    """Resizes only the grid rows of a [1, prefix + g*g, D] tensor (torch, or numpy: returned as torch),
    in float32, with `method`; the result keeps the input's dtype."""
    import torch

    pos_embed = pos_embed if torch.is_tensor(pos_embed) else torch.from_numpy(pos_embed)
    prefix, patches = pos_embed[:, :num_pos_prefix], pos_embed[:, num_pos_prefix:]
    old = math.isqrt(patches.shape[1])
    grid = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = POS_EMBED_RESIZERS[method](grid, new_grid)
    if tuple(resized.shape[-2:]) != (new_grid, new_grid):  # the +0.1 offset exists to make this hold
        raise FormatError(f"position-embedding resize {old}->{new_grid} gave {tuple(resized.shape[-2:])}")
    patches = resized.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
