"""PCA feature maps: what each teacher and the student see, as pictures (DINO / DINOv2 style).

The patch tokens of a few fixed evaluation images are projected on their first three principal
components (fitted jointly over all those images' patches, one fit per model), and the three
projections become the R, G, B of a picture with one pixel per patch. Parts of images that a
model represents alike get alike colours, so a student that has learned its teacher's features
shows the teacher's segmentation.

    grid = pca_grid(pixels, [teacher_0_patches, ..., student_patches])   # uint8 [H, W, 3]
    save_png(grid, workdir / "pictures" / "step_100.png")

The grid has one row per image and the columns input | teacher 0 | ... | student.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

CELL = 64  # pixels per picture side in the grid
GAP = 2  # white pixels between pictures
TITLE_HEIGHT = 18  # pixels above the columns for their titles
TITLE_SIZE = 12  # font size of the titles in pixels (shrunk to fit a column's width)


def pca_rgb(patches: np.ndarray) -> np.ndarray:
    """Patch tokens [N, grid * grid, D] of N images -> float [N, grid, grid, 3] in [0, 1].

    One PCA over the patches of all N images, so colours compare across images. Each component is
    scaled to [0, 1] by its 1st and 99th percentiles (robust to a few extreme tokens), and its sign
    is fixed (skew made positive) so colours do not flip between evaluations for no reason.
    """
    n, tokens, width = patches.shape
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise ValueError(f"patch tokens must form a square grid, got {tokens} tokens")
    x = np.asarray(patches, np.float64).reshape(n * tokens, width)
    x = x - x.mean(0)
    _, _, components = np.linalg.svd(x, full_matrices=False)
    projected = x @ components[:3].T
    if projected.shape[1] < 3:  # fewer than three channels: pad with grey
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    projected *= np.where((projected**3).sum(0) < 0, -1.0, 1.0)
    low, high = np.percentile(projected, [1, 99], axis=0)
    rgb = np.clip((projected - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)
    return rgb.reshape(n, grid, grid, 3)


def _cell(image: np.ndarray) -> np.ndarray:
    """float [h, w, 3] in [0, 1] or uint8 -> uint8 [CELL, CELL, 3], nearest neighbour (patches stay sharp)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    rows = np.arange(CELL) * image.shape[0] // CELL
    cols = np.arange(CELL) * image.shape[1] // CELL
    return image[rows][:, cols]


def pca_grid(
    pixels: np.ndarray, patch_tokens: Sequence[np.ndarray], titles: Sequence[str] = ()
) -> np.ndarray:
    """uint8 [N, H, W, 3] images and, per model, its patch tokens [N, grid^2, D] -> uint8 grid picture.

    Rows are the images; columns the input, then each model's PCA map in the order given. `titles`
    (one per column, input included) are written above the columns.
    """
    columns = [[_cell(p) for p in pixels]]
    columns += [[_cell(m) for m in pca_rgb(tokens)] for tokens in patch_tokens]
    rows, cols = len(pixels), len(columns)
    top = TITLE_HEIGHT if titles else 0
    size = (top + rows * CELL + (rows - 1) * GAP, cols * CELL + (cols - 1) * GAP, 3)
    grid = np.full(size, 255, np.uint8)
    for c, column in enumerate(columns):
        for r, cell in enumerate(column):
            y, x = top + r * (CELL + GAP), c * (CELL + GAP)
            grid[y : y + CELL, x : x + CELL] = cell
    return _write_titles(grid, titles) if titles else grid


def column_titles(num_teachers: int) -> list[str]:
    return ["input", *(f"teacher {k}" for k in range(num_teachers)), "student"]


def _write_titles(grid: np.ndarray, titles: Sequence[str]) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    for c, title in enumerate(titles):
        font = _font_fitting(draw, title, CELL - 2)
        width = draw.textlength(title, font=font)
        x = c * (CELL + GAP) + max(0, (CELL - width) / 2)  # centred over its column
        draw.text((x, TITLE_HEIGHT / 2), title, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(image)


def _font_fitting(draw, title: str, width: int):
    """Pillow's bundled scalable font (no font files needed) at TITLE_SIZE px, smaller if the title is
    wider than its column; the old bitmap font where Pillow was built without FreeType."""
    from PIL import ImageFont

    for size in range(TITLE_SIZE, 7, -1):
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont) or draw.textlength(title, font=font) <= width:
            return font
    return font


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Writes the picture whole (never a partial file) and never through a link (storage.write_bytes)."""
    from dmt_jax import storage

    storage.path(os.path.dirname(os.fspath(path))).mkdir(parents=True, exist_ok=True)
    storage.write_bytes(path, png_bytes(image))


def pick_images(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` images, one per class first (in order of appearance), then the rest in order."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    first = np.sort(first)[:count]
    rest = np.setdiff1d(np.arange(len(labels)), first)[: count - len(first)]
    return np.sort(np.concatenate([first, rest])).astype(np.int32)
