"""Model FLOPs of a DMT step (2 per multiply-add, as bench/torch_reference.py counts) and device peaks."""

from __future__ import annotations

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
    """Per-image FLOPs of one step: teacher forwards + student forward/backward (3x) + heads (3x).

    student / teachers: dicts with width, depth, patch_size, mlp_dim, tokens (teachers: all tokens).
    """
    t = sum(vit_flops(x["width"], x["depth"], x["tokens"], x["patch_size"], x["mlp_dim"]) for x in teachers)
    s = 3 * vit_flops(
        student["width"], student["depth"], num_visible + 1, student["patch_size"], student["mlp_dim"]
    )
    h = 3 * sum(2 * (num_visible + 1) * head_in * w for w in head_widths)
    return float(t + s + h)


def peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name.lower() in device_kind.lower():
            return peak
    return None
