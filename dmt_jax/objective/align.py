"""Matching patch grids: bilinear resampling of token grids, as torch's
`F.interpolate(mode="bilinear", align_corners=False, antialias=False)`.

A teacher's patch grid rarely equals the student's (DINOv2 /14 at 224 px: 16x16; SAM at 1024 px:
64x64; a /16 student at 224 px: 14x14). The objective compares them on one grid: the student's adapted
features resampled to the teacher's grid (RADIO), or the teacher's features resampled to the student's
(the only way when the student encodes a random subset of its patches: the comparison then happens at
its visible tokens). Resampling is two small interpolation matrices (one per axis) applied as einsums:
exact, differentiable, and cheap next to a ViT.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Grid = tuple[int, int]  # (rows, columns) of patches


def as_grid(grid: int | Sequence[int]) -> Grid:
    if isinstance(grid, int):
        return (grid, grid)
    rows, cols = grid
    return (int(rows), int(cols))


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with align_corners=False (half-pixel centres):
    output i samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped at 0, between its two
    neighbours (the upper one clamped to the last). torch's rule (aten upsample_bilinear2d); no
    antialiasing when shrinking, as antialias=False."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    weights = np.zeros((n_out, n_in), np.float64)
    np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    return weights.astype(np.float32)


def resample(tokens: jax.Array, src: int | Sequence[int], dst: int | Sequence[int]) -> jax.Array:
    """tokens [B, h*w, D] (row-major over the src grid) -> [B, h'*w', D] on the dst grid, bilinear.
    The identity (no work) when the grids are equal. Computed in float32 at least."""
    (h, w), (h2, w2) = as_grid(src), as_grid(dst)
    b, n, d = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
    if (h, w) == (h2, w2):
        return tokens
    dtype = jnp.promote_types(tokens.dtype, jnp.float32)
    rows = jnp.asarray(bilinear_matrix(h, h2), dtype)  # small constants: [h', h] and [w', w]
    cols = jnp.asarray(bilinear_matrix(w, w2), dtype)
    x = tokens.astype(dtype).reshape(b, h, w, d)
    y = jnp.einsum("Hh,bhwd->bHwd", rows, x, precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("Ww,bHwd->bHWd", cols, y, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(b, h2 * w2, d)


def gather(tokens: jax.Array, keep: jax.Array | None) -> jax.Array:
    """tokens [B, N, D] at the patch indices keep [B, n] (the student's visible patches) -> [B, n, D]."""
    if keep is None:
        return tokens
    return jnp.take_along_axis(tokens, keep[:, :, None], axis=1)
