"""Position tables at another patch grid, in JAX, interpolated as each source's own code does.

Conversion resizes a teacher's tables once, in PyTorch (formats/_base.py `resize_pos_embed`, the SAM
format's relative-position tables). A teacher that follows the student's resolution stages
(`TeacherStack(follow=...)`) resizes them inside the jitted step instead, with the same
interpolation: each is separable, so it is two small [new, old] matrices (one per axis) built here in
float64 from the reference's own formula and applied as float32 einsums at highest precision. The
result equals the PyTorch resize up to float32 rounding (the references compute their weights in
float32), so a teacher following a stage equals the same teacher converted at that size
(tests/test_teacher_stages.py: 1e-5 relative on the features).

METHODS (the names conversion records in spec.json's pos_embed_resize):
- bicubic_size: torch `F.interpolate(mode="bicubic", size, align_corners=False)`: Keys' cubic with
  a = -0.75, source x = (i + 0.5) * old / new - 0.5, the four taps clamped to the edge (MAE's
  interpolate_pos_embed, EVA-02's and EVA-CLIP's resize).
- bicubic_scale_offset_0.1: the same with the scale factor (new + 0.1) / old given to torch, which then
  samples at (i + 0.5) * old / (new + 0.1) - 0.5 (DINO's, iBOT's, DINOv2's interpolate_pos_encoding).
- bicubic_size_antialias: torch's bicubic with antialias=True: Keys' cubic with a = -0.5 (PIL's),
  its support widened by old / new when shrinking, weights normalized over the taps inside the table
  (timm's resample_abs_pos_embed at run time, open_clip's resize_pos_embed, DINOv2 with registers).
- linear_zoom: scipy.ndimage.zoom(order=1): corners aligned, x = i * (old - 1) / (new - 1)
  (big_vision's resample_posemb: SigLIP).
- linear: torch `F.interpolate(mode="linear", align_corners=False)` (segment-anything's get_rel_pos,
  which resizes the global blocks' relative-position tables at run time: "+rel_pos_linear").
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# An unnamed teacher (random weights, demo teachers) follows a stage as timm resizes at run time
# (dynamic_img_size: resample_abs_pos_embed, bicubic with antialias), SAM's tables as segment-anything.
DEFAULT_METHOD = {"vit": "bicubic_size_antialias", "eva": "bicubic_size_antialias",
                  "sam": "bicubic_size_antialias+rel_pos_linear"}  # fmt: skip


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """torch's upsample_bicubic2d along one axis: `scale` is old / new (or 1 / scale_factor)."""
    src = (np.arange(n_out) + 0.5) * scale - 0.5  # cubic: not clamped at 0
    low = np.floor(src).astype(np.int64)
    t = src - low
    weights = np.zeros((n_out, n_in))
    for k in range(4):  # taps low - 1 .. low + 2 at distances t + 1, t, 1 - t, 2 - t, clamped
        np.add.at(
            weights, (np.arange(n_out), np.clip(low - 1 + k, 0, n_in - 1)), _keys_cubic(t + 1 - k, -0.75)
        )
    return weights


def _bicubic_antialias(n_in: int, n_out: int) -> np.ndarray:
    """torch's _upsample_bicubic2d_aa along one axis (PIL's filter, a = -0.5)."""
    scale = n_in / n_out
    support_scale = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    distance = (np.arange(n_in)[None, :] + 0.5 - centre[:, None]) / support_scale
    weights = _keys_cubic(distance, -0.5)
    return weights / weights.sum(axis=1, keepdims=True)


def _linear(n_in: int, n_out: int) -> np.ndarray:
    """torch's linear interpolation with align_corners=False (the source clamped at 0)."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    return weights


def _linear_zoom(n_in: int, n_out: int) -> np.ndarray:
    """scipy.ndimage.zoom(order=1) along one axis: corners aligned."""
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    src = np.minimum(src, n_in - 1)
    low = np.minimum(np.floor(src).astype(np.int64), max(n_in - 2, 0))
    frac = src - low
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), np.minimum(low + 1, n_in - 1)), frac)
    return weights


_MATRICES = {
    "bicubic_size": lambda n_in, n_out: _bicubic(n_in, n_out, n_in / n_out),
    "bicubic_scale_offset_0.1": lambda n_in, n_out: _bicubic(n_in, n_out, n_in / (n_out + 0.1)),
    "bicubic_size_antialias": _bicubic_antialias,
    "linear_zoom": _linear_zoom,
    "linear": _linear,
}
METHODS = tuple(_MATRICES)


@functools.cache
def matrix(method: str, n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 weights of `method` along one axis (rows sum to 1)."""
    if method not in _MATRICES:
        raise ValueError(f"unknown interpolation {method!r}; known: {', '.join(METHODS)}")
    weights = _MATRICES[method](n_in, n_out).astype(np.float32)
    weights.setflags(write=False)
    return weights


def resize_grid(grid, new: int, method: str):
    """grid [..., g, g, C] -> [..., new, new, C], computed in float32 at least, cast back."""
    old = grid.shape[-2]
    if old == new:
        return grid
    dtype = jnp.promote_types(grid.dtype, jnp.float32)
    weights = jnp.asarray(matrix(method, old, new), dtype)
    x = grid.astype(dtype)
    x = jnp.einsum("Hh,...hwc->...Hwc", weights, x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum("Ww,...Hwc->...HWc", weights, x, precision=jax.lax.Precision.HIGHEST)
    return x.astype(grid.dtype)


def resize_rows(table, num_prefix: int, new: int, method: str):
    """A [1, prefix + g*g, C] position table (prefix rows first, the grid row-major) with its grid
    rows resized to new x new; the prefix rows unchanged."""
    prefix, rows = table[:, :num_prefix], table[:, num_prefix:]
    old = math.isqrt(rows.shape[1])
    if old * old != rows.shape[1]:
        raise ValueError(f"{rows.shape[1]} position rows do not form a square grid")
    grid = resize_grid(rows.reshape(rows.shape[0], old, old, rows.shape[-1]), new, method)
    return jnp.concatenate([prefix, grid.reshape(rows.shape[0], new * new, -1)], axis=1)


def resize_1d(table, rows: int, method: str):
    """[L, C] -> [rows, C] along L (SAM's relative-position tables)."""
    if table.shape[0] == rows:
        return table
    dtype = jnp.promote_types(table.dtype, jnp.float32)
    weights = jnp.asarray(matrix(method, table.shape[0], rows), dtype)
    out = jnp.einsum("Ll,lc->Lc", weights, table.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    return out.astype(table.dtype)


def split_method(method: str) -> tuple[str, str | None]:
    """'bicubic_size_antialias+rel_pos_linear' -> ('bicubic_size_antialias', 'linear')."""
    table, _, rel = method.partition("+")
    return table, rel.removeprefix("rel_pos_") or None


def check_method(family: str, method: str) -> str:
    """'' if `method` can resize a `family` teacher's tables, else what it must be."""
    table, rel = split_method(method)
    if table not in METHODS or (rel is not None and rel not in METHODS):
        return f"unknown interpolation {method!r}; known: {', '.join(METHODS)}"
    if family == "sam" and rel is None:
        return (
            f"a SAM teacher's method also names its relative-position interpolation: '{table}+rel_pos_linear'"
        )
    return ""


def at_size(family: str, config, params: dict, img_size: int, method: str):
    """(config, params) of a teacher at img_size: the position tables resized to the new grid with
    `method` (relative to the config's grid); nothing else changes. EVA's rotary angles are no
    parameters: its module recomputes them from the new config's grid (timm's and EVA's own way); SAM's
    windowed blocks keep their tables (windows stay window_size, padded), its global blocks' tables
    get 2 * grid - 1 rows. Traceable (jit, vmap)."""
    if why := check_method(family, method):
        raise ValueError(why)
    new_config = dataclasses.replace(config, img_size=img_size)
    new, (table, rel) = new_config.grid, split_method(method)
    if new == config.grid:
        return new_config, params
    params = dict(params)
    if family == "vit":
        params["pos_embed"] = resize_rows(params["pos_embed"], config.num_pos_prefix, new, table)
    elif family == "eva":
        params["pos_embed"] = resize_rows(params["pos_embed"], config.num_prefix_tokens, new, table)
    elif family == "sam":
        params["pos_embed"] = resize_grid(params["pos_embed"], new, table)
        if config.use_rel_pos:
            for i in config.global_attn_indexes:
                block = dict(params[f"blocks_{i}"])
                attn = dict(block["attn"])
                for axis in "hw":
                    attn[f"rel_pos_{axis}"] = resize_1d(attn[f"rel_pos_{axis}"], 2 * new - 1, rel)
                params[f"blocks_{i}"] = {**block, "attn": attn}
    else:
        raise ValueError(f"unknown model family {family!r}")
    return new_config, params
