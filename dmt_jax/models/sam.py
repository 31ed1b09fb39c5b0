"""SAM's image encoder (Flax linen) whose numerics equal segment-anything's ImageEncoderViT.

A ViT without CLS token: NHWC patch grid plus an absolute position table (1, G, G, C), blocks with
windowed attention (windows of 14 patches, zero-padded at the bottom/right) except a few global
ones, decomposed relative positions (MViTv2) added to the attention logits, and a neck (1x1 conv,
LayerNorm2d, 3x3 conv, LayerNorm2d) to 256 channels. Parameter paths are segment-anything's
`image_encoder.*` names in Flax form (blocks_{i}/attn/rel_pos_h, mlp/lin1, neck_0 ... neck_3), so
conversion and export are one name table (dmt_jax/formats/names_sam.py).
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
from dmt_jax.models.vit import PatchEmbed, QKVProjection, attention_implementation, dense_init

# segment-anything's build_sam_vit_{b,l,h}: (embed_dim, depth, num_heads, global blocks); mlp 4x, patch 16.
SIZES = {
    "B": (768, 12, 12, (2, 5, 8, 11)),
    "L": (1024, 24, 16, (5, 11, 17, 23)),
    "H": (1280, 32, 16, (7, 15, 23, 31)),
}


@dataclasses.dataclass(frozen=True)
class SamConfig(FamilyConfig):
    """Everything needed to rebuild a SAM image encoder (hashable: teachers are grouped by it).

    `embed_dim` is the encoder's width (segment-anything's name); `width`, as for every family, is the
    width of the tokens `features` returns: the neck's out_chans (256)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16
    img_size: int = 1024
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = ()
    out_chans: int = 256
    use_rel_pos: bool = True
    ln_eps: float = 1e-6  # the blocks' LayerNorm and the neck's LayerNorm2d

    POSITIVE = (
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_dim",
        "patch_size",
        "img_size",
        "window_size",
        "out_chans",
    )

    def __post_init__(self):
        if isinstance(self.global_attn_indexes, list):  # JSON gives lists; keep the config hashable
            object.__setattr__(self, "global_attn_indexes", tuple(self.global_attn_indexes))
        self.check()

    def range_problems(self) -> list[str]:
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"num_heads {self.num_heads} does not divide embed_dim {self.embed_dim}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            problems.append(
                f"global_attn_indexes {list(self.global_attn_indexes)} must lie in [0, {self.depth})"
            )
        if len(set(self.global_attn_indexes)) != len(self.global_attn_indexes):
            problems.append(f"global_attn_indexes {list(self.global_attn_indexes)} repeat a block")
        if not 0 < self.ln_eps < 1:
            problems.append(f"ln_eps must be in (0, 1), got {self.ln_eps!r}")
        return problems

    @property
    def grid(self) -> int:
        """Patches per side (the neck's output is grid x grid)."""
        return self.img_size // self.patch_size

    @property
    def width(self) -> int:
        """The width of the tokens `features` returns (the neck's channels)."""
        return self.out_chans

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def summary_dim(self) -> int:
        return 0  # SAM has no image-level vector

    @property
    def variant(self) -> str:
        """'SAM-B/16' for the released shapes; otherwise one that says the shape, e.g. 'SAM-w64-d2/16'."""
        for name, (dim, depth, heads, global_blocks) in SIZES.items():
            if (dim, depth, heads, 4 * dim, global_blocks) == (
                self.embed_dim, self.depth, self.num_heads, self.mlp_dim, self.global_attn_indexes
            ):  # fmt: skip
                return f"SAM-{name}/{self.patch_size}"
        return f"SAM-w{self.embed_dim}-d{self.depth}/{self.patch_size}"

    def describe(self) -> str:
        return (f"{self.variant} (embed_dim {self.embed_dim}, depth {self.depth}, heads {self.num_heads}, "
                f"mlp {self.mlp_dim}, grid {self.grid}, window {self.window_size}, "
                f"global blocks {list(self.global_attn_indexes)}, out_chans {self.out_chans})")  # fmt: skip

    @classmethod
    def from_size(cls, size: str, **overrides) -> SamConfig:
        """SAM 'B', 'L' or 'H' as build_sam_vit_* makes it (1024 px), with `overrides`."""
        dim, depth, heads, global_blocks = SIZES[size]
        return cls(**{**dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=4 * dim,
                             global_attn_indexes=global_blocks), **overrides})  # fmt: skip

    def attn_size(self, block: int) -> int:
        """Tokens per side that block `block` attends over: the grid (global) or a window."""
        return self.grid if block in self.global_attn_indexes else self.window_size


def rel_pos_index(size: int) -> np.ndarray:
    """[size, size] rows of a (2*size-1)-row table for query i, key j: (i - j) + size - 1 (get_rel_pos with
    equal query and key sizes; tables of another length are resized at conversion, as get_rel_pos would)."""
    coords = np.arange(size)
    return coords[:, None] - coords[None, :] + size - 1


def window_partition(x, window: int):
    """[B, H, W, C] -> [B * nh * nw, window*window, C], zero-padded at the bottom/right (segment-anything)."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // window, (w + pw) // window
    x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window * window, c)


def window_unpartition(x, window: int, b: int, h: int, w: int):
    """The inverse of window_partition: [B * nh * nw, window*window, C] -> [B, H, W, C] (padding cut)."""
    nh, nw = -(-h // window), -(-w // window)
    x = x.reshape(b, nh, nw, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * window, nw * window, -1)[:, :h, :w]


class Attention(nn.Module):
    """Multi-head attention over square token grids [B, S*S, D] with decomposed relative positions."""

    num_heads: int
    size: int  # tokens per side (S)
    use_rel_pos: bool = True
    dtype: Any = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        s, n, hd = self.size, self.num_heads, d // self.num_heads
        qkv = QKVProjection(d, self.dtype, name="qkv")
        heads = lambda y: y.reshape(b, t, n, hd)
        q, k, v = heads(qkv(x, 0)), heads(qkv(x, 1)), heads(qkv(x, 2))
        bias = None
        if self.use_rel_pos:
            # The unscaled q against a table per axis: logits[i, j] += q_i . Rh[ih - jh] + q_i . Rw[iw - jw].
            # Computed as [B, N, S, S, S] per axis and broadcast to [B, N, T, T] only where it is added
            # (XLA fuses the broadcast into the softmax's input; cuDNN takes it as its bias operand).
            index = rel_pos_index(s)
            rel_h = self.param("rel_pos_h", nn.initializers.truncated_normal(0.02), (2 * s - 1, hd))
            rel_w = self.param("rel_pos_w", nn.initializers.truncated_normal(0.02), (2 * s - 1, hd))
            q_grid, rh, rw = nn.dtypes.promote_dtype(q.reshape(b, s, s, n, hd), rel_h[index], rel_w[index],
                                                     dtype=self.dtype)  # fmt: skip
            bias_h = jnp.einsum("bhwnc,hkc->bnhwk", q_grid, rh)
            bias_w = jnp.einsum("bhwnc,wkc->bnhwk", q_grid, rw)
            bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, n, t, t)
        impl = attention_implementation(self.implementation, q.dtype)
        try:
            out = jax.nn.dot_product_attention(q, k, v, bias, implementation=impl)
        except Exception as e:  # cuDNN refused this shape, dtype or bias (checked while tracing)
            if self.implementation != "auto" or impl == "xla":
                raise
            logging.warning("cuDNN attention unavailable for %s (%s); using XLA's", q.shape, str(e)[:200])
            out = jax.nn.dot_product_attention(q, k, v, bias, implementation="xla")
        return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name="proj")(out.reshape(b, t, d))


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init)
        y = nn.gelu(dense(self.hidden, name="lin1")(x), approximate=False)  # torch's nn.GELU: exact
        return dense(x.shape[-1], name="lin2")(y)


class Block(nn.Module):
    """Pre-norm block; attention inside windows (window_size > 0) or over the whole grid (0)."""

    config: SamConfig
    index: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        """x [B, G, G, D] -> [B, G, G, D]."""
        c = self.config
        b, h, w, d = x.shape
        norm = functools.partial(nn.LayerNorm, epsilon=c.ln_eps, use_fast_variance=False, dtype=self.dtype)
        y = norm(name="norm1")(x)
        size = c.attn_size(self.index)
        windowed = self.index not in c.global_attn_indexes
        # Windows go into the batch (one attention call for all of them); the padding is zeros after
        # norm1, as segment-anything pads, so padded keys carry the qkv bias and take part in the softmax.
        y = window_partition(y, size) if windowed else y.reshape(b, h * w, d)
        y = Attention(c.num_heads, size, c.use_rel_pos, self.dtype, self.attention, name="attn")(y)
        y = window_unpartition(y, size, b, h, w) if windowed else y.reshape(b, h, w, d)
        x = x + y
        return x + Mlp(c.mlp_dim, self.dtype, name="mlp")(norm(name="norm2")(x))


class SamEncoder(nn.Module):
    """`__call__(images) -> Features`: images normalized NHWC float at config.img_size; patches are the
    neck's output as tokens [B, G*G, out_chans] (row-major over the grid), no prefix, no summary."""

    config: SamConfig
    dtype: Any = jnp.float32  # matmul / activation dtype; parameters stay float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, images) -> Features:
        c = self.config
        x = PatchEmbed(c.embed_dim, c.patch_size, self.dtype, name="patch_embed")(images)
        b, gh, gw, _ = x.shape
        if (gh, gw) != (c.grid, c.grid):
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} px give a {gh}x{gw} patch grid, but this SAM "
                f"encoder's position table is {c.grid}x{c.grid} (img_size={c.img_size}); feed {c.img_size}px "
                f"images or convert the checkpoint with --img-size"
            )
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, gh, gw, c.embed_dim))
        x = x + pos.astype(x.dtype)
        for i in range(c.depth):
            x = Block(c, i, self.dtype, self.attention, name=f"blocks_{i}")(x)
        # The neck, NHWC: LayerNorm2d normalizes over channels, i.e. a LayerNorm on the last axis.
        norm = functools.partial(nn.LayerNorm, epsilon=c.ln_eps, use_fast_variance=False, dtype=self.dtype)
        conv = functools.partial(nn.Conv, c.out_chans, use_bias=False, dtype=self.dtype)
        x = conv((1, 1), name="neck_0")(x)
        x = norm(name="neck_1")(x)
        x = conv((3, 3), padding=((1, 1), (1, 1)), name="neck_2")(x)
        x = norm(name="neck_3")(x)
        return Features(prefix=jnp.zeros((b, 0, c.out_chans), x.dtype), patches=x.reshape(b, gh * gw, -1))
