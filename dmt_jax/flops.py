"""Model FLOPs (2 per multiply-add, as bench/torch_reference.py counts) and device peaks.

Counted: the matrix products of a step (linear layers, attention, the patch stem, convolutions, the
interpolation einsums of resampling and image resizes). Not counted: elementwise work (norms,
activations, softmax, the optimizer update), which XLA's cost analysis adds: a few % at widths of 256
and up (tests/test_flops.py), 5-6% for SAM (its relative-position bias).

- DMT's step (`step_flops`): teachers over all their tokens (`vit_flops`; EVA and SAM teachers by their
  own `forward_flops`), student and heads 3x (forward and backward) over CLS + the visible patches; the
  count bench/torch_reference.py uses, unchanged for ViT teachers. It overstates the masked step by the
  teachers' last blocks, which run their queries and MLP only at CLS + the visible patches (5% of three
  B/16 teachers at mask 0.75: bench/RESULTS.md), kept for comparability with earlier figures.
- Each teacher family's forward at its config's img_size (`forward_flops`): the ViT family with its
  summary head (MAP pool, projection), EVA-02 with its SwiGLU (three mlp_dim x width matrices), SAM with
  its windows, relative positions and neck.
- The agglomerative step's parts (train.Setup.flops_per_image puts them together): the student's extra
  summary tokens and its heads (`head_flops`), grid resampling (`resample_flops`) and the view resized
  to each input size (`image_resize_flops`).
"""

from __future__ import annotations

import math

# Dense bf16 peak per chip, FLOP/s (vendor figures; used for MFU).
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def vit_flops(width: int, depth: int, tokens: int, patch: int, mlp_dim: int | None = None, channels: int = 3):
    """Forward FLOPs of a ViT encoder over `tokens` tokens (CLS included)."""
    mlp_dim = 4 * width if mlp_dim is None else mlp_dim
    per_layer = (
        2 * tokens * (3 * width * width + width * width + 2 * width * mlp_dim) + 4 * tokens * tokens * width
    )
    stem = 2 * (tokens - 1) * patch * patch * channels * width
    return depth * per_layer + stem


def step_flops(student, teachers, num_visible: int, head_widths, head_in: int) -> float:
    """Per-image FLOPs of one DMT step: teacher forwards + student forward/backward (3x) + heads (3x).

    student / teachers: dicts with width, depth, patch_size, mlp_dim, tokens (teachers: all tokens); a
    teacher of another family than the ViT: a dict with its `flops` (forward_flops).
    """
    t = sum(
        x["flops"]
        if "flops" in x
        else vit_flops(x["width"], x["depth"], x["tokens"], x["patch_size"], x["mlp_dim"])
        for x in teachers
    )
    s = 3 * vit_flops(
        student["width"], student["depth"], num_visible + 1, student["patch_size"], student["mlp_dim"]
    )
    h = 3 * sum(2 * (num_visible + 1) * head_in * w for w in head_widths)
    return float(t + s + h)


# ---------------------------------------------------------------- the families' forwards


def stem_flops(patches: int, patch: int, width: int, channels: int = 3) -> float:
    """The patch projection (a stride-p convolution) over `patches` patches."""
    return 2.0 * patches * patch * patch * channels * width


def block_flops(tokens: int, width: int, linear_per_token: int, queries: int | None = None) -> float:
    """One pre-norm block: q/k/v/proj and the MLP (`linear_per_token` multiply-adds per token, the MLP's
    and q's and proj's; k and v over all tokens) and attention over `tokens` keys. queries: the tokens
    the block outputs (DMT's last teacher block: CLS + visible patches); default all."""
    queries = tokens if queries is None else queries
    kv = 2 * tokens * 2 * width * width
    return kv + 2.0 * queries * linear_per_token + 4.0 * queries * tokens * width


def vit_forward_flops(c, tokens: int | None = None) -> float:
    """A ViTConfig's forward (`features`): stem, blocks over its prefix and patch tokens, and the summary:
    the MAP head (one query over every token, its MLP) and the projection (CLIP's proj)."""
    tokens = c.num_tokens if tokens is None else tokens
    w = c.width
    total = stem_flops(c.grid**2, c.patch_size, w)
    total += c.depth * block_flops(tokens, w, 2 * w * w + 2 * w * c.mlp_dim)
    if c.pool == "map":  # q on the latent, k/v over every token, attention, proj, MLP on one token
        total += 2 * w * w + 2 * tokens * 2 * w * w + 4 * tokens * w + 2 * w * w + 4 * w * c.mlp_dim
    if c.proj_dim and c.pool != "none":
        total += 2 * w * c.proj_dim
    return float(total)


def eva_flops(c) -> float:
    """An EvaConfig's forward: stem, blocks (q/k/v, proj, SwiGLU's three mlp_dim x width matrices),
    the projection of EVA-CLIP towers. RoPE is elementwise (not counted)."""
    w = c.width
    total = stem_flops(c.grid**2, c.patch_size, w)
    total += c.depth * block_flops(c.num_tokens, w, 2 * w * w + 3 * w * c.mlp_dim)
    return float(total + (2 * w * c.proj_dim if c.proj_dim else 0))


def sam_flops(c) -> float:
    """SAM's encoder: linear layers over the grid, attention in padded windows or over the grid
    (with the relative-position einsums), patch stem and neck (1x1 and 3x3 convolutions)."""
    tokens, windows = c.grid**2, math.ceil(c.grid / c.window_size) ** 2  # padded windows
    total = c.depth * 2 * tokens * (4 * c.embed_dim**2 + 2 * c.embed_dim * c.mlp_dim)
    for i in range(c.depth):
        side = c.attn_size(i)
        groups, t = (1, tokens) if i in c.global_attn_indexes else (windows, side**2)
        if i not in c.global_attn_indexes:  # padding tokens go through q, k, v and proj too
            total += 2 * (groups * t - tokens) * 4 * c.embed_dim**2
        total += groups * (4 * t * t * c.embed_dim + (2 * t * c.embed_dim * 2 * side if c.use_rel_pos else 0))
    total += stem_flops(tokens, c.patch_size, c.embed_dim)
    total += 2 * tokens * c.out_chans * (c.embed_dim + 9 * c.out_chans)  # neck: 1x1 and 3x3 convs
    return float(total)


def forward_flops(family: str, config) -> float:
    """One image's forward of a teacher of `family` at config.img_size (what `Teacher.forward` runs)."""
    count = {"vit": vit_forward_flops, "eva": eva_flops, "sam": sam_flops}.get(family)
    if count is None:
        raise ValueError(f"no FLOP count for model family {family!r}")
    return count(config)


# ---------------------------------------------------------------- the agglomerative step's parts


def head_flops(kind: str, dim_in: int, dim_out: int, hidden: int, num_inner: int = 0, mlp_ratio: float = 4.0):
    """Per token, one adaptor head of objective/heads.py (kinds linear, ln_linear, mlp, mlp_v1, mlp_v2)."""
    if kind in ("linear", "ln_linear"):
        return 2.0 * dim_in * dim_out
    if kind == "mlp":
        mid = int(dim_in * mlp_ratio)
        return 2.0 * (dim_in * mid + mid * dim_out)
    if kind in ("mlp_v1", "mlp_v2"):
        return 2.0 * (dim_in * hidden + num_inner * hidden * hidden + hidden * dim_out)
    raise ValueError(f"unknown head kind {kind!r}")


def resample_flops(src: tuple[int, int], dst: tuple[int, int], channels: int) -> float:
    """objective/align.resample of one image's tokens: rows, then columns (identity: none)."""
    (h, w), (h2, w2) = src, dst
    if (h, w) == (h2, w2):
        return 0.0
    return 2.0 * channels * (h2 * h * w + h2 * w2 * w)


def image_resize_flops(src: tuple[int, int], dst: tuple[int, int], channels: int = 3) -> float:
    """jax.image.resize of one image (a weight matrix per axis, height first): none at the same size."""
    return resample_flops(src, dst, channels)


def peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name.lower() in device_kind.lower():
            return peak
    return None
