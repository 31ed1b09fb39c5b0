"""EVA-02 encoder (Flax linen) whose numerics equal timm's `Eva.forward_features` (timm/models/eva.py).

What differs from the plain ViT (models/vit.py): q, k, v are three projections, q and v with a bias
and k without (BEiT's layout); a 2-D rotary embedding (RoPE) rotates the patch tokens' queries and
keys in every block, recomputed from the patch grid, never stored; the MLP is SwiGLU with a
LayerNorm on its hidden units (`ffn_ln`, "sub-LN"); EVA-CLIP towers add a LayerNorm on the attention
output before its projection (`inner_attn_ln`) and an image projection (`head`).

Parameter names follow timm's Eva (patch_embed/proj, cls_token, pos_embed, blocks_{i}/norm1,
attn/q_proj, attn/k_proj, attn/v_proj, attn/norm, attn/proj, norm2, mlp/fc1_g, mlp/fc1_x, mlp/norm,
mlp/fc2, norm, head), so conversion and export are one name table (formats/names_eva.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmt_jax.models.family import FamilyConfig
from dmt_jax.models.features import Features
from dmt_jax.models.vit import PatchEmbed, attention_implementation


@dataclasses.dataclass(frozen=True)
class EvaConfig(FamilyConfig):
    """Everything needed to rebuild an EVA-02 encoder; spec.json records every field."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int  # SwiGLU hidden width (timm: int(width * mlp_ratio), 2730 for L)
    patch_size: int = 14
    img_size: int = 224
    # The grid the rotary frequencies are scaled to (EVA's pt_hw_seq_len, timm's ref_feat_shape): a
    # grid g gets positions arange(g) / g * rope_ref_grid, so a 448-px model keeps the 224-px angles.
    rope_ref_grid: int = 16
    rope_theta: float = 10000.0
    ln_eps: float = 1e-6
    attn_norm: bool = False  # EVA-CLIP's inner_attn_ln on the attention output (timm scale_attn_inner)
    mlp_norm: bool = True  # ffn_ln on the SwiGLU hidden units (timm scale_mlp)
    qv_bias: bool = True  # q and v carry a bias; k never does (its bias is fixed at zero)
    num_reg_tokens: int = 0  # registers after CLS; they share the position table's prefix rows, as in timm
    proj_dim: int = 0  # EVA-CLIP's image projection `head` (the summary is head(CLS)); 0: none

    POSITIVE = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "img_size", "rope_ref_grid")

    def __post_init__(self):
        self.check()

    def range_problems(self) -> list[str]:
        problems = []
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            problems.append(
                f"width {self.width} / num_heads {self.num_heads} must give a head width divisible by 4 "
                "(2-D RoPE rotates pairs on each axis)"
            )
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.rope_theta <= 0 or self.ln_eps <= 0:
            problems.append(f"rope_theta {self.rope_theta} and ln_eps {self.ln_eps} must be positive")
        return problems

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid**2

    @property
    def summary_dim(self) -> int:
        return self.proj_dim or self.width

    @property
    def variant(self) -> str:
        """'EVA02-B/14', 'EVA02-CLIP-L/14' for the released widths; the numbers otherwise."""
        sizes = {(192, 12): "Ti", (384, 12): "S", (768, 12): "B", (1024, 24): "L"}
        name = sizes.get((self.width, self.depth), f"w{self.width}d{self.depth}")
        return f"EVA02-{'CLIP-' if self.proj_dim else ''}{name}/{self.patch_size}"

    def describe(self) -> str:
        return (f"{self.variant} (width {self.width}, depth {self.depth}, heads {self.num_heads}, SwiGLU "
                f"{self.mlp_dim}, patch {self.patch_size}, grid {self.grid}, RoPE grid {self.rope_ref_grid}, "
                f"registers {self.num_reg_tokens}, projection {self.proj_dim or 'none'})")  # fmt: skip

    @classmethod
    def preset(cls, name: str, **override) -> EvaConfig:
        """A released EVA-02 shape by name (PRESETS), with fields overridden, e.g. img_size=448."""
        if name not in PRESETS:
            raise ValueError(f"unknown EVA-02 preset {name!r}: choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **override})


# The released shapes (EVA-02 asuka modeling_pretrain.py, EVA-CLIP model_configs; timm eva02_*).
_B = dict(width=768, depth=12, num_heads=12, mlp_dim=2048)
_L = dict(width=1024, depth=24, num_heads=16, mlp_dim=2730)
PRESETS: dict[str, dict[str, Any]] = {
    "B/14": dict(_B, patch_size=14),  # MIM: eva02_B_pt_in21k_p14
    "L/14": dict(_L, patch_size=14),  # MIM: eva02_L_pt_{in21k,m38m}_p14
    "CLIP-B/16": dict(_B, patch_size=16, attn_norm=True, proj_dim=512),  # EVA02-CLIP-B-16
    "CLIP-L/14": dict(_L, patch_size=14, attn_norm=True, proj_dim=768),  # EVA02-CLIP-L-14
    "CLIP-L/14-336": dict(_L, patch_size=14, img_size=336, attn_norm=True, proj_dim=768),
}


def rope_tables(config: EvaConfig) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos), each [num_prefix + grid^2, head_dim] float32: the rotation of every token.

    Prefix tokens (CLS, registers) are not rotated (sin 0, cos 1: exactly the identity). A patch at row
    i, column j gets angles (i * s) * f_k on the first half of the channels and (j * s) * f_k on
    the second, s = rope_ref_grid / grid, f_k = theta^(-k / (head_dim / 4)), each angle repeated for the
    two channels of its pair: timm's RotaryEmbeddingCat(in_pixels=False, ref_feat_shape) and EVA's
    VisionRotaryEmbeddingFast, computed in float32 in the same order."""
    num_bands = config.head_dim // 4
    exponents = np.arange(num_bands, dtype=np.float32) / np.float32(num_bands)
    bands = (1.0 / np.float32(config.rope_theta) ** exponents).astype(np.float32)
    g = config.grid
    t = np.arange(g, dtype=np.float32) / np.float32(g) * np.float32(config.rope_ref_grid)
    rows, cols = np.meshgrid(t, t, indexing="ij")
    angles = np.stack([rows, cols], axis=-1)[..., None] * bands  # [g, g, 2, num_bands]
    angles = np.repeat(angles.reshape(g * g, 2 * num_bands), 2, axis=-1)  # pairs: [a0, a0, a1, a1, ...]
    p = config.num_prefix_tokens
    sin = np.concatenate([np.zeros((p, config.head_dim), np.float32), np.sin(angles)], axis=0)
    cos = np.concatenate([np.ones((p, config.head_dim), np.float32), np.cos(angles)], axis=0)
    return sin.astype(np.float32), cos.astype(np.float32)


def apply_rope(x, sin, cos):
    """x [B, T, H, d] rotated pairwise: x * cos + rot(x) * sin, rot([x0, x1, ...]) = [-x1, x0, ...].
    sin, cos: [T, d] or [B, T, d]. Computed in float32 and cast back, as timm does."""
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(jnp.float32) * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


class EvaAttention(nn.Module):
    config: EvaConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, sin, cos, queries=None, q_sin=None, q_cos=None):
        """x [B, T, D] -> [B, T, D]. queries: optional [B, Tq, D] tokens (rotated by q_sin/q_cos
        [B, Tq, d]) at which to compute the output; keys and values come from every token of x."""
        c = self.config
        dense = functools.partial(nn.Dense, c.width, dtype=self.dtype)
        heads = lambda y: y.reshape(y.shape[:2] + (c.num_heads, c.head_dim))
        if queries is None:
            queries, q_sin, q_cos = x, sin, cos
        q = apply_rope(heads(dense(use_bias=c.qv_bias, name="q_proj")(queries)), q_sin, q_cos)
        k = apply_rope(heads(dense(use_bias=False, name="k_proj")(x)), sin, cos)
        v = heads(dense(use_bias=c.qv_bias, name="v_proj")(x))
        impl = attention_implementation(self.attention, q.dtype)
        try:
            out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        except Exception as e:  # cuDNN refused this shape, dtype or transform (checked while tracing)
            if self.attention != "auto" or impl == "xla":
                raise
            logging.warning("cuDNN attention unavailable for %s (%s); using XLA's", q.shape, str(e)[:200])
            out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        out = out.reshape(queries.shape[:2] + (c.width,))
        if c.attn_norm:
            out = _layer_norm(c, self.dtype, "norm")(out)
        return dense(name="proj")(out)


class SwiGLU(nn.Module):
    """silu(fc1_g(x)) * fc1_x(x), LayerNorm'd when mlp_norm (EVA's w1, w2, ffn_ln, w3)."""

    config: EvaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        hidden = functools.partial(nn.Dense, c.mlp_dim, dtype=self.dtype)
        h = nn.silu(hidden(name="fc1_g")(x)) * hidden(name="fc1_x")(x)
        if c.mlp_norm:
            h = _layer_norm(c, self.dtype, "norm")(h)
        return nn.Dense(c.width, dtype=self.dtype, name="fc2")(h)


def _layer_norm(config: EvaConfig, dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it (see models/vit.py).
    return nn.LayerNorm(epsilon=config.ln_eps, use_fast_variance=False, dtype=dtype, name=name)


class EvaBlock(nn.Module):
    config: EvaConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, sin, cos, out_index=None):
        """out_index: optional int [B, n] token positions; the block's output is then [B, n, D], its
        queries, projection and MLP computed only there (keys and values from every token)."""
        c = self.config
        h = _layer_norm(c, self.dtype, "norm1")(x)
        queries = q_sin = q_cos = None
        if out_index is not None:
            take = lambda a: jnp.take_along_axis(a, out_index[:, :, None], axis=1)
            x, queries = take(x), take(h)
            q_sin, q_cos = sin[out_index], cos[out_index]
        x = x + EvaAttention(c, self.dtype, self.attention, name="attn")(h, sin, cos, queries, q_sin, q_cos)
        return x + SwiGLU(c, self.dtype, name="mlp")(_layer_norm(c, self.dtype, "norm2")(x))


class Eva(nn.Module):
    """EVA-02 encoder: normalized NHWC images at config.img_size -> Features(prefix = final-norm CLS
    (and registers), patches = final-norm patch tokens, summary = final-norm CLS, or head(CLS) for an
    EVA-CLIP tower). Parameters float32; `dtype` for matmuls and activations."""

    config: EvaConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, images, output_patches=None) -> Features:
        """output_patches: optional int [B, n] patch indices (a frozen teacher's use): `patches` is then
        [B, n, D], those patches only, and the last block computes its queries, MLP and the final norm
        only at the prefix and those patches (exact: keys and values still see every token)."""
        c = self.config
        b = images.shape[0]
        x = PatchEmbed(c.width, c.patch_size, self.dtype, name="patch_embed")(images)
        if x.shape[1:3] != (c.grid, c.grid):
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} px give a {x.shape[1]}x{x.shape[2]} patch "
                f"grid, but this EVA's position table is for {c.grid}x{c.grid} (img_size={c.img_size}); feed "
                f"{c.img_size}px images or convert the checkpoint with --img-size"
            )
        x = x.reshape(b, c.grid**2, c.width).astype(self.dtype)
        p = c.num_prefix_tokens
        init = nn.initializers.truncated_normal(0.02)
        prefix = [self.param("cls_token", init, (1, 1, c.width))]
        if c.num_reg_tokens:
            prefix.append(self.param("reg_token", init, (1, c.num_reg_tokens, c.width)))
        prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1), (b, p, c.width)).astype(self.dtype)
        pos = self.param("pos_embed", init, (1, c.num_tokens, c.width))
        x = jnp.concatenate([prefix, x], axis=1) + pos.astype(self.dtype)

        sin, cos = (jnp.asarray(t) for t in rope_tables(c))
        out_index = None
        if output_patches is not None:
            prefix_index = jnp.broadcast_to(jnp.arange(p, dtype=output_patches.dtype), (b, p))
            out_index = jnp.concatenate([prefix_index, output_patches + p], axis=1)
        for i in range(c.depth):
            last = i == c.depth - 1
            block = EvaBlock(c, self.dtype, self.attention, name=f"blocks_{i}")
            x = block(x, sin, cos, out_index if last else None)
        x = _layer_norm(c, self.dtype, "norm")(x)
        summary = x[:, 0]
        if c.proj_dim:
            summary = nn.Dense(c.proj_dim, dtype=self.dtype, name="head")(summary)
        return Features(prefix=x[:, :p], patches=x[:, p:], summary=summary)
